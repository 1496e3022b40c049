"""kdfused.__version__, kdfused.build_info() and `python -m kdfused`: what a
bug report needs, read from the installed package and the compiled library."""

import json
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import kdfused
from kdfused import ops


def test_version_is_the_installed_metadata():
    assert kdfused.__version__ == metadata.version("kdfused")
    assert kdfused.__version__.count(".") >= 2


@pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="the extension is not built")
def test_build_info_reads_the_library():
    info = kdfused.build_info()
    assert info["compiled"] is True
    assert info["devices"] == sorted(ops.BUILT_DEVICES) and "cpu" in info["devices"]
    # Built against the torch that imports it (docs/design.md, "Build").
    assert info["built_with_torch"] == torch.__version__.split("+")[0]
    assert info["cpu_isa"] in ("avx2", "default")
    if "cuda" in info["devices"]:
        assert info["cuda_archs"] and all(a.startswith("sm_") for a in info["cuda_archs"])
    else:
        assert "cuda_archs" not in info


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "kdfused", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"kdfused {kdfused.__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "kdfused"],
        capture_output=True,
        text=True,
        check=True,
        env={"KDFUSED_CPU_CAPABILITY": "default", "PATH": "/usr/bin:/bin"},
    )
    info = json.loads(out.stdout)
    assert info["kdfused"] == kdfused.__version__
    if info["compiled"]:
        assert info["cpu_isa"] == "default"  # the forced portable kernels
