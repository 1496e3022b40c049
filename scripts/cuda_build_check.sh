#!/usr/bin/env bash
# Compiles and links the CUDA kernels without a GPU: builds kdfused against a
# CUDA build of torch in its own virtualenv, then checks that the library loads
# and registers a CUDA kernel for every kdfused op. Fails on any build error.
# Skipped, with the reason printed, only where no CUDA toolkit exists.
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
py="$(cd "$venv" && pwd)/bin/python"  # absolute: the import check runs from /
pip() { "$py" -m pip --disable-pip-version-check "$@"; }
if ! "$py" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  echo "kdfused: installing ${KDFUSED_CUDA_TORCH:-torch==2.14.1} into $venv"
  # shellcheck disable=SC2086  # KDFUSED_CUDA_TORCH may hold several words
  pip install -q ${KDFUSED_CUDA_TORCH:-torch==2.14.1}
fi
pip install -q "setuptools>=64" wheel ninja

# Build from a copy of the tracked files, so that nothing lands in this tree
# (the CPU build's kdfused/_C*.so and build/ stay as they are).
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$src"
echo "kdfused: building with nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')," \
  "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
pip install -q --no-build-isolation --no-deps "$src"

# Import the installed copy (run from / so no source tree shadows it).
(cd / && "$py" -W ignore - <<'EOF'
import torch

import kdfused
from kdfused import ops

assert ops.LOAD_ERROR is None, f"kdfused._C failed to load: {ops.LOAD_ERROR}"
print(f"kdfused: loaded {kdfused.__file__} against torch {torch.__version__}")
# Every op with per-device kernels (the others have one kernel for all devices).
for name in [
    "kdfused::distill_forward",
    "kdfused::sparse_distill_forward",
    "kdfused::sparse_topk",
    "kdfused::distill_stats",
    "kdfused::distill_grad",
    "kdfused::distill_merge",
]:
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name}: no {key} kernel"
    print(f"kdfused: {name} has CPU and CUDA kernels")
assert ops.BUILT_DEVICES == {"cpu", "cuda"}, ops.BUILT_DEVICES

# The CPU kernel of this CUDA build still gives the reference's answer.
s = torch.randn(4, 33, requires_grad=True)
t = torch.randn(4, 33)
y = torch.tensor([0, 5, -100, 32])
loss = kdfused.fused_distill_loss(s, t, y, backend="cpu")
loss.backward()
s_ref = s.detach().clone().requires_grad_()
ref = kdfused.reference.distill_loss(s_ref, t, y)
ref.backward()
torch.testing.assert_close(loss, ref)
torch.testing.assert_close(s.grad, s_ref.grad)
print("kdfused: CUDA build OK (its CPU kernel matches the reference)")
EOF
)
