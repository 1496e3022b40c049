"""Peak memory of a step, for the benchmarks and the demos: on a GPU the
caching allocator's peak, on the CPU the process's peak resident set size."""

from __future__ import annotations

import ctypes

import torch


class PeakMemory:
    """Bytes allocated at the peak of fn() beyond what was live before it."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"no {field} in /proc/self/status")

    def __call__(self, fn) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        # Hand freed heap pages back to the OS first, or a buffer reused from
        # an earlier step would not show up as growth.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size, to the current one
        before = self._status_kib("VmRSS")
        fn()
        return (self._status_kib("VmHWM") - before) * 1024
