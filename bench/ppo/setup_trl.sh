#!/usr/bin/env bash
# TRL 0.29.1 for bench/ppo, in its own virtual environment.
#
# TRL 1.x removed PPOTrainer; 0.29.1 is the last line that ships it (as
# trl.experimental.ppo), and it conflicts with the trl 1.16 of the project's
# `bench` extra. So it lives in .cache/bench-trl-venv, which sees the project
# venv's packages through a .pth file (the same torch 2.13.0 CPU build,
# transformers 4.57.6, accelerate and peft that our trainer runs on) and adds
# only trl and datasets. The project venv is never written to.
#
# Prints the venv's python. Idempotent.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PROJECT_PY=${PROJECT_PY:-$ROOT/.venv/bin/python}
VENV=${TRL_VENV:-$ROOT/.cache/bench-trl-venv}
if "$VENV/bin/python" -c "import sys, trl, datasets; sys.exit(trl.__version__ != '0.29.1')" 2>/dev/null; then
  echo "$VENV/bin/python"
  exit 0
fi
BASE=$("$PROJECT_PY" -c "import sys; print(sys.base_prefix)")
PYVER=$("$PROJECT_PY" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
"$BASE/bin/python$PYVER" -m venv "$VENV" >&2
PROJECT_SITE=$("$PROJECT_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
OWN_SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PROJECT_SITE" > "$OWN_SITE/project-venv.pth"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "trl==0.29.1" "datasets==5.0.1" >&2
"$VENV/bin/python" -c "import trl, torch, transformers; from trl.experimental.ppo import PPOTrainer" >&2
echo "$VENV/bin/python"
