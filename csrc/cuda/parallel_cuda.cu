// The CUDA launchers of the vocab-parallel ops (device code: parallel_kernel.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../parallel_op.h"
#include "parallel_kernel.cuh"

namespace kdfused {
namespace {

DistillProblem cuda_shard(KDFUSED_PHASE_ARGS) {
  DistillProblem prob = prepare_shard(student, teacher, labels, grad_scale, temperature, alpha,
                                      divergence, beta, ignore_index, scale_by_t2, label_smoothing,
                                      column_offset, vocab, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(prob.n <= std::numeric_limits<int32_t>::max(),
                    "kdfused: at most 2^31 - 1 rows per call, got N = ", text(prob.n));
  return prob;
}

// Calls body.template operator()<S, Tt>() for the problem's dtypes.
template <typename F>
void dispatch_pair(const DistillProblem& prob, F&& body) {
  KDFUSED_DISPATCH_LOGITS(prob.student.scalar_type(), "kdfused_phase_cuda", [&] {
    using S = scalar_t;
    KDFUSED_DISPATCH_LOGITS(prob.teacher.scalar_type(), "kdfused_phase_cuda",
                            [&] { body(S{}, scalar_t{}); });
  });
}

const int64_t* labels_of(const DistillProblem& prob) {
  return prob.labels ? prob.labels->const_data_ptr<int64_t>() : nullptr;
}

}  // namespace

at::Tensor distill_stats_cuda(KDFUSED_PHASE_ARGS) {
  const DistillProblem prob =
      cuda_shard(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                 ignore_index, scale_by_t2, label_smoothing, column_offset, vocab);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor out = at::empty({prob.n, 12}, prob.student.options().dtype(at::kFloat));
  if (prob.n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(prob, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    const int threads = cuda::block_threads(prob.v, cuda::pack_width<S, Tt>(), 1);
    cuda::shard_stats_kernel<S, Tt><<<static_cast<unsigned>(prob.n), threads, 0, stream>>>(
        prob.student.const_data_ptr<S>(), prob.teacher.const_data_ptr<Tt>(), prob.student.stride(0),
        prob.teacher.stride(0), labels_of(prob), prob.v, column_offset, vocab, prob.params,
        out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor distill_jsd_sums_cuda(KDFUSED_PHASE_ARGS, const at::Tensor& consts) {
  const DistillProblem prob =
      cuda_shard(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                 ignore_index, scale_by_t2, label_smoothing, column_offset, vocab);
  check_consts(consts, prob);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor out = at::empty({prob.n, 2}, prob.student.options().dtype(at::kFloat));
  if (prob.n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(prob, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    const int threads = cuda::block_threads(prob.v, cuda::pack_width<S, Tt>(), 1);
    cuda::shard_jsd_kernel<S, Tt><<<static_cast<unsigned>(prob.n), threads, 0, stream>>>(
        prob.student.const_data_ptr<S>(), prob.teacher.const_data_ptr<Tt>(), prob.student.stride(0),
        prob.teacher.stride(0), labels_of(prob), prob.v, prob.params,
        consts.const_data_ptr<float>(), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor distill_grad_cuda(KDFUSED_PHASE_ARGS, const at::Tensor& consts) {
  const DistillProblem prob =
      cuda_shard(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                 ignore_index, scale_by_t2, label_smoothing, column_offset, vocab);
  check_consts(consts, prob);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad = at::empty({prob.n, prob.v}, prob.student.options());
  if (prob.n == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(prob, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    const int threads = cuda::block_threads(prob.v, cuda::pack_width<S, Tt>(), 1);
    cuda::shard_grad_kernel<S, Tt><<<static_cast<unsigned>(prob.n), threads, 0, stream>>>(
        prob.student.const_data_ptr<S>(), prob.teacher.const_data_ptr<Tt>(), prob.student.stride(0),
        prob.teacher.stride(0), labels_of(prob),
        grad_scale ? grad_scale->const_data_ptr<float>() : nullptr, grad.data_ptr<S>(), prob.v,
        column_offset, prob.params, consts.const_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_merge_cuda(KDFUSED_MERGE_ARGS) {
  TORCH_CHECK_VALUE(shard_stats.dim() == 3 && shard_stats.size(2) == 12 &&
                        shard_stats.scalar_type() == at::kFloat && shard_stats.is_contiguous(),
                    "kdfused: shard_stats must be a contiguous [W, N, 12] float32 tensor, got ",
                    text(shard_stats));
  const int64_t w = shard_stats.size(0), n = shard_stats.size(1);
  const LossParams p = merge_params(shard_stats, labels, temperature, alpha, divergence, beta,
                                    ignore_index, scale_by_t2, label_smoothing);
  const c10::cuda::CUDAGuard guard(shard_stats.device());
  const auto opts = shard_stats.options();
  at::Tensor consts = at::empty({n, 11}, opts), hard = at::empty({n}, opts),
             soft = at::empty({n}, opts);
  if (n == 0) return {consts, hard, soft};
  const at::Tensor y = labels ? labels->contiguous() : at::Tensor();
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  cuda::merge_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      n, w, shard_stats.const_data_ptr<float>(), labels ? y.const_data_ptr<int64_t>() : nullptr, p,
      label_smoothing, consts.data_ptr<float>(), hard.data_ptr<float>(), soft.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {consts, hard, soft};
}

std::tuple<at::Tensor, at::Tensor> distill_jsd_finish_cuda(KDFUSED_JSD_FINISH_ARGS) {
  TORCH_CHECK_VALUE(shard_sums.dim() == 3 && shard_sums.size(2) == 2 &&
                        shard_sums.scalar_type() == at::kFloat && shard_sums.is_contiguous() &&
                        consts.dim() == 2 && consts.size(1) == 11 &&
                        consts.size(0) == shard_sums.size(1),
                    "kdfused: shard_sums must be [W, N, 2] and consts [N, 11] float32, got ",
                    text(shard_sums), " and ", text(consts));
  const int64_t w = shard_sums.size(0), n = shard_sums.size(1);
  const LossParams p = make_params(temperature, 0.0, Divergence::kJSD, beta, ignore_index,
                                   scale_by_t2, labels.has_value(), 0.0, 1);
  const c10::cuda::CUDAGuard guard(consts.device());
  at::Tensor out = consts.clone(at::MemoryFormat::Contiguous);
  at::Tensor soft = at::empty({n}, consts.options());
  if (n == 0) return {out, soft};
  const at::Tensor y = labels ? labels->contiguous() : at::Tensor();
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  cuda::jsd_finish_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      n, w, shard_sums.const_data_ptr<float>(), labels ? y.const_data_ptr<int64_t>() : nullptr, p,
      out.data_ptr<float>(), soft.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, soft};
}

}  // namespace kdfused
