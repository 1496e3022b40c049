// Runs CUDA device code on the CPU, so that the CUDA kernel's own code (pack
// alignment, per-thread striding, warp and block reductions, the label check)
// is exercised by the test suite on machines without a GPU. Every CUDA thread
// of a block is a std::thread, __syncthreads() a block barrier and
// __shfl_down_sync() an exchange through memory between two warp barriers.
// A launch runs its clusters one after another (a plain launch: clusters of
// one block) and the blocks of one cluster together (cluster_sync() a barrier
// over all their threads), each with its own KDFUSED_BLOCK_SHARED storage,
// which cluster_peer() maps between blocks as distributed shared memory does.
// It covers what kdfused's kernels use, nothing more; timing, memory ordering
// and the hardware's exp are of course not emulated.
//
// Include after the torch headers and before the device code.
#pragma once

#include <atomic>
#include <barrier>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local Dim3 thread_idx;
inline thread_local Dim3 block_idx;
inline Dim3 block_dim;
inline Dim3 grid_dim;

constexpr int kWarp = 32;

// Synchronisation and shared memory of one block.
struct Block {
  explicit Block(unsigned threads) : all(threads), lanes(threads) {
    for (unsigned w = 0; w < threads / kWarp; ++w)
      warps.push_back(std::make_unique<std::barrier<>>(kWarp));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;  // one shuffle slot per thread
  alignas(64) std::byte shared[8192];
  std::vector<std::byte> dynamic;  // the launch's dynamic shared memory
  std::atomic<int> votes{0};       // __syncthreads_or
};

// The blocks of the cluster being run.
struct Cluster {
  Cluster(unsigned blocks, unsigned threads) : all(blocks * threads) {}
  std::barrier<> all;
  std::vector<std::unique_ptr<Block>> blocks;
};

inline thread_local Block* block = nullptr;
inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned cluster_rank = 0;
inline size_t dynamic_bytes = 0;  // of the launch being run
inline std::atomic<int> failed_asserts{0};
inline std::string first_failed;  // written by the first failing thread only

inline void device_assert(const char* cond) {
  if (failed_asserts.fetch_add(1) == 0) first_failed = cond;
}

// Launches kernel<<<grid, threads>>>(args...) in clusters of cluster_size
// blocks (1: a plain launch) and waits for it.
template <typename... Params, typename... Args>
void launch(unsigned grid, unsigned threads, unsigned cluster_size, void (*kernel)(Params...),
            Args... args) {
  if (threads % kWarp != 0) throw std::invalid_argument("emulator: threads must be whole warps");
  if (cluster_size == 0 || grid % cluster_size != 0)
    throw std::invalid_argument("emulator: the grid must be whole clusters");
  block_dim = Dim3{threads};
  grid_dim = Dim3{grid};
  for (unsigned first = 0; first < grid; first += cluster_size) {
    Cluster group(cluster_size, threads);
    for (unsigned r = 0; r < cluster_size; ++r) {
      group.blocks.push_back(std::make_unique<Block>(threads));
      group.blocks.back()->dynamic.resize(dynamic_bytes + 16);
    }
    std::vector<std::thread> pool;
    pool.reserve(cluster_size * threads);
    for (unsigned r = 0; r < cluster_size; ++r) {
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([=, &group] {
          thread_idx = Dim3{t};
          block_idx = Dim3{first + r};
          block = group.blocks[r].get();
          cluster = &group;
          cluster_rank = r;
          kernel(args...);
        });
      }
    }
    for (auto& th : pool) th.join();
  }
}

template <typename T>
T& block_shared() {
  static_assert(sizeof(T) <= sizeof(Block::shared) && alignof(T) <= 64, "emulator: too large");
  return *reinterpret_cast<T*>(block->shared);
}

}  // namespace emu

#define __global__
#define __device__
#define __launch_bounds__(...)
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::block->all.arrive_and_wait(); }

// A barrier that also tells every thread whether any thread's predicate held.
inline int __syncthreads_or(int predicate) {
  if (predicate) emu::block->votes.fetch_add(1);
  emu::block->all.arrive_and_wait();
  const int any = emu::block->votes.load() > 0;
  emu::block->all.arrive_and_wait();  // all have read the count
  if (threadIdx.x == 0) emu::block->votes.store(0);
  emu::block->all.arrive_and_wait();  // reset before the next vote
  return any;
}

// Shared-memory atomics (the values CUDA's return: the old ones).
template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicOr(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_or(value);
}

// The cluster primitives of distill_kernel.cuh.
#define KDFUSED_EMULATED 1
#define KDFUSED_BLOCK_SHARED(Type, name) Type& name = emu::block_shared<Type>()
// The launch's dynamic shared memory (emu::dynamic_bytes of it), as Type[].
#define KDFUSED_DYNAMIC_SHARED(Type, name) \
  Type* name = reinterpret_cast<Type*>(emu::block->dynamic.data())
inline unsigned cluster_blocks() { return static_cast<unsigned>(emu::cluster->blocks.size()); }
inline unsigned cluster_rank() { return emu::cluster_rank; }
inline void cluster_sync() { emu::cluster->all.arrive_and_wait(); }
template <typename T>
T* cluster_peer(T* shared, unsigned rank) {
  const auto offset = reinterpret_cast<std::byte*>(shared) - emu::block->shared;
  return reinterpret_cast<T*>(emu::cluster->blocks.at(rank)->shared + offset);
}

inline float __shfl_down_sync(unsigned /*mask: all lanes take part here*/, float v, int delta) {
  const int lane = threadIdx.x % emu::kWarp;
  const int warp = threadIdx.x / emu::kWarp;
  float* slots = emu::block->lanes.data() + warp * emu::kWarp;
  slots[lane] = v;
  emu::block->warps[warp]->arrive_and_wait();
  const float out = lane + delta < emu::kWarp ? slots[lane + delta] : v;
  emu::block->warps[warp]->arrive_and_wait();  // nobody overwrites a slot still being read
  return out;
}

// A failed device assert stops a CUDA kernel; here it is counted and the
// thread goes on (the kernel never reads a bad label's column either way).
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) emu::device_assert(#cond)
