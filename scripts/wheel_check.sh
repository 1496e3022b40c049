#!/usr/bin/env bash
# Packaging check: build a wheel from the tracked files against the torch of a
# venv, install it into a fresh venv that has the same torch, and run a smoke
# test from outside the source tree, so that a file left out of the wheel or of
# git, or a missing header, fails here rather than for a user.
#
#   bash scripts/wheel_check.sh [VENV]    # VENV: the torch to build against (default .venv)
#
# The fresh venv reaches the build venv's torch through a .pth file (no second
# copy of torch is installed) and gets kdfused only from the wheel.
# KDFUSED_EXPECT_CUDA=1 also requires a CUDA kernel for every kdfused op
# (scripts/cuda_build_check.sh sets it). MAX_JOBS limits the build's jobs.
set -euo pipefail

cd "$(dirname "$0")/.."
venv=${1:-${KDFUSED_VENV:-.venv}}
[ -x "$venv/bin/python" ] || { echo "no $venv/bin/python: run bash scripts/kdfused.sh test first" >&2; exit 1; }
py="$(cd "$venv" && pwd)/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Build from a copy of the tracked files: nothing lands in this tree, and a
# file that is needed but not in git fails the build.
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$work" --one-top-level=src
echo "== wheel: building against torch $("$py" -c 'import torch; print(torch.__version__)')"
"$py" -m pip install -q --disable-pip-version-check "setuptools>=64" wheel ninja
"$py" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
  -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/kdfused-*.whl)
"$py" - "$wheel" <<'PY'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
so = [n for n in names if n.startswith("kdfused/_C") and n.endswith(".so")]
assert len(so) == 1, f"the wheel must hold one compiled kdfused/_C*.so, has {so}"
print(f"built {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, {so[0]}")
PY

echo "== wheel: installing into a fresh venv that shares the build venv's torch"
"$py" -m venv "$work/fresh"
fresh="$work/fresh/bin/python"
torch_site=$("$py" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
fresh_site=$("$fresh" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$torch_site" > "$fresh_site/_build_venv_torch.pth"
"$fresh" -m pip install -q --disable-pip-version-check --no-deps "$wheel"

echo "== wheel: smoke test from outside the source tree"
src=$PWD
cd "$work"
"$fresh" -m kdfused --version
KDFUSED_SRC="$src" KDFUSED_FRESH_SITE="$fresh_site" "$fresh" -W ignore - <<'PY'
import json
import os

import torch

import kdfused
from kdfused import ops

where = os.path.dirname(kdfused.__file__)
assert where.startswith(os.environ["KDFUSED_FRESH_SITE"]), f"kdfused imported from {where}"
info = kdfused.build_info()
print(json.dumps(info))
assert info["compiled"] and "cpu" in info["devices"], info
assert info["kdfused"] != "0+unknown", info
assert info["built_with_torch"] == torch.__version__.split("+")[0], info

if os.environ.get("KDFUSED_EXPECT_CUDA") == "1":
    # Every op with per-device kernels (the others have one kernel for all devices).
    for name in [
        "kdfused::distill_forward",
        "kdfused::sparse_distill_forward",
        "kdfused::sparse_topk",
        "kdfused::distill_stats",
        "kdfused::distill_grad",
        "kdfused::distill_merge",
        "kdfused::sparse_shard_stats",
        "kdfused::sparse_shard_merge",
        "kdfused::sparse_shard_grad",
    ]:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name}: no {key}"
    assert ops.BUILT_DEVICES == {"cpu", "cuda"}, ops.BUILT_DEVICES
    assert info["cuda_archs"], info
    print("every op has CPU and CUDA kernels")

# The CPU kernel gives the reference's answer, loss and gradient.
g = torch.Generator().manual_seed(0)
s = torch.randn(64, 1000, generator=g, requires_grad=True)
t = torch.randn(64, 1000, generator=g)
y = torch.randint(0, 1000, (64,), generator=g)
y[::7] = -100
for divergence in ("forward_kl", "reverse_kl", "jsd"):
    loss = kdfused.FusedDistillLoss(divergence=divergence, backend="cpu")(s, t, y)
    s64 = s.detach().double().requires_grad_()
    ref = kdfused.reference.distill_loss(s64, t.double(), y, divergence=divergence)
    (got_grad,) = torch.autograd.grad(loss, s)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
teacher = kdfused.sparse.topk(t, 8)
assert torch.isfinite(kdfused.FusedDistillLoss()(s, teacher, y))
print("wheel smoke test passed: the installed kernels match the float64 reference")
PY
