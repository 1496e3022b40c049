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
#include <string>
#include <utility>

#include "../distill_op.h"
#include "distill_kernel.cuh"

namespace kdfused {
namespace {

using cuda::choose_resident;
using cuda::cuda_kernel_mode;
using cuda::distill_resident_kernel;
using cuda::distill_rows_kernel;
using cuda::kMaxCluster;
using cuda::kPortableCluster;
using cuda::kResidentPacks;
using cuda::kResidentThreads;
using cuda::pack_width;
using cuda::ResidentShape;
using cuda::threads_for;

// A launch configuration of `rows` clusters of the given shape (not copyable:
// config points into it).
struct ClusterLaunch {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute cluster{};

  ClusterLaunch(int64_t rows, const ResidentShape& shape, cudaStream_t stream) {
    config.gridDim = dim3(static_cast<unsigned>(rows * shape.cluster));
    config.blockDim = dim3(static_cast<unsigned>(shape.threads));
    config.stream = stream;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = static_cast<unsigned>(shape.cluster);
    cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// compute() for this device and key the first time, the remembered value
// after: device queries stay off the launch path (and out of graph captures
// after the first call). Each caller keeps its own table.
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

// Whether the device schedules clusters of this shape at all.
template <typename Kernel>
bool cluster_schedulable(Kernel kernel, const ResidentShape& shape) {
  return once_per_device(std::make_pair(shape.threads, shape.cluster), [&] {
    const ClusterLaunch one(1, shape, nullptr);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &one.config) != cudaSuccess) {
      (void)cudaGetLastError();  // an unsupported shape: not schedulable
      clusters = 0;
    }
    return clusters > 0;
  });
}

// The largest cluster the kernel may take on the current device: 16 where its
// code was compiled for sm_90 or later (the non-portable size, opted into
// here), else 1 (older code treats each block as a whole row).
template <typename Kernel>
int cluster_limit(Kernel kernel) {
  return once_per_device(0, [&] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const int limit = attributes.binaryVersion >= 90 ? kMaxCluster : 1;
    if (limit > kPortableCluster) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    }
    return limit;
  });
}

// The resident kernel's shape for a problem (cluster = 0: the streaming
// kernel's): the largest cluster allowed, else the next smaller limit while
// the device cannot schedule the shape. With the streaming kernel chosen it
// asks the device nothing.
template <typename S, typename Tt, typename Kernel>
ResidentShape resident_shape_for(Kernel kernel, const DistillProblem& prob,
                                 const std::string& mode) {
  if (mode == "stream" || mode == "lean") return ResidentShape{};
  for (int limit = cluster_limit(kernel);; limit /= 2) {
    const ResidentShape shape =
        choose_resident(mode, prob.student.const_data_ptr<S>(), prob.student.stride(0),
                        prob.teacher.const_data_ptr<Tt>(), prob.teacher.stride(0), prob.n, prob.v,
                        kResidentPacks, kResidentThreads, limit);
    if (shape.cluster <= 1 || cluster_schedulable(kernel, shape)) return shape;
  }
}

// KDFUSED_CUDA_ROWS_PER_SM = k (a benchmark knob, unset by default): dynamic
// shared memory that the streaming kernel does not use, sized so that at most
// k blocks (rows) share a multiprocessor. Fewer rows in flight keep more of
// each row in L2 for its next pass, at the cost of fewer loads in flight.
template <typename Kernel>
int occupancy_cap_smem(Kernel kernel) {
  const char* env = std::getenv("KDFUSED_CUDA_ROWS_PER_SM");
  if (env == nullptr) return 0;
  const int k = std::atoi(env);
  TORCH_CHECK_VALUE(k >= 1, "kdfused: KDFUSED_CUDA_ROWS_PER_SM must be a positive integer");
  int device = 0, per_sm = 0, optin = 0, reserved = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  // Each block also takes the driver's reserved shared memory (1 KB on sm_90).
  const int fixed = reserved + static_cast<int>(attr.sharedSizeBytes);
  const int smem =
      std::max(0, std::min(per_sm / k - fixed, optin - static_cast<int>(attr.sharedSizeBytes)));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  return smem;
}

template <typename S, typename Tt>
void launch(const DistillProblem& prob, const std::optional<at::Tensor>& grad_scale,
            at::Tensor& hard, at::Tensor& soft, at::Tensor& grad, bool compute_grad) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const S* student = prob.student.const_data_ptr<S>();
  const Tt* teacher = prob.teacher.const_data_ptr<Tt>();
  const int64_t* labels = prob.labels ? prob.labels->const_data_ptr<int64_t>() : nullptr;
  const float* scale = grad_scale ? grad_scale->const_data_ptr<float>() : nullptr;
  S* g = compute_grad ? grad.data_ptr<S>() : nullptr;

  const auto resident = distill_resident_kernel<S, Tt, kResidentPacks>;
  const std::string mode = cuda_kernel_mode();
  const ResidentShape shape = resident_shape_for<S, Tt>(resident, prob, mode);
  if (shape.cluster > 0) {
    const ClusterLaunch launch(prob.n, shape, stream);
    C10_CUDA_CHECK(cudaLaunchKernelEx(
        &launch.config, resident, student, teacher, prob.student.stride(0), prob.teacher.stride(0),
        labels, scale, hard.data_ptr<float>(), soft.data_ptr<float>(), g, prob.v, prob.params));
  } else {
    const int threads = threads_for(prob.v, pack_width<S, Tt>());
    const auto rows =
        mode == "lean" ? distill_rows_kernel<S, Tt, true> : distill_rows_kernel<S, Tt>;
    const int smem = occupancy_cap_smem(rows);
    rows<<<static_cast<unsigned>(prob.n), threads, smem, stream>>>(
        student, teacher, prob.student.stride(0), prob.teacher.stride(0), labels, scale,
        hard.data_ptr<float>(), soft.data_ptr<float>(), g, prob.v, prob.params);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

DistillResult distill_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                   const std::optional<at::Tensor>& labels,
                                   const std::optional<at::Tensor>& grad_scale, double temperature,
                                   double alpha, c10::string_view divergence, double beta,
                                   int64_t ignore_index, bool scale_by_t2, bool compute_grad) {
  const DistillProblem prob =
      prepare_problem(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                      ignore_index, scale_by_t2, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(prob.n <= std::numeric_limits<int32_t>::max(),
                    "kdfused: at most 2^31 - 1 rows per call, got N = ", text(prob.n));
  const c10::cuda::CUDAGuard guard(student.device());
  auto [hard, soft, grad] = allocate_outputs(prob, compute_grad);
  if (prob.n == 0) return {hard, soft, grad};

  KDFUSED_DISPATCH_LOGITS(prob.student.scalar_type(), "kdfused_distill_cuda", [&] {
    using student_t = scalar_t;
    KDFUSED_DISPATCH_LOGITS(prob.teacher.scalar_type(), "kdfused_distill_cuda", [&] {
      launch<student_t, scalar_t>(prob, grad_scale, hard, soft, grad, compute_grad);
    });
  });
  return {hard, soft, grad};
}

}  // namespace kdfused
