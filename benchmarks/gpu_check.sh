#!/usr/bin/env bash
# The GPU machine's check, in one call of the device tool (see DEVELOPERS.md):
# build with all cores, the CUDA tests, a benchmark of kdfused's two CUDA
# kernels against plain PyTorch eager, torch.compile and, when its wheel was
# carried in .whl/, Liger-Kernel, a sweep over V and N, and ncu's view of both
# kernels. Everything lands under $OUT: gpu_check.log (all output), pytest.log,
# bench.md, bench.csv and ncu.txt. Each stage has its own time
# limit, so the script ends within about 10 minutes whatever happens; about
# 5 when all goes well.
#
#   KDFUSED_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
#
# (.git does not travel to that machine, hence KDFUSED_COMMIT.) Options:
# GPU_CHECK_SIZES (default 8192x128256,4096x32000), GPU_CHECK_DTYPE (bfloat16),
# GPU_CHECK_TESTS (pytest arguments; default: every test with a CUDA case),
# GPU_CHECK_SWEEP (the sizes of the sweep over V and N).
set -uo pipefail

cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 KDFUSED_COMMIT=${KDFUSED_COMMIT:-unknown}
status=0
stage() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "commit $KDFUSED_COMMIT, $(nproc) cores"

if compgen -G ".whl/*.whl" > /dev/null; then
  stage "carried wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  ls .whl
fi

stage "build (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0)"
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
start=$SECONDS
if ! timeout 180 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e .; then
  echo "BUILD FAILED"
  exit 1
fi
echo "built in $((SECONDS - start)) s"
python3 -c "from kdfused import ops; print('kdfused kernels for', sorted(ops.BUILT_DEVICES)); assert ops.has_kernel('cuda'), ops.LOAD_ERROR"
[ $? -eq 0 ] || status=1

stage "resident kernel smoke: both kernels on one problem, in a child with a time limit"
# A fault or a hang of the (then never run) resident kernel must not take the
# tests and the baseline benchmark with it: without a pass here the resident
# kernel is left out of everything below.
resident=1
timeout 60 python3 - <<'PY' || resident=0
import os, torch
def run(kernel, n, v):
    os.environ["KDFUSED_CUDA_KERNEL"] = kernel
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(n, v, device="cuda", generator=g).mul_(3).bfloat16()
    t = torch.randn(n, v, device="cuda", generator=g).mul_(3).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    out = torch.ops.kdfused.distill_forward.default(s, t, y, None, 2.0, 0.5, "forward_kl", 0.5, -100, True, True)
    torch.cuda.synchronize()
    return out
import kdfused  # noqa: F401  (registers the ops)
for n, v in ((8192, 128256), (4096, 32000), (33, 4096)):
    a, b = run("stream", n, v), run("resident", n, v)
    for x, z in zip(a, b):
        err = (x.float() - z.float()).abs().max().item()
        print(f"{n}x{v}: max |stream - resident| = {err:.3g}")
        assert err <= 1e-2 * max(1.0, x.float().abs().max().item()), err
print("resident smoke OK")
PY
echo "resident kernel in the run: $resident"

stage "tests"
if [ -n "${GPU_CHECK_TESTS:-}" ]; then
  read -ra test_args <<< "$GPU_CHECK_TESTS"
else
  # What runs on CUDA: every test with a CUDA case, and test_cuda.py. (The
  # CPU cases ran in CI; the emulator's tests stand in for a GPU.)
  test_args=(tests -m "not emulated" -k cuda)
fi
# KDFUSED_CUDA_KERNEL=auto: the register-resident kernel wherever it fits, the
# streaming one elsewhere (odd V, offset views) and where a test forces it;
# the default once this passes (csrc/cuda/distill_kernel.cuh).
[ "$resident" = 1 ] && export KDFUSED_CUDA_KERNEL=auto
# pytest-xdist (on the GPU machine's image) spreads the suite over 8 workers,
# two CPU threads each (16 threads per worker starved the 16 cores).
python3 -c "import xdist" 2>/dev/null && test_args=(-n 8 "${test_args[@]}")
OMP_NUM_THREADS=2 timeout 180 python3 -m pytest -q -ra -p no:cacheprovider "${test_args[@]}" 2>&1 \
  | tee "$out/pytest.log" | grep -v "^SKIPPED" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
unset KDFUSED_CUDA_KERNEL

bench() {  # bench SECONDS ARGS...: one run of the CLI, appended to bench.csv / bench.md
  local limit=$1
  shift
  timeout "$limit" python3 -m benchmarks.run --device cuda --dtype "${GPU_CHECK_DTYPE:-bfloat16}" \
    --modes full --warmup 2 --reps 7 --csv "$out/bench.csv" --md "$out/bench.md" "$@"
  [ $? -eq 0 ] || status=1
}

# The resident variants run in their own processes (a fault there ends only
# that process), each beside the default kdfused again for the ratio.
stage "benchmark"
sizes=${GPU_CHECK_SIZES:-8192x128256,4096x32000}
bench 150 --sizes "$sizes" --providers kdfused,eager,compile,liger
[ "$resident" = 1 ] && bench 60 --sizes "$sizes" --providers kdfused,kdfused-resident,kdfused-resident-c8
for div in reverse_kl jsd; do
  bench 60 --sizes "$sizes" --divergence $div --providers kdfused,liger
  [ "$resident" = 1 ] && bench 60 --sizes "$sizes" --divergence $div --providers kdfused,kdfused-resident
done

stage "sweep over V and N (no torch.compile: it recompiles for every shape)"
sweep=${GPU_CHECK_SWEEP:-8192x32000,8192x65536,8192x262144,1024x128256,2048x128256,16384x128256}
[ "$resident" = 1 ] && bench 60 --sizes "$sweep" --providers kdfused,kdfused-resident
bench 120 --sizes "$sweep" --providers kdfused,eager,liger

stage "ncu: one launch of each kernel at 8192 x 128256 bf16 (what limits it)"
if command -v ncu > /dev/null && [ "$resident" = 1 ]; then
  cat > /tmp/one_step.py <<'PY'
import os, torch, kdfused
s = torch.randn(8192, 128256, device="cuda", dtype=torch.bfloat16).mul_(3)
t = torch.randn(8192, 128256, device="cuda", dtype=torch.bfloat16).mul_(3)
y = torch.randint(0, 128256, (8192,), device="cuda")
for kernel in ("auto", "auto", "stream", "stream"):  # resident, streaming
    os.environ["KDFUSED_CUDA_KERNEL"] = kernel
    torch.ops.kdfused.distill_forward.default(s, t, y, None, 2.0, 0.5, "forward_kl", 0.5, -100, True, True)
torch.cuda.synchronize()
PY
  timeout 90 ncu --clock-control none -k regex:distill --launch-skip 1 --launch-count 3 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    python3 /tmp/one_step.py > "$out/ncu.txt" 2>&1
  grep -E "distill_|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Block Size|Cluster Size" "$out/ncu.txt" | head -40
else
  echo "no ncu on this machine"
fi

stage "done: status $status"
exit $status
