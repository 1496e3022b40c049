#!/usr/bin/env bash
# One entry point that does its own set-up: makes (or reuses) a virtualenv,
# installs torch only when that environment has none, builds kdfused against
# it, then runs what was asked.
#
#   bash scripts/kdfused.sh demo [demo options]   # python -m kdfused.demo
#   bash scripts/kdfused.sh lm-demo [options]      # python -m kdfused.lm_demo
#   bash scripts/kdfused.sh test [pytest options] # the whole test suite
#   bash scripts/kdfused.sh bench [pytest options] # the pytest-benchmark suite
#
# Environment: PYTHON (interpreter for the venv, default python3), KDFUSED_VENV
# (default .venv in the repo), KDFUSED_TORCH (pip requirement used when torch is
# missing, default torch==2.13.0; pass extra pip options in PIP_* variables).
set -euo pipefail

cd "$(dirname "$0")/.."
what=${1:-}
case "$what" in
  demo) extra=demo ;;
  lm-demo) extra=lm ;;
  test | bench) extra=test ;;  # one venv and build for both
  *) echo "usage: bash scripts/kdfused.sh demo|lm-demo|test|bench [options]" >&2; exit 2 ;;
esac
shift

venv=${KDFUSED_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "kdfused: creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "kdfused: no torch in $venv, installing ${KDFUSED_TORCH:-torch==2.13.0}"
  # shellcheck disable=SC2086  # KDFUSED_TORCH may hold several words
  pip install -q ${KDFUSED_TORCH:-torch==2.13.0}
fi
# Rebuild only when the sources or the package metadata changed since the last
# install of these extras into this venv (a build takes about a minute on 2 cores).
stamp="$venv/.kdfused-installed-$extra"
if [ ! -e "$stamp" ] || [ -n "$(find csrc setup.py pyproject.toml -newer "$stamp" | head -1)" ]; then
  pip install -q "setuptools>=64" wheel ninja
  echo "kdfused: building the extension (about a minute on 2 cores)"
  # --no-build-isolation: build against the torch above, never a fresh copy.
  pip install -q --no-build-isolation -e ".[$extra]"
  touch "$stamp"
fi

if [ "$what" = demo ]; then
  exec "$py" -m kdfused.demo "$@"
fi
if [ "$what" = lm-demo ]; then
  exec "$py" -m kdfused.lm_demo "$@"
fi
# -ra prints the reason of every skipped test.
if [ "$what" = bench ]; then
  exec "$py" -m pytest -ra -q -p no:cacheprovider benchmarks/test_bench.py "$@"
fi
exec "$py" -m pytest -ra -q "$@"
