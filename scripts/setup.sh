#!/usr/bin/env bash
# Set up dimr-lab in ./.venv (idempotent): Python venv, torch + torchvision, the package and its extras.
#   bash scripts/setup.sh           # runtime (+ digits extra)
#   bash scripts/setup.sh --test    # also the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch and torchvision as a pair that imports together; other pairs are fine where they match.
TORCH_SPEC="${DIMR_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
EXTRAS="digits"
[ "${1:-}" = "--test" ] && EXTRAS="digits,test"
# the stamp names what was installed: another pyproject, torch spec or set of extras installs again
stamp=".venv/.dimr-lab-setup-$({ cat pyproject.toml; echo "$TORCH_SPEC"; } | sha1sum | cut -c1-12)-${EXTRAS}"
pip_install() {  # pip's own exit status, without its notes about index locations
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
}
if [ ! -e "$stamp" ]; then
  # torch's CUDA build with its libraries takes about 6 GiB: say so before pip fails half-way.
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    free_kib=$(df -Pk .venv | awk 'NR == 2 {print $4}')
    if [ -n "$free_kib" ] && [ "$free_kib" -lt $((7 * 1024 * 1024)) ]; then
      echo "setup.sh: $(pwd)/.venv needs about 7 GiB free for torch and its libraries; $((free_kib / 1024)) MiB left" >&2
      exit 2
    fi
  fi
  pip_install $TORCH_SPEC || { echo "setup.sh: pip could not install $TORCH_SPEC (see above)" >&2; exit 1; }
  pip_install -e ".[${EXTRAS}]" || { echo "setup.sh: pip could not install the package with [${EXTRAS}] (see above)" >&2; exit 1; }
  .venv/bin/python -c "import torch, torchvision, timm, torch_fidelity, submitit, dimr_lab" 
  touch "$stamp"
fi
