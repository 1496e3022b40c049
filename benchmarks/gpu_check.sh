#!/usr/bin/env bash
# The GPU machine's check, in one call of the device tool (see DEVELOPERS.md):
# build with all cores, a timed smoke of each CUDA kernel variant, the CUDA
# tests (under the lean variant, then the default), a benchmark of kdfused's
# variants (benchmarks/providers.py) against plain PyTorch eager, torch.compile
# and, when its wheel was carried in .whl/, Liger-Kernel, ncu's view of each
# kernel, and a sweep over V and N. Everything lands under $OUT: gpu_check.log
# (all output), pytest.log, bench.md, bench.csv and ncu.txt. Each stage has
# its own time limit; about 5 minutes when all goes well.
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

stage "kernel smoke: the variants against the streaming kernel on one problem, in a child with a time limit"
# A fault or a hang of a variant must not take the tests and the baseline
# benchmark with it: a variant without a pass here is left out below.
cat > /tmp/smoke.py <<'PY'
import os, sys, torch
import kdfused  # noqa: F401  (registers the ops)
def run(kernel, n, v):
    os.environ["KDFUSED_CUDA_KERNEL"] = kernel
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(n, v, device="cuda", generator=g).mul_(3).bfloat16()
    t = torch.randn(n, v, device="cuda", generator=g).mul_(3).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    out = torch.ops.kdfused.distill_forward.default(s, t, y, None, 2.0, 0.5, "forward_kl", 0.5, -100, True, True)
    torch.cuda.synchronize()
    return out
for n, v in ((8192, 128256), (4096, 32000), (33, 4096)):
    a, b = run("stream", n, v), run(sys.argv[1], n, v)
    for x, z in zip(a, b):
        err = (x.float() - z.float()).abs().max().item()
        print(f"{sys.argv[1]} {n}x{v}: max |stream - variant| = {err:.3g}")
        assert err <= 1e-2 * max(1.0, x.float().abs().max().item()), err
print(sys.argv[1], "smoke OK")
PY
lean=1
resident=1
timeout 60 python3 /tmp/smoke.py lean || lean=0
timeout 60 python3 /tmp/smoke.py resident || resident=0
echo "in the run: lean $lean, resident $resident"

stage "tests"
if [ -n "${GPU_CHECK_TESTS:-}" ]; then
  read -ra test_args <<< "$GPU_CHECK_TESTS"
else
  # What runs on CUDA: every test with a CUDA case, and test_cuda.py. (The
  # CPU cases ran in CI; the emulator's tests stand in for a GPU.)
  test_args=(tests -m "not emulated" -k cuda)
fi
# pytest-xdist (on the GPU machine's image) spreads the suite over 8 workers,
# two CPU threads each (16 threads per worker starved the 16 cores).
python3 -c "import xdist" 2>/dev/null && test_args=(-n 8 "${test_args[@]}")
pytest_run() {  # pytest_run KERNEL LIMIT: the suite with KDFUSED_CUDA_KERNEL=KERNEL ("" = default)
  echo "-- KDFUSED_CUDA_KERNEL=${1:-(default)}"
  env ${1:+KDFUSED_CUDA_KERNEL=$1} OMP_NUM_THREADS=2 timeout "$2" python3 -m pytest -q -ra -p no:cacheprovider \
    "${test_args[@]}" 2>&1 | tee -a "$out/pytest.log" | grep -v "^SKIPPED" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
# The variant under measurement over the whole suite, then the default.
[ "$lean" = 1 ] && pytest_run lean 120
pytest_run "" 120

bench() {  # bench SECONDS ARGS...: one run of the CLI, appended to bench.csv / bench.md
  local limit=$1
  shift
  timeout "$limit" python3 -m benchmarks.run --device cuda --dtype "${GPU_CHECK_DTYPE:-bfloat16}" \
    --modes full --warmup 2 --reps 7 --csv "$out/bench.csv" --md "$out/bench.md" "$@"
  [ $? -eq 0 ] || status=1
}

stage "benchmark"
sizes=${GPU_CHECK_SIZES:-8192x128256,4096x32000}
variants=kdfused
[ "$lean" = 1 ] && variants=kdfused,kdfused-lean,kdfused-lean-r2,kdfused-lean-r1
bench 150 --sizes "$sizes" --providers "$variants,eager,compile,liger"
for div in reverse_kl jsd; do
  bench 60 --sizes "$sizes" --divergence $div --providers "$variants,liger"
done

stage "ncu: one launch of each kernel at 8192 x 128256 bf16 (what limits it)"
if command -v ncu > /dev/null; then
  cat > /tmp/one_step.py <<'PY'
import os, torch, kdfused
s = torch.randn(8192, 128256, device="cuda", dtype=torch.bfloat16).mul_(3)
t = torch.randn(8192, 128256, device="cuda", dtype=torch.bfloat16).mul_(3)
y = torch.randint(0, 128256, (8192,), device="cuda")
for kernel in os.environ["NCU_KERNELS"].split():
    os.environ["KDFUSED_CUDA_KERNEL"], _, rows = kernel.partition("/")
    os.environ.pop("KDFUSED_CUDA_ROWS_PER_SM", None)
    if rows:
        os.environ["KDFUSED_CUDA_ROWS_PER_SM"] = rows
    torch.ops.kdfused.distill_forward.default(s, t, y, None, 2.0, 0.5, "forward_kl", 0.5, -100, True, True)
torch.cuda.synchronize()
PY
  kernels="stream"
  [ "$lean" = 1 ] && kernels="$kernels lean lean/2"
  [ "$resident" = 1 ] && kernels="$kernels resident"
  echo "kernels, in launch order: $kernels"
  NCU_KERNELS=$kernels timeout 150 ncu --clock-control none -k regex:distill \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
    --section InstructionStats \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,smsp__inst_executed.sum \
    python3 /tmp/one_step.py > "$out/ncu.txt" 2>&1
  grep -E "distill_|Duration|DRAM Throughput|L2 Cache Throughput|Compute \(SM\)|Achieved Occupancy|dram__bytes|lts__t_sector_hit|smsp__inst_executed.sum|Issue Slots Busy|Stall|Warp Cycles Per Issued" "$out/ncu.txt" | head -80
else
  echo "no ncu on this machine"
fi

stage "sweep over V and N (kdfused's variants; the other providers at 3209248)"
sweep=${GPU_CHECK_SWEEP:-8192x32000,8192x65536,8192x262144,1024x128256,2048x128256,16384x128256}
bench 60 --sizes "$sweep" --providers "$variants"

stage "done: status $status"
exit $status
