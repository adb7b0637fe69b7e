#!/usr/bin/env bash
# From a fresh Debian 12 / Ubuntu 24.04 machine to an anomaly alert delivered by Alertmanager:
# installs Prometheus and Alertmanager from the distribution if missing, the plugin into .venv,
# and runs `aiops-plugin demo` (real SMD history -> agent -> alert rules -> Alertmanager).
# Extra arguments go to `aiops-plugin demo` (e.g. --keep-running, --port 9108).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
packages=()
command -v prometheus >/dev/null || packages+=(prometheus)
command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null \
  || packages+=(prometheus-alertmanager)
python3 -c 'import ensurepip' 2>/dev/null || packages+=(python3-venv)
if [ "${#packages[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "error: the plugin needs Python 3.11+, python3 is $(python3 -V 2>&1)" >&2; exit 1; }
# a .venv left without pip (made before python3-venv was installed) is made again
.venv/bin/python -m pip --version >/dev/null 2>&1 || python3 -m venv --clear .venv
.venv/bin/python -m pip install -q -e .
exec .venv/bin/aiops-plugin demo "$@"
