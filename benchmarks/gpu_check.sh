#!/usr/bin/env bash
# The GPU machine's check, in one call of the device tool (see DEVELOPERS.md):
# build with all cores, the test suite on CUDA, and a short benchmark of
# kdfused against plain PyTorch eager, torch.compile and, when its wheel was
# carried in .whl/, Liger-Kernel. Everything lands under $OUT: gpu_check.log
# (all output), pytest.log, bench.md and bench.csv. Each stage has its own time
# limit, so the script ends within about 9 minutes whatever happens.
#
#   KDFUSED_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
#
# (.git does not travel to that machine, hence KDFUSED_COMMIT.) Options:
# GPU_CHECK_SIZES (default 8192x128256,4096x32000), GPU_CHECK_DTYPE (bfloat16),
# GPU_CHECK_TESTS (pytest arguments; default: the whole suite but the CUDA
# emulator's tests, which stand in for a GPU where there is none).
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
  test_args=(tests -m "not emulated")
fi
# pytest-xdist (on the GPU machine's image) spreads the suite over 8 workers.
python3 -c "import xdist" 2>/dev/null && test_args=(-n 8 "${test_args[@]}")
timeout 150 python3 -m pytest -q -ra -p no:cacheprovider "${test_args[@]}" 2>&1 \
  | tee "$out/pytest.log" | grep -v "^SKIPPED" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stage "benchmark"
timeout 150 python3 -m benchmarks.run --device cuda --dtype "${GPU_CHECK_DTYPE:-bfloat16}" \
  --sizes "${GPU_CHECK_SIZES:-8192x128256,4096x32000}" --modes full \
  --providers kdfused,eager,compile,liger --warmup 2 --reps 5 \
  --csv "$out/bench.csv" --md "$out/bench.md"
[ $? -eq 0 ] || status=1
for div in reverse_kl jsd; do
  timeout 60 python3 -m benchmarks.run --device cuda --dtype "${GPU_CHECK_DTYPE:-bfloat16}" \
    --sizes "${GPU_CHECK_SIZES:-8192x128256,4096x32000}" --modes full --divergence $div \
    --providers kdfused --warmup 2 --reps 5 --csv "$out/bench.csv" --md "$out/bench.md"
  [ $? -eq 0 ] || status=1
done

stage "done: status $status"
exit $status
