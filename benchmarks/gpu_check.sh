#!/usr/bin/env bash
# The check for a machine with an NVIDIA GPU, in one command (CONTRIBUTING.md):
# build with all cores, the CUDA tests, a benchmark of kdfused against plain
# PyTorch eager, torch.compile and, when its wheel was carried in .whl/,
# Liger-Kernel, the fused-linear loss against Liger-Kernel's
# LigerFusedLinearJSDLoss and the matmuls alone, ncu's view of the kernel, and
# a sweep over V and N. Everything lands under $OUT: gpu_check.log (all
# output), pytest.log, bench.md, bench.csv, linear.{csv,md}, options.txt, sparse.txt, trl.txt,
# split<k>.{csv,md} (KDFUSED_CUDA_SPLIT = k), ncu.txt and ncu-split8.txt. Each stage has its own time limit; about 5 minutes when all
# goes well.
#
#   KDFUSED_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
#
# (KDFUSED_COMMIT names the commit in the output, for a copy of the tree
# without .git.) Options:
# GPU_CHECK_SIZES (default 8192x128256,4096x32000), GPU_CHECK_DTYPE (bfloat16),
# GPU_CHECK_TESTS (pytest arguments; default: every test with a CUDA case),
# GPU_CHECK_LINEAR_SIZES (fused-linear sizes NxHsxHtxV),
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

stage "tests"
if [ -n "${GPU_CHECK_TESTS:-}" ]; then
  read -ra test_args <<< "$GPU_CHECK_TESTS"
else
  # What runs on CUDA: every test with a CUDA case, and test_cuda.py. (The
  # CPU cases ran in CI; the emulator's tests stand in for a GPU.)
  test_args=(tests -m "not emulated" -k cuda)
fi
# pytest-xdist (where installed) spreads the suite over 8 workers,
# two CPU threads each (16 threads per worker starved the 16 cores).
python3 -c "import xdist" 2>/dev/null && test_args=(-n 8 "${test_args[@]}")
OMP_NUM_THREADS=2 timeout 150 python3 -m pytest -q -ra -p no:cacheprovider "${test_args[@]}" 2>&1 \
  | tee "$out/pytest.log" | grep -v "^SKIPPED" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

bench() {  # bench SECONDS ARGS...: one run of the CLI, appended to bench.csv / bench.md
  local limit=$1
  shift
  timeout "$limit" python3 -m benchmarks.run --device cuda --dtype "${GPU_CHECK_DTYPE:-bfloat16}" \
    --modes full --warmup 2 --reps 7 --csv "$out/bench.csv" --md "$out/bench.md" "$@"
  [ $? -eq 0 ] || status=1
}

stage "benchmark"
sizes=${GPU_CHECK_SIZES:-8192x128256,4096x32000}
bench 150 --sizes "$sizes" --providers kdfused,eager,compile,liger
for div in reverse_kl jsd; do
  bench 60 --sizes "$sizes" --divergence $div --providers kdfused,liger
done
# T = 1 takes the hard term's softmax from p_s as T = 2 does (dd9583a): the
# same time as the T = 2 row is the expectation.
bench 60 --sizes 8192x128256 --temperature 1.0 --providers kdfused

stage "fused-linear: 8192 tokens, Hs 2048, Ht 4096, V 128256 (kdfused, dense, Liger-Kernel, matmul floor)"
for div in forward_kl jsd; do
  timeout 150 python3 -m benchmarks.linear --device cuda --dtype "${GPU_CHECK_DTYPE:-bfloat16}" \
    --sizes "${GPU_CHECK_LINEAR_SIZES:-8192x2048x4096x128256}" --divergence $div --warmup 1 \
    --reps 5 --providers kdfused,kdfused-dense,liger,matmuls \
    --csv "$out/linear.csv" --md "$out/linear.md"
  [ $? -eq 0 ] || status=1
done

stage "options: label smoothing and a padded teacher against the default step, 8192 x 128256"
timeout 60 python3 -m benchmarks.options --device cuda --dtype bfloat16 --sizes 8192x128256 \
  --reps 9 | tee "$out/options.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stage "sparse teacher: step with the top 64 against the dense step, top-k against torch, 8192 x 128256"
timeout 90 python3 -m benchmarks.sparse --device cuda --dtype bfloat16 --sizes 8192x128256 \
  --k 64 --reps 9 --no-eager | tee "$out/sparse.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "-- ragged rows (lengths uniform in [1, 64]) against fixed rows of the mean length and of 64"
timeout 90 python3 -m benchmarks.sparse --device cuda --dtype bfloat16 --sizes 8192x128256 \
  --k 64 --reps 9 --no-eager --ragged | tee -a "$out/sparse.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stage "trainers: TRL's DistillationTrainer loss step, its own path against kdfused.trl's (bf16, V 151936)"
# Needs trl, transformers, accelerate and datasets importable (wheels in .whl/).
if python3 -c "import trl, transformers, accelerate, datasets" 2> /dev/null; then
  timeout 120 python3 -m benchmarks.trainers trl --device cuda --dtype bfloat16 --vocab 151936 \
    --student-hidden 896 --teacher-hidden 1536 --batch 8 --completion 512 --reps 5 \
    | tee "$out/trl.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "skipped: trl, transformers, accelerate or datasets cannot be imported here"
fi

stage "row split (KDFUSED_CUDA_SPLIT = blocks per row): 8192 x 128256, one CSV per split"
for k in 1 2 4 8 16; do
  echo "-- KDFUSED_CUDA_SPLIT=$k"
  KDFUSED_CUDA_SPLIT=$k timeout 60 python3 -m benchmarks.run --device cuda --dtype bfloat16 \
    --modes full --warmup 2 --reps 7 --sizes 8192x128256 --providers kdfused \
    --divergence forward_kl,jsd --interleave --csv "$out/split$k.csv" --md "$out/split$k.md" \
    | grep "^provider="
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

stage "ncu: one launch at 8192 x 128256 bf16 (what limits it)"
if command -v ncu > /dev/null; then
  cat > /tmp/one_step.py <<'PY'
import torch, kdfused
s = torch.randn(8192, 128256, device="cuda", dtype=torch.bfloat16).mul_(3)
t = torch.randn(8192, 128256, device="cuda", dtype=torch.bfloat16).mul_(3)
y = torch.randint(0, 128256, (8192,), device="cuda")
torch.ops.kdfused.distill_forward.default(s, t, y, None, 2.0, 0.5, "forward_kl", 0.5, -100, True, True)
torch.cuda.synchronize()
PY
  timeout 90 ncu --clock-control none -k regex:distill \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
    --section InstructionStats \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,smsp__inst_executed.sum \
    python3 /tmp/one_step.py > "$out/ncu.txt" 2>&1
  grep -E "distill_|Duration|DRAM Throughput|L2 Cache Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|dram__bytes|lts__t_sector_hit|smsp__inst_executed.sum|Issue Slots Busy" "$out/ncu.txt" | head -30
  echo "-- the same launch split over 8 blocks per row (KDFUSED_CUDA_SPLIT=8)"
  KDFUSED_CUDA_SPLIT=8 timeout 90 ncu --clock-control none -k regex:distill \
    --section SpeedOfLight --section Occupancy --section WarpStateStats \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,smsp__inst_executed.sum \
    python3 /tmp/one_step.py > "$out/ncu-split8.txt" 2>&1
  grep -E "distill_|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|dram__bytes|lts__t_sector_hit|smsp__inst_executed.sum" "$out/ncu-split8.txt" | head -20
else
  echo "no ncu on this machine"
fi

stage "sweep over V and N (no torch.compile: it recompiles for every shape)"
bench 120 --sizes "${GPU_CHECK_SWEEP:-8192x32000,8192x65536,8192x262144,1024x128256,2048x128256,16384x128256}" \
  --providers kdfused,eager,liger

stage "done: status $status"
exit $status
