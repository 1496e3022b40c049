// The CUDA ops of the vocab-parallel phases: checks, outputs and the launches
// (parallel_launch.cuh) on the current stream (device code: parallel_kernel.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "../parallel_op.h"
#include "cuda_launcher.cuh"
#include "parallel_launch.cuh"

namespace kdfused {
namespace {

DistillProblem cuda_shard(KDFUSED_PHASE_ARGS) {
  DistillProblem prob = prepare_shard(KDFUSED_PHASE_NAMES, c10::DeviceType::CUDA);
  check_row_count(prob.n);
  return prob;
}

}  // namespace

at::Tensor distill_stats_cuda(KDFUSED_PHASE_ARGS) {
  const DistillProblem prob = cuda_shard(KDFUSED_PHASE_NAMES);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor out = at::empty({prob.n, 12}, prob.student.options().dtype(at::kFloat));
  cuda::launch_shard_stats(cuda::CudaLauncher{}, prob, column_offset, vocab, out);
  return out;
}

at::Tensor distill_jsd_sums_cuda(KDFUSED_PHASE_ARGS, const at::Tensor& consts) {
  const DistillProblem prob = cuda_shard(KDFUSED_PHASE_NAMES);
  check_consts(consts, prob);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor out = at::empty({prob.n, 2}, prob.student.options().dtype(at::kFloat));
  cuda::launch_shard_jsd(cuda::CudaLauncher{}, prob, consts, out);
  return out;
}

at::Tensor distill_grad_cuda(KDFUSED_PHASE_ARGS, const at::Tensor& consts) {
  const DistillProblem prob = cuda_shard(KDFUSED_PHASE_NAMES);
  check_consts(consts, prob);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad = at::empty({prob.n, prob.v}, prob.student.options());
  cuda::launch_shard_grad(cuda::CudaLauncher{}, prob, column_offset, consts, grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_merge_cuda(KDFUSED_MERGE_ARGS) {
  TORCH_CHECK_VALUE(shard_stats.dim() == 3 && shard_stats.size(2) == 12 &&
                        shard_stats.scalar_type() == at::kFloat && shard_stats.is_contiguous(),
                    "kdfused: shard_stats must be a contiguous [W, N, 12] float32 tensor, got ",
                    text(shard_stats));
  const int64_t n = shard_stats.size(1);
  const LossParams p = merge_params(shard_stats, labels, temperature, alpha, divergence, beta,
                                    ignore_index, scale_by_t2, label_smoothing);
  const c10::cuda::CUDAGuard guard(shard_stats.device());
  const auto opts = shard_stats.options();
  at::Tensor consts = at::empty({n, 11}, opts), hard = at::empty({n}, opts),
             soft = at::empty({n}, opts);
  cuda::launch_merge(cuda::CudaLauncher{}, shard_stats, labels, p, label_smoothing, consts, hard,
                     soft);
  return {consts, hard, soft};
}

std::tuple<at::Tensor, at::Tensor> distill_jsd_finish_cuda(KDFUSED_JSD_FINISH_ARGS) {
  TORCH_CHECK_VALUE(shard_sums.dim() == 3 && shard_sums.size(2) == 2 &&
                        shard_sums.scalar_type() == at::kFloat && shard_sums.is_contiguous() &&
                        consts.dim() == 2 && consts.size(1) == 11 &&
                        consts.size(0) == shard_sums.size(1),
                    "kdfused: shard_sums must be [W, N, 2] and consts [N, 11] float32, got ",
                    text(shard_sums), " and ", text(consts));
  const int64_t n = shard_sums.size(1);
  const LossParams p = make_params(temperature, 0.0, Divergence::kJSD, beta, ignore_index,
                                   scale_by_t2, labels.has_value(), 0.0, 1);
  const c10::cuda::CUDAGuard guard(consts.device());
  at::Tensor out = consts.clone(at::MemoryFormat::Contiguous);
  at::Tensor soft = at::empty({n}, consts.options());
  cuda::launch_jsd_finish(cuda::CudaLauncher{}, shard_sums, labels, p, out, soft);
  return {out, soft};
}

}  // namespace kdfused
