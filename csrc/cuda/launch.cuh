// The host side of the CUDA kernels' launches. Each kernel has one launch
// function (distill_launch.cuh, sparse_launch.cuh, parallel_launch.cuh): it
// chooses the grid, the block and cluster sizes and the dynamic shared memory,
// picks the kernel's instantiation and passes its arguments. The launch itself
// is left to a launcher policy, so that the CUDA ops (CudaLauncher,
// cuda_launcher.cuh: the current stream, device queries) and the emulated ops
// of tests/emulator/ (emulated_launcher.h: the kernel run on the CPU) run the
// same launch code. A policy L provides:
//
//   L::launch(const Launch& shape, kernel, args...)
//       runs kernel(args...) on a grid of shape.blocks blocks of shape.threads
//       threads, in clusters of shape.cluster blocks, each block with
//       shape.shared bytes of dynamic shared memory;
//   L::split_for(kernel, parts, threads)
//       parts, where clusters of `parts` blocks of `threads` threads running
//       kernel can be scheduled, else 1;
//   L::allow_shared(kernel, bytes, what)
//       lets kernel take `bytes` of dynamic shared memory per block, or raises
//       an error that names `what` where the device has less.
//
// No device code here: this header compiles under nvcc and under the emulator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

namespace kdfused {
namespace cuda {

// One launch's shape (the grid and blocks are one-dimensional).
struct Launch {
  int64_t blocks;
  int threads;
  int cluster = 1;    // blocks per cluster (1: a plain launch)
  size_t shared = 0;  // dynamic shared memory per block, in bytes
};

// The most blocks in a grid (its x dimension).
constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();

}  // namespace cuda
}  // namespace kdfused
