// The emulated ops' launcher policy (csrc/cuda/launch.cuh): every launch run
// on the CPU by emu::launch, with no device queries. The emulated ops call the
// launch functions of csrc/cuda/*_launch.cuh with it, so that they run the
// CUDA ops' own launch code.
//
// Include after the torch headers and before the device code (as
// cuda_emulator.h).
#pragma once

#include <cstddef>

#include "cuda/launch.cuh"
#include "cuda_emulator.h"

namespace kdfused {

struct EmulatedLauncher {
  template <typename... Params, typename... Args>
  void launch(const cuda::Launch& shape, void (*kernel)(Params...), Args... args) const {
    emu::failed_asserts = 0;
    emu::dynamic_bytes = shape.shared;
    emu::launch(static_cast<unsigned>(shape.blocks), static_cast<unsigned>(shape.threads),
                static_cast<unsigned>(shape.cluster), kernel, args...);
    // What CUDA reports at the next synchronisation after a device-side assert.
    TORCH_CHECK(emu::failed_asserts == 0,
                "CUDA error: device-side assert triggered (emulated: ", emu::first_failed, ")");
  }

  // The emulator runs clusters of any size,
  template <typename Kernel>
  int split_for(Kernel, int parts, int) const {
    return parts;
  }

  // and gives a block whatever dynamic shared memory its launch asks for.
  template <typename Kernel>
  void allow_shared(Kernel, size_t, const char*) const {}
};

}  // namespace kdfused
