// The CUDA op kdfused::distill_forward: checks, outputs and the launch
// (distill_launch.cuh) on the current stream (device code: distill_kernel.cuh).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include "../distill_op.h"
#include "cuda_launcher.cuh"
#include "distill_launch.cuh"

namespace kdfused {

DenseResult distill_cuda(KDFUSED_KERNEL_ARGS, bool compute_grad, const at::Tensor* grad_out,
                         double label_smoothing, bool student_entropy) {
  const DistillProblem prob =
      prepare_problem(KDFUSED_KERNEL_NAMES, c10::DeviceType::CUDA, label_smoothing);
  check_row_count(prob.n);
  const c10::cuda::CUDAGuard guard(student.device());
  auto [hard, soft, grad] = allocate_outputs(prob, compute_grad, grad_out);
  at::Tensor entropy = allocate_entropy(prob, student_entropy);
  cuda::launch_distill(cuda::CudaLauncher{}, prob, hard, soft, compute_grad ? &grad : nullptr,
                       student_entropy ? &entropy : nullptr);
  return {hard, soft, grad, entropy};
}

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in every pass of a .cu file.
#define KDFUSED_STRINGIFY2(...) #__VA_ARGS__
#define KDFUSED_STRINGIFY(...) KDFUSED_STRINGIFY2(__VA_ARGS__)
std::string cuda_build_config() {
  return "cuda=" + text(int64_t{CUDART_VERSION}) +
         ";cuda_archs=" KDFUSED_STRINGIFY(__CUDA_ARCH_LIST__);
}

}  // namespace kdfused
