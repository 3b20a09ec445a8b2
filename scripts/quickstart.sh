#!/usr/bin/env bash
# sslops set-up and the two Quickstart jobs (README.md):
#   scripts/quickstart.sh train [sslops-train args...]   set up, then train on the embedded default
#   scripts/quickstart.sh test  [pytest args...]         set up, then run the test suite
#   scripts/quickstart.sh setup                          set up only
# Set-up: the system libraries ffcv builds against (apt; root or sudo), a venv
# (.venv, unless one is active), torch, then sslops with its train and test
# extras.  Each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-train}"; shift || true
say() { printf '\033[1m[quickstart]\033[0m %s\n' "$*"; }

system_libs() {
  if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then return; fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "quickstart: ffcv needs pkg-config libopencv-dev libturbojpeg0-dev; install them (root) and rerun" >&2; exit 1; }
    sudo="sudo"
  fi
  say "installing pkg-config libopencv-dev libturbojpeg0-dev (ffcv builds against them)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq pkg-config libopencv-dev libturbojpeg0-dev >/dev/null
}

python_env() {
  if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then say "creating .venv"; python3 -m venv .venv; fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
  fi
  if ! python -c "import torch" 2>/dev/null; then
    say "installing torch"
    python -m pip install -q --upgrade pip
    pip install -q torch numpy setuptools wheel ninja
  fi
  pip install -q setuptools wheel ninja >/dev/null 2>&1 || true
  if ! { python -c "import sslops._C, sslops.train, ffcv, pytest" && command -v sslops-train; } >/dev/null 2>&1; then
    say "installing sslops[train,test,bench] (compiles sslops._C: a few minutes)"
    pip install -q --no-build-isolation -e ".[train,test,bench]"
  fi
}

system_libs
python_env
case "$job" in
  setup) ;;
  train) exec sslops-train "$@" ;;
  test)  TRITON_INTERPRET=1 exec python -m pytest -q tests/ "$@" ;;
  *) echo "quickstart: unknown job '$job' (train, test or setup)" >&2; exit 2 ;;
esac
