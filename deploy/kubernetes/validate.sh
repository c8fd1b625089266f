#!/usr/bin/env bash
# Offline checks of the Kubernetes manifests, run by `make lint` (or alone, from anywhere):
#   1. render each overlay with kubectl's built-in kustomize;
#   2. check every object against the Kubernetes API schemas, strictly (an unknown field fails), for
#      the oldest and the newest Kubernetes version we support; the one custom resource
#      (ServiceMonitor) against the schema in validate_schemas.py; an object of any other kind fails;
#   3. run checkov's Kubernetes policies on the rendered output. The checks the manifests skip on
#      purpose are annotated on the object with their reasons (checkov.io/skipN in base/deployment.yaml).
# Needs kubectl and the validators of `make install-iac` (kubernetes-validate, checkov in .venv-iac).
#
# Settings: KUBECTL (default: kubectl), IAC_BIN (default: <repo>/.venv-iac/bin),
# KUBERNETES_VERSIONS (default: "1.30.0 1.37.0"; 1.30 is the first with the preStop sleep action on).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
KUBECTL="${KUBECTL:-kubectl}"
IAC_BIN="${IAC_BIN:-$root/.venv-iac/bin}"
case "$IAC_BIN" in /*) ;; *) IAC_BIN="$root/$IAC_BIN" ;; esac
read -r -a versions <<<"${KUBERNETES_VERSIONS:-1.30.0 1.37.0}"
overlays=(gpu cpu)

if ! command -v "$KUBECTL" >/dev/null 2>&1; then
  echo "validate.sh: $KUBECTL not found; install kubectl (kustomize is built in) or set KUBECTL" >&2
  exit 1
fi
for tool in python checkov; do
  if [ ! -x "$IAC_BIN/$tool" ]; then
    echo "validate.sh: $IAC_BIN/$tool not found; run \`make install-iac\` (or set IAC_BIN)" >&2
    exit 1
  fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

version_args=()
for version in "${versions[@]}"; do version_args+=(--kubernetes-version "$version"); done

for overlay in "${overlays[@]}"; do
  rendered="$work/rendered-$overlay.yaml"
  echo "== overlays/$overlay: kubectl kustomize"
  "$KUBECTL" kustomize "$here/overlays/$overlay" >"$rendered"

  echo "== overlays/$overlay: schemas (Kubernetes ${versions[*]}, strict)"
  "$IAC_BIN/python" "$here/validate_schemas.py" "${version_args[@]}" "$rendered" | sed "s#$work/##"

  echo "== overlays/$overlay: checkov"
  # --skip-download: no connection to the Prisma Cloud platform, only the policies in the package.
  (cd "$work" && "$IAC_BIN/checkov" --quiet --compact --skip-download --framework kubernetes \
    --file "rendered-$overlay.yaml")
done

# Not in the kustomization, but it should still be a valid Secret.
echo "== base/secret.example.yaml: schema"
"$IAC_BIN/python" "$here/validate_schemas.py" "${version_args[@]}" "$here/base/secret.example.yaml" | sed "s#$root/##"

echo "== checkov checks skipped on purpose (annotations in base/deployment.yaml):"
sed -n 's/^ *checkov\.io\/skip[0-9]*: "\(.*\)"$/   \1/p' "$here/base/deployment.yaml"
echo "== Kubernetes manifests: all checks passed"
