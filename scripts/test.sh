#!/usr/bin/env bash
# The project's test command (README and CI): set up .venv, start the local SLURM when possible, run pytest.
#   bash scripts/test.sh [pytest args...]       (default: -q tests)
# SLURM that cannot start here (not root, no apt-get, ...) is reported and its tests skip with the reason.
# pytest's exit status is ours; "no tests collected" (5) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test || { echo "test.sh: setup failed" >&2; exit 1; }
if slurm_out=$(bash scripts/slurm.sh start 2>&1); then
  echo "test.sh: SLURM is up"
else
  reason=$(printf '%s\n' "$slurm_out" | grep 'slurm.sh:' | tail -1)
  export DIMR_LAB_SLURM_UNAVAILABLE="${reason:-scripts/slurm.sh start failed}"
  echo "test.sh: SLURM tests will skip: $DIMR_LAB_SLURM_UNAVAILABLE" >&2
  printf '%s\n' "$slurm_out" | tail -5 >&2
fi
if [ $# -eq 0 ]; then set -- -q tests; fi
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
