// kdfused_emulated::distill_forward: the CUDA kernel of csrc/cuda/ run on CPU
// tensors by cuda_emulator.h, behind the same schema and the same launch
// configuration logic as the real CUDA op (csrc/cuda/distill_cuda.cu), row
// splits (KDFUSED_CUDA_SPLIT) included.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "distill_op.h"
// clang-format off: the emulator must come after the torch headers
#include "cuda_emulator.h"
#include "cuda/distill_kernel.cuh"
// clang-format on

namespace kdfused {
namespace {

DistillResult distill_emulated(KDFUSED_KERNEL_ARGS, bool compute_grad, const at::Tensor* grad_out,
                               double label_smoothing) {
  const DistillProblem prob =
      prepare_problem(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                      ignore_index, scale_by_t2, c10::DeviceType::CPU, label_smoothing);
  auto [hard, soft, grad] = allocate_outputs(prob, compute_grad, grad_out);
  if (prob.n == 0) return {hard, soft, grad};
  emu::failed_asserts = 0;
  KDFUSED_DISPATCH_LOGITS(prob.student.scalar_type(), "kdfused_emulated", [&] {
    using S = scalar_t;
    KDFUSED_DISPATCH_LOGITS(prob.teacher.scalar_type(), "kdfused_emulated", [&] {
      using Tt = scalar_t;
      const S* s = prob.student.const_data_ptr<S>();
      const Tt* t = prob.teacher.const_data_ptr<Tt>();
      const int64_t* y = prob.labels ? prob.labels->const_data_ptr<int64_t>() : nullptr;
      const float* scale = grad_scale ? grad_scale->const_data_ptr<float>() : nullptr;
      S* g = compute_grad ? grad.data_ptr<S>() : nullptr;
      // As the CUDA launcher: a cluster of KDFUSED_CUDA_SPLIT blocks per row.
      const int parts = cuda::requested_split();
      emu::launch(static_cast<unsigned>(prob.n * parts),
                  cuda::block_threads(prob.v, cuda::pack_width<S, Tt>(), parts),
                  static_cast<unsigned>(parts),
                  parts > 1 ? &cuda::distill_rows_kernel<S, Tt, true>
                            : &cuda::distill_rows_kernel<S, Tt, false>,
                  s, t, prob.student.stride(0), prob.teacher.stride(0), y, scale,
                  hard.data_ptr<float>(), soft.data_ptr<float>(), g, prob.v, prob.params);
    });
  });
  // What CUDA reports at the next synchronisation after a device-side assert.
  TORCH_CHECK(emu::failed_asserts == 0,
              "CUDA error: device-side assert triggered (emulated: ", emu::first_failed, ")");
  return {hard, soft, grad};
}

}  // namespace
}  // namespace kdfused

TORCH_LIBRARY(kdfused_emulated, m) {
  m.def(kdfused::kDistillForwardSchema);
  m.def(kdfused::kDistillForwardOutSchema);
}

TORCH_LIBRARY_IMPL(kdfused_emulated, CPU, m) {
  m.impl("distill_forward", &kdfused::distill_forward_op<kdfused::distill_emulated>);
  m.impl("distill_forward_out", &kdfused::distill_forward_out_op<kdfused::distill_emulated>);
}
