#!/usr/bin/env bash
# labkit's environment, made on first use and reused after:
#   bash scripts/env.sh setup          create/update it (idempotent)
#   bash scripts/env.sh run CMD...     run CMD with the environment's python (python -m CMD...)
#   bash scripts/env.sh lab [ARGS...]  JupyterLab on notebooks/ (adds --allow-root when run as root)
#
# Where: the active conda environment when it is called "labkit" (conda env create -f
# environment.yml), otherwise ./.venv (made with python3 -m venv). pip never replaces torch:
# whatever torch the environment has is pinned, and a fresh environment gets torch 2.13.0
# ($LABKIT_TORCH overrides), which on a machine without CUDA is the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."

# $LABKIT_PYTHON: an interpreter whose environment is already complete; used as it is, never
# installed into (the tests start `make lab` with the interpreter that runs them).
if [ -n "${LABKIT_PYTHON:-}" ]; then
  PY="$LABKIT_PYTHON"
elif [ "${CONDA_DEFAULT_ENV:-}" = "labkit" ] && [ -n "${CONDA_PREFIX:-}" ]; then
  PY="$CONDA_PREFIX/bin/python"
else
  PY=".venv/bin/python"
fi

setup() {
  if [ -n "${LABKIT_PYTHON:-}" ]; then
    ensure_data
    return
  fi
  if [ ! -x "$PY" ]; then
    echo "labkit: creating a virtual environment in .venv" >&2
    "${PYTHON:-python3}" -m venv .venv
  fi
  local stamp=".venv-setup-stamp"
  [ "$PY" = ".venv/bin/python" ] && stamp=".venv/.labkit-setup-stamp"
  if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt requirements-peers.txt ] \
     && [ "$stamp" -nt scripts/env.sh ]; then
    ensure_data
    return
  fi
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "labkit: installing torch==${LABKIT_TORCH:-2.13.0}" >&2
    "$PY" -m pip install -q "torch==${LABKIT_TORCH:-2.13.0}"
  fi
  local torch_version constraints
  torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  constraints=$(mktemp)
  echo "torch==$torch_version" > "$constraints"
  echo "labkit: installing labkit and its tools (torch pinned to $torch_version)" >&2
  "$PY" -m pip install -q -c "$constraints" -e ".[dev]"
  # Peer libraries are test oracles only. --no-deps: their own requirements would pull in
  # torchvision (a CUDA build here) or downgrade half the environment (torchattacks' requests pin).
  "$PY" -m pip install -q --no-deps -r requirements-peers.txt
  rm -f "$constraints"
  "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" \
    || { echo "labkit: torch was replaced; aborting" >&2; exit 1; }
  ensure_data
  touch "$stamp"
}

ensure_data() {
  if "$PY" -c "import labkit.data as d; d.fashion_mnist('test')" >/dev/null 2>&1; then
    return
  fi
  echo "labkit: Fashion-MNIST not found; installing the Debian package dataset-fashion-mnist" >&2
  apt_install dataset-fashion-mnist || {
    echo "labkit: could not install it here. Install dataset-fashion-mnist (Debian/Ubuntu), or put the" >&2
    echo "        four Fashion-MNIST IDX files in a folder and set LABKIT_DATA to it." >&2
  }
}

# The browser test (tests/test_browser.py) drives the distribution's chromium; without it, it skips.
ensure_chromium() {
  command -v chromium >/dev/null && return
  echo "labkit: chromium not found; installing the Debian package chromium (for the browser test)" >&2
  apt_install chromium || echo "labkit: could not install chromium here; tests/test_browser.py will be skipped" >&2
}

# The sandboxed grader (labkit.grade, tests/test_grade_redteam.py) runs each submission in
# bubblewrap; without it the grader warns and the red-team tests are skipped.
ensure_bubblewrap() {
  command -v bwrap >/dev/null && return
  echo "labkit: bwrap not found; installing the Debian package bubblewrap (for the sandboxed grader)" >&2
  apt_install bubblewrap || echo "labkit: could not install bubblewrap here; the grader's sandbox tests will be skipped" >&2
}

# apt-get install PACKAGE when we are root or have password-less sudo; fails otherwise.
apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  command -v apt-get >/dev/null && $sudo true 2>/dev/null || return 1
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$1"
}

case "${1:-}" in
  setup) setup ;;
  # only the tests need a browser and bubblewrap; `make lab` does not install them
  run) shift; setup; if [ "${1:-}" = pytest ]; then ensure_chromium; ensure_bubblewrap; fi; exec "$PY" -m "$@" ;;
  # JupyterLab refuses to start as root unless told --allow-root; containers and CI run as root
  lab) shift; setup; root=(); [ "$(id -u)" = 0 ] && root=(--allow-root)
       exec "$PY" -m jupyter lab ${root[@]+"${root[@]}"} "$@" notebooks/ ;;
  *) echo "usage: bash scripts/env.sh setup | run MODULE [ARGS...] | lab [ARGS...]" >&2; exit 2 ;;
esac
