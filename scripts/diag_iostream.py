"""Which ways of building an error message survive in a C++ extension op here?

Run on a new machine (`python3 scripts/diag_iostream.py`, about 30 s to
compile): on the lent GPU machine of 2026-11-27 (torch 2.11.0+cu130, g++ 13.3)
every variant that formats a number with an ostream died with SIGSEGV (rc=-11),
even without throwing, while text-only messages and std::to_string worked.
On the CPU machines (torch 2.13.0, g++ 12) all seven variants raise or return.
Each variant runs in its own process so that a crash is reported, not fatal.
"""

import subprocess
import sys

import torch
from torch.utils.cpp_extension import load_inline

# name -> body of `at::Tensor name(const at::Tensor& x)`
VARIANTS = {
    "str_only": 'TORCH_CHECK_VALUE(false, "text only");',
    "int_arg": 'TORCH_CHECK_VALUE(false, "int ", (int64_t)5);',
    "dbl_arg": 'TORCH_CHECK_VALUE(false, "double ", 0.5);',
    "to_str": 'TORCH_CHECK_VALUE(false, "to_string ", std::to_string((int64_t)5));',
    "rt_int": 'TORCH_CHECK(false, "runtime int ", (int64_t)5);',
    "fmt_no_throw": "std::ostringstream os; os << (int64_t)5 << 0.5; return x.add(1);",
    "std_throw": 'throw std::runtime_error("plain");',
}


def source() -> str:
    lines = ["#include <torch/library.h>", "#include <sstream>", "#include <stdexcept>"]
    for name, body in VARIANTS.items():
        lines.append(f"at::Tensor {name}(const at::Tensor& x) {{ {body} return x; }}")
    lines += ["TORCH_LIBRARY(diagx, m) {"]
    lines += [f'  m.def("{n}(Tensor x) -> Tensor");' for n in VARIANTS]
    lines += ["}", "TORCH_LIBRARY_IMPL(diagx, CPU, m) {"]
    lines += [f'  m.impl("{n}", &{n});' for n in VARIANTS]
    return "\n".join(lines + ["}"])


def main() -> None:
    if len(sys.argv) == 1:
        path = load_inline("diagx", source(), extra_cflags=["-O3"], is_python_module=False)
        for name in VARIANTS:
            cmd = [sys.executable, __file__, path, name]
            run = subprocess.run(cmd, capture_output=True, text=True)
            print(f"{name:>14}: rc={run.returncode} {run.stdout.strip()[:90]}")
        return
    torch.ops.load_library(sys.argv[1])
    try:
        print("returned", getattr(torch.ops.diagx, sys.argv[2])(torch.ones(2)).tolist())
    except Exception as err:  # the point is which exception, if any, arrives
        print("caught", type(err).__name__, str(err).splitlines()[0])


if __name__ == "__main__":
    main()
