"""Builds kdfused._C: the C++ CPU kernel always, the CUDA kernel when possible.

Install with ``pip install --no-build-isolation -e .`` so that the extension is
compiled against the torch that will import it (docs/design.md, "Build").
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def want_cuda():
    """CUDA is built for a CUDA build of torch with a toolkit, or when forced.

    Never decided by torch.cuda.is_available(): build hosts often have no GPU.
    """
    if os.environ.get("KDFUSED_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


cpu_sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
cuda_sources = _rel("csrc/cuda/*.cu")
with_cuda = want_cuda() and bool(cuda_sources)

# -O3 but no -march: the wheel must run on any x86-64 (no SIGILL without AVX2);
# the CPU kernel compiles its AVX2 path per function and picks it at run time.
# -fno-trapping-math lets the vectoriser compute both arms of a select (the
# code never reads floating-point exception flags); results are unchanged.
# -fopenmp so that at::parallel_for really runs in parallel; the library links
# libgomp.so.1, which resolves to the one torch has already loaded.
cxx_flags = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
extension_kwargs = dict(
    name="kdfused._C",
    sources=cpu_sources,
    include_dirs=[os.path.join(HERE, "csrc")],
    extra_compile_args={"cxx": cxx_flags},
    extra_link_args=["-fopenmp"],
)
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    extension_kwargs["sources"] = cpu_sources + cuda_sources
    extension_kwargs["define_macros"] = [("KDFUSED_WITH_CUDA", None)]
    extension_kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math"]
    extension = cpp_extension.CUDAExtension(**extension_kwargs)
else:
    extension = cpp_extension.CppExtension(**extension_kwargs)

print(f"kdfused: building the CPU kernel{' and the CUDA kernel' if with_cuda else ''}")

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
