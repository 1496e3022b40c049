#!/usr/bin/env bash
# Compiles and links the CUDA kernels without a GPU: builds a kdfused wheel
# against a CUDA build of torch in its own virtualenv, installs it into a fresh
# venv sharing that torch, and checks that the library loads, registers a CUDA
# kernel for every kdfused op and that its CPU kernel matches the reference
# (scripts/wheel_check.sh). Fails on any build error. Skipped, with the reason
# printed, only where no CUDA toolkit exists.
#
# Environment: CUDA_HOME (default /usr/local/cuda), KDFUSED_CUDA_VENV (default
# .venv-cuda in the repo), KDFUSED_CUDA_TORCH (default torch==2.14.1, a CUDA
# 13.0 build), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS.
set -euo pipefail

cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "kdfused: SKIPPED the CUDA build check: no CUDA toolkit ($CUDA_HOME/bin/nvcc is missing)"
  exit 0
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}

venv=${KDFUSED_CUDA_VENV:-.venv-cuda}
if [ ! -x "$venv/bin/python" ]; then
  echo "kdfused: creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check "$@"; }
if ! "$py" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  echo "kdfused: installing ${KDFUSED_CUDA_TORCH:-torch==2.14.1} into $venv"
  # shellcheck disable=SC2086  # KDFUSED_CUDA_TORCH may hold several words
  pip install -q ${KDFUSED_CUDA_TORCH:-torch==2.14.1}
fi

# Build a wheel from the tracked files against this torch, install it into a
# fresh venv that shares it, check every op's CUDA kernel and smoke-test the CPU
# kernel from outside the tree (scripts/wheel_check.sh).
echo "kdfused: building with nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')," \
  "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
KDFUSED_EXPECT_CUDA=1 bash scripts/wheel_check.sh "$venv"
echo "kdfused: CUDA build OK"
