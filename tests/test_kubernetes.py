"""The Kubernetes manifests (deploy/kubernetes) agree with the server they deploy.

Each overlay is rendered with `kubectl kustomize` and compared with the server's own settings,
routes, metrics and gunicorn configuration, with the Dockerfile and with deploy/nginx/rta.conf, so
that neither side can change without the other. Schemas and security policies are checked by
`make lint` (deploy/kubernetes/validate.sh), not here.
"""

from __future__ import annotations

import functools
import os
import re
import runpy
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Match

from real_time_audio.config import Settings, load_settings
from tests.conftest import PROJECT_ROOT

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the kustomize overlays)")

KUBERNETES = PROJECT_ROOT / "deploy" / "kubernetes"
NGINX_CONF = PROJECT_ROOT / "deploy" / "nginx" / "rta.conf"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
POD_LABELS = {"app.kubernetes.io/name": "real-time-audio", "app.kubernetes.io/instance": "real-time-audio"}
SECRET_KEYS = {"API_TOKENS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# Variables the container may set that are not server settings: gunicorn's, Hugging Face's, boto3's, Python's.
EXTRA_VARIABLES = {"WEB_CONCURRENCY", "FORWARDED_ALLOW_IPS", "HF_HOME"}
EXTRA_PREFIXES = ("AWS_", "PYTHON")


class Rendered:
    """One overlay's output of `kubectl kustomize`, by kind."""

    def __init__(self, overlay: str, objects: list[dict[str, Any]]) -> None:
        self.overlay = overlay
        self.objects = objects

    def kinds(self) -> list[str]:
        return sorted(obj["kind"] for obj in self.objects)

    def one(self, kind: str) -> dict[str, Any]:
        found = [obj for obj in self.objects if obj["kind"] == kind]
        assert len(found) == 1, f"{self.overlay}: {len(found)} objects of kind {kind}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return dict(container)

    @property
    def config(self) -> dict[str, str]:
        """The ConfigMap the container takes its environment from (the generator adds a hash to its name)."""
        (source,) = self.container["envFrom"]
        config_map = self.one("ConfigMap")
        assert source == {"configMapRef": {"name": config_map["metadata"]["name"]}}
        assert config_map["metadata"]["name"].startswith("rta-config-")
        return dict(config_map["data"])


@functools.cache
def render(overlay: str) -> Rendered:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return Rendered(overlay, [obj for obj in yaml.safe_load_all(result.stdout) if obj])


@pytest.fixture(scope="module", params=["gpu", "cpu"])
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render(request.param)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """The server's app, never started: its routes and /metrics answer without a model."""
    from main import create_app

    folder = tmp_path_factory.mktemp("k8s-app")
    return create_app(load_settings(audio_storage_dir=folder / "audio", max_sessions=4, warmup=False))


def dockerfile_env() -> dict[str, str]:
    """The variables the image sets with ENV (values that expand another variable are left out)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for name, value in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", line[4:]):
                if "$" not in value:
                    env[name] = value
    return env


@pytest.fixture
def container_env(rendered: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The pod's environment (the image's ENV, then the ConfigMap), set in os.environ for the test;
    no other server variable and no `.env` file (the working directory is empty)."""
    env = dockerfile_env() | rendered.config
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for name in ("WEB_CONCURRENCY", "FORWARDED_ALLOW_IPS", "API_TOKENS", "ADMIN_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    yield env


def test_each_overlay_renders_its_objects(rendered: Rendered) -> None:
    base = [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Ingress",
        "Namespace",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
    ]
    expected = sorted([*base, "PersistentVolumeClaim"]) if rendered.overlay == "gpu" else base
    assert rendered.kinds() == expected
    for obj in rendered.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "real-time-audio"
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "real-time-audio"
    assert "Secret" not in rendered.kinds()  # the example Secret is not deployed
    assert rendered.container["image"] == "registry.example.com/real-time-audio:1.0.0"


def test_gpu_overlay_runs_turbo_on_one_gpu_per_pod() -> None:
    rendered = render("gpu")
    config, container, pod = rendered.config, rendered.container, rendered.pod
    assert config["TRANSCRIPTION_MODEL_ID"] == "openai/whisper-large-v3-turbo"
    assert config["DEVICE"] == "auto"
    assert config["WEB_CONCURRENCY"] == "1"
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "12Gi"},
        "limits": {"cpu": "8", "memory": "12Gi", "nvidia.com/gpu": 1},
    }
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    hpa = rendered.one("HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 8)
    claim = rendered.one("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}


def test_cpu_overlay_runs_tiny_without_gpu_or_shared_storage() -> None:
    rendered = render("cpu")
    config, container, pod = rendered.config, rendered.container, rendered.pod
    assert config["TRANSCRIPTION_MODEL_ID"] == "openai/whisper-tiny.en"
    assert config["DEVICE"] == "cpu"
    assert config["MAX_SESSIONS"] == "4"
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert "tolerations" not in pod
    hpa = rendered.one("HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 4)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache", "emptyDir": {"sizeLimit": "2Gi"}}


def test_probes_and_port_are_the_servers(rendered: Rendered, app: FastAPI) -> None:
    container = rendered.container
    port = Settings.model_fields["port"].default
    assert port == 8000
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    image = dockerfile_env()
    assert (image["HOST"], image["PORT"]) == ("0.0.0.0", str(port))  # what the container listens on
    assert f"\nEXPOSE {port}\n" in DOCKERFILE.read_text(encoding="utf-8")
    assert "PORT" not in rendered.config and "HOST" not in rendered.config
    assert "command" not in container and "args" not in container  # the image's gunicorn command

    assert container["startupProbe"] == {
        "httpGet": {"path": "/ready", "port": "http"},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 60,
    }
    assert container["readinessProbe"] == {
        "httpGet": {"path": "/ready", "port": "http"},
        "periodSeconds": 2,
        "timeoutSeconds": 2,
        "failureThreshold": 1,
        "successThreshold": 1,
    }
    assert container["livenessProbe"] == {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    # The server answers both paths; before its model is loaded /health is 200 and /ready 503.
    client = TestClient(app)  # no lifespan: nothing is loaded
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503

    service = rendered.one("Service")["spec"]
    assert service["ports"] == [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]
    assert service["selector"] == POD_LABELS


def test_grace_period_outlasts_the_drain(rendered: Rendered, container_env: dict[str, str]) -> None:
    """preStop sleep + gunicorn's graceful_timeout (for the ConfigMap's DRAIN_TIMEOUT_S) fit in
    terminationGracePeriodSeconds; gunicorn.conf.py is run with the container's environment."""
    pod, container = rendered.pod, rendered.container
    assert rendered.config["DRAIN_TIMEOUT_S"] == "20"
    assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    gunicorn = runpy.run_path(str(PROJECT_ROOT / "gunicorn.conf.py"))
    assert gunicorn["graceful_timeout"] == 50  # DRAIN_TIMEOUT_S 20 + 20 s of uploads + 10 s engine stop
    assert pod["terminationGracePeriodSeconds"] == 60
    assert pod["terminationGracePeriodSeconds"] >= 5 + gunicorn["graceful_timeout"]
    # The rest of what gunicorn makes of the pod's environment.
    assert gunicorn["bind"] == "0.0.0.0:8000"
    assert gunicorn["workers"] == 1
    assert gunicorn["forwarded_allow_ips"] == "10.0.0.0/8"
    assert gunicorn["loglevel"] == "info"
    assert "json" in gunicorn["logconfig_dict"]["formatters"]  # LOG_FORMAT=json: gunicorn's lines too
    assert os.environ["MODEL_FALLBACK"] == "false"

    strategy = rendered.one("Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    budget = rendered.one("PodDisruptionBudget")["spec"]
    assert budget == {"maxUnavailable": 1, "selector": {"matchLabels": POD_LABELS}}


def test_the_config_is_valid_and_names_only_real_variables(rendered: Rendered, container_env: dict[str, str]) -> None:
    settings = load_settings()  # the pod's environment: an invalid value raises SettingsError
    assert settings.drain_timeout_s == 20
    assert settings.log_format == "json"
    assert str(settings.audio_storage_dir) == "/app/audio_chunks"

    fields = {name.upper() for name in Settings.model_fields}
    names = set(rendered.config) | {item["name"] for item in rendered.container["env"]}
    unknown = {
        name
        for name in names
        if name not in fields and name not in EXTRA_VARIABLES and not name.startswith(EXTRA_PREFIXES)
    }
    assert unknown == set()

    # Secrets come from the optional Secret rta-secrets, one key per variable of the same name.
    secret_refs = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in rendered.container["env"]}
    assert secret_refs == {key: {"name": "rta-secrets", "key": key, "optional": True} for key in SECRET_KEYS}
    assert not SECRET_KEYS & set(rendered.config)
    example = yaml.safe_load((KUBERNETES / "base" / "secret.example.yaml").read_text(encoding="utf-8"))
    assert (example["kind"], example["metadata"]["name"]) == ("Secret", "rta-secrets")
    assert set(example["stringData"]) == SECRET_KEYS


def test_writable_paths_are_volumes_and_the_pod_is_locked_down(rendered: Rendered) -> None:
    pod, container, config = rendered.pod, rendered.container, rendered.config
    image = dockerfile_env()
    for name in ("HF_HOME", "MODEL_CACHE_DIR", "AUDIO_STORAGE_DIR", "MODEL_FALLBACK", "API_DOCS"):
        assert config[name] == image[name], name  # the same as in the image
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert mounts == {"/tmp": "tmp", "/app/audio_chunks": "recordings", "/home/app/.cache/huggingface": "model-cache"}
    assert config["HF_HOME"] == "/home/app/.cache/huggingface"
    assert config["MODEL_CACHE_DIR"] == "/home/app/.cache/huggingface/converted"
    assert config["AUDIO_STORAGE_DIR"] == "/app/audio_chunks"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["recordings"]["emptyDir"] == {"sizeLimit": "20Gi"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "10Gi"}
    # The retention sweep keeps the records under the emptyDir's limit (GB = 10**9 bytes, Gi = 2**30).
    assert float(config["RETENTION_MAX_GB"]) * 10**9 < 20 * 2**30

    uid = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert uid is not None
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": int(uid[1]),
        "runAsGroup": int(uid[2]),
        "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False


def test_autoscaler_metric_and_scrape_path_are_served(rendered: Rendered, app: FastAPI) -> None:
    hpa = rendered.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "real-time-audio"}
    assert hpa["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "rta_session_load"},
                "target": {"type": "AverageValue", "averageValue": "700m"},
            },
        }
    ]
    assert hpa["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert hpa["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 600,
        "selectPolicy": "Min",
        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
    }
    monitor = rendered.one("ServiceMonitor")["spec"]
    assert monitor == {
        "selector": {"matchLabels": POD_LABELS},
        "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}],
    }
    service_labels = rendered.one("Service")["metadata"]["labels"]
    assert POD_LABELS.items() <= service_labels.items()  # the ServiceMonitor finds the Service

    response = TestClient(app).get(monitor["endpoints"][0]["path"])
    assert response.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    load = families[hpa["metrics"][0]["pods"]["metric"]["name"]]
    assert load.type == "gauge"
    assert [(sample.labels, sample.value) for sample in load.samples] == [({}, 0.0)]  # nothing open yet
    assert families["rta_max_sessions"].samples[0].value == 4

    # prometheus-adapter publishes that series per pod under the same name.
    adapter = yaml.safe_load((KUBERNETES / "prometheus-adapter-rules.yaml").read_text(encoding="utf-8"))
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"] == 'rta_session_load{namespace!="",pod!=""}'
    assert rule["name"] == {"matches": "^rta_session_load$", "as": "rta_session_load"}
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def nginx_seconds(value: str) -> int:
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)(s|m|h|d)?", value)
    assert match is not None, value
    return int(match[1]) * units[match[2] or ""]


def nginx_bytes(value: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    match = re.fullmatch(r"(\d+)([kmg])?", value.lower())
    assert match is not None, value
    return int(match[1]) * units[match[2] or ""]


# nginx directive in deploy/nginx/rta.conf -> ingress-nginx annotation, and how to compare them.
PROXY_SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "proxy_read_timeout": ("proxy-read-timeout", nginx_seconds),
    "proxy_send_timeout": ("proxy-send-timeout", nginx_seconds),
    "client_max_body_size": ("proxy-body-size", nginx_bytes),
    "proxy_connect_timeout": ("proxy-connect-timeout", nginx_seconds),
    "proxy_request_buffering": ("proxy-request-buffering", str),
    "proxy_buffering": ("proxy-buffering", str),
    "proxy_next_upstream": ("proxy-next-upstream", str),
}


def test_ingress_proxies_like_the_nginx_config(rendered: Rendered) -> None:
    assert NGINX_CONF.exists(), f"{NGINX_CONF} is missing: the Ingress's proxy settings are compared with it"
    text = re.sub(r"#.*", "", NGINX_CONF.read_text(encoding="utf-8"))
    ingress = rendered.one("Ingress")
    annotations = {
        key.removeprefix("nginx.ingress.kubernetes.io/"): value
        for key, value in ingress["metadata"]["annotations"].items()
    }
    compared = set()
    for directive, (annotation, parse) in PROXY_SETTINGS.items():
        values = {value.strip() for value in re.findall(rf"^\s*{directive}\s+([^;]+);", text, re.MULTILINE)}
        if not values:
            continue
        assert len(values) == 1, f"{directive}: {values}"
        assert parse(annotations[annotation]) == parse(values.pop()), directive
        compared.add(annotation)
    assert {"proxy-read-timeout", "proxy-send-timeout", "proxy-body-size"} <= compared
    assert set(annotations) == {setting[0] for setting in PROXY_SETTINGS.values()}  # none without its nginx twin
    assert annotations["proxy-read-timeout"] == annotations["proxy-send-timeout"] == "3600"
    assert annotations["proxy-body-size"] == "200m"
    assert nginx_bytes(annotations["proxy-body-size"]) == Settings.model_fields["max_upload_bytes"].default
    assert "MAX_UPLOAD_BYTES" not in rendered.config
    assert nginx_seconds(annotations["proxy-read-timeout"]) > Settings.model_fields["idle_timeout_s"].default

    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["transcribe.example.com"], "secretName": "rta-tls"}]
    (rule,) = spec["rules"]
    assert rule["host"] == "transcribe.example.com"
    for path in rule["http"]["paths"]:
        assert path["backend"] == {"service": {"name": "real-time-audio", "port": {"name": "http"}}}


def ingress_routes(path: str, rules: list[dict[str, Any]]) -> bool:
    """Whether an Ingress path (Exact or Prefix, by path element) takes this request path."""
    for rule in rules:
        for item in rule["http"]["paths"]:
            prefix = item["path"].rstrip("/")
            if item["pathType"] == "Exact" and path == item["path"]:
                return True
            if item["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/")):
                return True
    return False


def served(app: FastAPI, kind: str, path: str, method: str = "GET") -> bool:
    scope: dict[str, Any] = {"type": kind, "path": path, "root_path": "", "method": method, "headers": []}
    return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)


SESSION = "0123456789abcdef0123456789abcdef"
CLIENT_ROUTES = [
    ("http", "/", "GET"),
    ("http", "/static/app.js", "GET"),
    ("websocket", "/ws/transcribe", "GET"),
    ("websocket", "/ws/echo", "GET"),
    ("http", "/v1/audio/transcriptions", "POST"),
    ("http", f"/sessions/{SESSION}", "GET"),
    ("http", f"/sessions/{SESSION}/audio", "GET"),
    ("http", "/health", "GET"),
    ("http", "/ready", "GET"),
]


def test_ingress_publishes_the_client_routes_and_not_the_metrics(rendered: Rendered, app: FastAPI) -> None:
    rules = rendered.one("Ingress")["spec"]["rules"]
    for kind, path, method in CLIENT_ROUTES:
        assert served(app, kind, path, method), (kind, path)
        assert ingress_routes(path, rules), path
    assert served(app, "http", "/metrics")
    for path in ("/metrics", "/docs", "/openapi.json", "/redoc"):
        assert not ingress_routes(path, rules), path
    assert not served(app, "http", "/nowhere")  # the route check can fail


def test_network_policy_admits_the_ingress_controller_and_prometheus(rendered: Rendered) -> None:
    policy = rendered.one("NetworkPolicy")["spec"]
    assert policy["podSelector"] == {"matchLabels": POD_LABELS}
    assert POD_LABELS.items() <= rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    namespaces = [peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"]]
    assert namespaces == ["ingress-nginx", "monitoring"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
