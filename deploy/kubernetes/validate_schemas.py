"""Schema-check rendered Kubernetes manifests offline (run by validate.sh, in the .venv-iac venv).

Built-in kinds are checked with kubernetes-validate's strict schemas (an unknown field fails) for
each Kubernetes version given. Its command line only warns, and passes, when it has no schema for
a kind, so a mistyped apiVersion would slip through; here a missing schema fails instead, except
for the custom resources listed in CUSTOM_SCHEMAS, which are checked against the schema written
below for the fields these manifests use. That schema is ours, not the CRD's: the operator's own
schema still applies when the object reaches a cluster (`kubectl apply --dry-run=server`).

    python validate_schemas.py --kubernetes-version 1.30.0 rendered.yaml [more.yaml ...]
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

# A Prometheus duration, e.g. 15s, 1m30s.
DURATION = r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_RELABELINGS = {"type": "array", "items": {"type": "object"}}

SERVICE_MONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "params": {"type": "object"},
                            "relabelings": _RELABELINGS,
                            "metricRelabelings": _RELABELINGS,
                            "followRedirects": {"type": "boolean"},
                            "enableHttp2": {"type": "boolean"},
                        },
                        "oneOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                    },
                },
            },
        },
    },
}

CUSTOM_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}


def report(line: str) -> None:
    sys.stdout.write(line + "\n")


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", duration))


def check_custom(resource: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    problems = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in sorted(validator.iter_errors(resource), key=lambda e: list(e.absolute_path))
    ]
    if not problems and resource["kind"] == "ServiceMonitor":
        for endpoint in resource["spec"]["endpoints"]:  # Prometheus refuses a timeout above the interval
            interval, timeout = endpoint.get("interval"), endpoint.get("scrapeTimeout")
            if interval and timeout and seconds(timeout) > seconds(interval):
                problems.append(f"spec.endpoints: scrapeTimeout {timeout} is longer than interval {interval}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", "-k", action="append", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    failed = 0
    for filename in args.files:
        with open(filename, encoding="utf-8") as stream:
            resources = [doc for doc in yaml.safe_load_all(stream) if doc]
        if not resources:
            report(f"ERROR {filename}: no resources")
            failed += 1
        for resource in resources:
            api_version, kind = resource.get("apiVersion", "?"), resource.get("kind", "?")
            name = f"{kind}/{resource.get('metadata', {}).get('name', '?')}"
            custom = CUSTOM_SCHEMAS.get((api_version, kind))
            if custom is not None:
                problems = check_custom(resource, custom)
                for problem in problems:
                    report(f"ERROR {filename}: {name} ({api_version}, custom resource): {problem}")
                if not problems:
                    report(f"OK    {filename}: {name} ({api_version}, custom resource, schema in validate_schemas.py)")
                failed += bool(problems)
                continue
            for version in args.kubernetes_version:
                try:
                    kubernetes_validate.validate(resource, version, strict=True)
                except SchemaNotFoundError:
                    report(
                        f"ERROR {filename}: {name}: Kubernetes {version} has no {kind} in {api_version} "
                        "(a custom resource needs an entry in CUSTOM_SCHEMAS)"
                    )
                    failed += 1
                except jsonschema.ValidationError as error:
                    path = ".".join(str(part) for part in error.absolute_path)
                    report(f"ERROR {filename}: {name} (Kubernetes {version}, strict): {path}: {error.message}")
                    failed += 1
                else:
                    report(f"OK    {filename}: {name} ({api_version}, Kubernetes {version}, strict)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
