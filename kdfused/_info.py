"""The package's version and what its compiled library holds, for bug reports."""

from __future__ import annotations

from importlib import metadata

import torch

from . import ops

try:
    __version__ = metadata.version("kdfused")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def build_info() -> dict:
    """What this installation runs: versions, the devices with a compiled
    kernel, the CPU kernel's instruction set in this process, and the CUDA
    runtime and sm_ targets the CUDA kernels were built for.

    On a CPU-only build: ``{"kdfused": "0.1.0", "torch": "2.13.0+cpu",
    "compiled": True, "devices": ["cpu"], "built_with_torch": "2.13.0",
    "cpu_isa": "avx2"}``; a CUDA build adds ``"cuda_runtime": "13.0"`` and
    ``"cuda_archs": ["sm_80", "sm_90"]``.
    """
    info = {
        "kdfused": __version__,
        "torch": torch.__version__,
        "compiled": ops.LOAD_ERROR is None,
        "devices": sorted(ops.BUILT_DEVICES),
    }
    if ops.LOAD_ERROR is not None:
        info["load_error"] = str(ops.LOAD_ERROR)
        return info
    config = dict(item.split("=", 1) for item in torch.ops.kdfused.build_config().split(";"))
    info["built_with_torch"] = config["torch"]
    info["cpu_isa"] = torch.ops.kdfused.cpu_capability()
    if "cuda" in config:
        runtime = int(config["cuda"])
        info["cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
        info["cuda_archs"] = [f"sm_{int(a) // 10}" for a in config["cuda_archs"].split(",")]
    return info
