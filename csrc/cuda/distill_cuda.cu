// The CUDA launcher of kdfused::distill_forward: checks, outputs, dtype
// dispatch and the launch on the current stream (device code: distill_kernel.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "../distill_op.h"
#include "distill_kernel.cuh"

namespace kdfused {
namespace {

using cuda::block_threads;
using cuda::distill_rows_kernel;
using cuda::pack_width;
using cuda::requested_split;

// compute() for this device and key the first time, the remembered value
// after: device queries stay off the launch path (and out of graph captures
// after the first call).
template <typename Key, typename Compute>
auto once_per_device(const Key& key, Compute compute) {
  using Value = decltype(compute());
  static std::mutex mutex;
  static std::map<std::pair<int, Key>, Value> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find({device, key});
  if (found != known.end()) return found->second;
  return known[{device, key}] = compute();
}

// A launch of `blocks` blocks in clusters of `parts` (not copyable: config
// points into it).
struct ClusterLaunch {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute cluster{};

  ClusterLaunch(int64_t blocks, int threads, int parts, cudaStream_t stream) {
    config.gridDim = dim3(static_cast<unsigned>(blocks));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.stream = stream;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = static_cast<unsigned>(parts);
    cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// Blocks per row: the requested parts where the kernel was compiled for sm_90
// or later, the grid stays within 2^31 - 1 blocks and the device schedules such
// clusters at all (above 8 blocks only once the kernel is allowed non-portable
// sizes); else 1.
template <typename Kernel>
int split_for(Kernel kernel, int64_t n, int parts, int threads) {
  if (parts == 1 || n > std::numeric_limits<int32_t>::max() / parts) return 1;
  const bool ok = once_per_device(std::make_pair(parts, threads), [&] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    if (attributes.binaryVersion < 90) return false;
    if (parts > cuda::kPortableSplit &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
            cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    const ClusterLaunch one(parts, threads, parts, nullptr);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &one.config) != cudaSuccess) {
      (void)cudaGetLastError();  // an unsupported shape: not schedulable
      return false;
    }
    return clusters > 0;
  });
  return ok ? parts : 1;
}

template <typename S, typename Tt>
void launch(const DistillProblem& prob, const std::optional<at::Tensor>& grad_scale,
            at::Tensor& hard, at::Tensor& soft, at::Tensor& grad, bool compute_grad) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int width = pack_width<S, Tt>();
  const auto split_kernel = distill_rows_kernel<S, Tt, true>;
  int parts = requested_split();
  if (parts > 1) {
    parts = split_for(split_kernel, prob.n, parts, block_threads(prob.v, width, parts));
  }
  const auto kernel = parts > 1 ? split_kernel : distill_rows_kernel<S, Tt, false>;
  const int threads = block_threads(prob.v, width, parts);
  const S* student = prob.student.const_data_ptr<S>();
  const Tt* teacher = prob.teacher.const_data_ptr<Tt>();
  const int64_t* labels = prob.labels ? prob.labels->const_data_ptr<int64_t>() : nullptr;
  const float* scale = grad_scale ? grad_scale->const_data_ptr<float>() : nullptr;
  S* g = compute_grad ? grad.data_ptr<S>() : nullptr;
  if (parts > 1) {
    const ClusterLaunch config(prob.n * parts, threads, parts, stream);
    C10_CUDA_CHECK(cudaLaunchKernelEx(
        &config.config, kernel, student, teacher, prob.student.stride(0), prob.teacher.stride(0),
        labels, scale, hard.data_ptr<float>(), soft.data_ptr<float>(), g, prob.v, prob.params));
  } else {
    kernel<<<static_cast<unsigned>(prob.n), threads, 0, stream>>>(
        student, teacher, prob.student.stride(0), prob.teacher.stride(0), labels, scale,
        hard.data_ptr<float>(), soft.data_ptr<float>(), g, prob.v, prob.params);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

DistillResult distill_cuda(KDFUSED_KERNEL_ARGS, bool compute_grad, const at::Tensor* grad_out,
                           double label_smoothing) {
  const DistillProblem prob =
      prepare_problem(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                      ignore_index, scale_by_t2, c10::DeviceType::CUDA, label_smoothing);
  TORCH_CHECK_VALUE(prob.n <= std::numeric_limits<int32_t>::max(),
                    "kdfused: at most 2^31 - 1 rows per call, got N = ", text(prob.n));
  const c10::cuda::CUDAGuard guard(student.device());
  auto [hard, soft, grad] = allocate_outputs(prob, compute_grad, grad_out);
  if (prob.n == 0) return {hard, soft, grad};

  KDFUSED_DISPATCH_LOGITS(prob.student.scalar_type(), "kdfused_distill_cuda", [&] {
    using student_t = scalar_t;
    KDFUSED_DISPATCH_LOGITS(prob.teacher.scalar_type(), "kdfused_distill_cuda", [&] {
      launch<student_t, scalar_t>(prob, grad_scale, hard, soft, grad, compute_grad);
    });
  });
  return {hard, soft, grad};
}

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in every pass of a .cu file.
#define KDFUSED_STRINGIFY2(...) #__VA_ARGS__
#define KDFUSED_STRINGIFY(...) KDFUSED_STRINGIFY2(__VA_ARGS__)
std::string cuda_build_config() {
  return "cuda=" + text(int64_t{CUDART_VERSION}) +
         ";cuda_archs=" KDFUSED_STRINGIFY(__CUDA_ARCH_LIST__);
}

}  // namespace kdfused
