// The CUDA ops' launcher policy (launch.cuh): launches on the current stream,
// clusters through cudaLaunchKernelEx, and the device queries that decide
// cluster sizes and shared memory.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>
#include <utility>

#include "../distill_op.h"  // text()
#include "distill_kernel.cuh"
#include "launch.cuh"

namespace kdfused {
namespace cuda {

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

// The configuration of a launch in clusters (not copyable: config points
// into it).
struct ClusterLaunch {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute cluster{};

  ClusterLaunch(const Launch& shape, cudaStream_t stream) {
    config.gridDim = dim3(static_cast<unsigned>(shape.blocks));
    config.blockDim = dim3(static_cast<unsigned>(shape.threads));
    config.dynamicSmemBytes = shape.shared;
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

// The CUDA ops' launcher: every launch on the current stream and checked.
struct CudaLauncher {
  template <typename... Params, typename... Args>
  void launch(const Launch& shape, void (*kernel)(Params...), Args... args) const {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (shape.cluster > 1) {
      const ClusterLaunch config(shape, stream);
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config.config, kernel, args...));
    } else {
      kernel<<<static_cast<unsigned>(shape.blocks), shape.threads, shape.shared, stream>>>(args...);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // The requested parts where the kernel was compiled for sm_90 or later and
  // the device schedules such clusters at all (above kPortableSplit blocks
  // only once the kernel is allowed non-portable sizes); else 1.
  template <typename Kernel>
  int split_for(Kernel kernel, int parts, int threads) const {
    const bool ok = once_per_device(std::make_pair(parts, threads), [&] {
      cudaFuncAttributes attributes{};
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
      if (attributes.binaryVersion < 90) return false;
      if (parts > kPortableSplit &&
          cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
              cudaSuccess) {
        (void)cudaGetLastError();
        return false;
      }
      const ClusterLaunch one(Launch{parts, threads, parts}, nullptr);
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &one.config) != cudaSuccess) {
        (void)cudaGetLastError();  // an unsupported shape: not schedulable
        return false;
      }
      return clusters > 0;
    });
    return ok ? parts : 1;
  }

  // Allows a kernel more than the default 48 KiB of dynamic shared memory when
  // it needs it; a size the device cannot give is an error that says so.
  template <typename Kernel>
  void allow_shared(Kernel kernel, size_t bytes, const char* what) const {
    constexpr size_t kDefault = 48 * 1024;
    if (bytes <= kDefault) return;
    int device = 0, most = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK_VALUE(bytes <= static_cast<size_t>(most), "kdfused: ", what, " needs ",
                      text(static_cast<int64_t>(bytes)),
                      " bytes of shared memory per block, more "
                      "than this GPU's ",
                      text(static_cast<int64_t>(most)));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
};

}  // namespace cuda
}  // namespace kdfused
