#!/usr/bin/env bash
# Set up privasr on a fresh machine: system packages, a virtualenv at .venv, the project (editable).
# Usage: bash setup.sh            (idempotent: a second run only checks)
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
for tool in espeak-ng sox flite; do
  command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool")
done
python3 -c "import ensurepip, venv" 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import privasr, torch, speechbrain, opacus" 2>/dev/null \
   || [ setup.py -nt .venv/.privasr-installed ]; then
  echo "[setup] installing privasr and its pinned stack into .venv (torch comes from the local wheel cache)"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import privasr, torch, torchaudio, speechbrain, opacus, dp_accounting"
  touch .venv/.privasr-installed
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, speechbrain; print("torch", torch.__version__, "speechbrain", speechbrain.__version__)')"
