"""Instructions per pass of the CUDA kernel, counted in its SASS, without a GPU.

For each innermost loop of one kernel (a backward branch that contains no other),
prints the length of the shortest path from the loop's head to its back-branch,
in issued instructions, and what that path issues. The kernel's pack loops branch
around their rare work (an anchor rescale, non-finite anchors), so the shortest
path is the one a pack takes almost always: instructions per pack of W elements
(8 for bf16/fp16, 4 for fp32). Used to compare two builds' loops before a GPU
run can time them (docs/cuda-tuning.md).

    nvcc ... -gencode=arch=compute_90,code=sm_90 -cubin -o k.cubin csrc/cuda/distill_cuda.cu
    cuobjdump -sass k.cubin > k.sass   # cuobjdump: CUDA toolkit, or triton's copy
    python scripts/sass_loops.py k.sass --kernel BFloat16ES3_
"""

import argparse
import collections
import heapq
import re

INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")
SHOWN = (
    "FADD",
    "FMUL",
    "FFMA",
    "FSEL",
    "FSETP",
    "FMNMX",
    "MUFU.EX2",
    "MUFU.LG2",
    "LDG",
    "STG",
    "LDL",
    "STL",
)


def functions(sass_text):
    """{name: [(address, instruction)]} for every function in cuobjdump's output."""
    out, name = {}, None
    for line in sass_text.splitlines():
        if "Function :" in line:
            name = line.split("Function :")[1].strip()
            out[name] = []
        elif name and (m := INSTRUCTION.match(line)):
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def hot_loops(code):
    """[(head address, hot path length, all instructions, Counter of the hot path)]."""
    at = {a: i for i, (a, _) in enumerate(code)}

    def target(i):
        m = BRANCH.search(code[i][1])
        return at.get(int(m.group(1), 16)) if m else None

    backward = [(target(i), i) for i in range(len(code)) if target(i) is not None]
    loops = [(head, i) for head, i in backward if head <= i]
    inner = [x for x in loops if not any(y != x and x[0] <= y[0] and y[1] <= x[1] for y in loops)]
    result = []
    for head, back in inner:
        dist, prev, queue = {head: 1}, {}, [(1, head)]
        while queue:
            d, i = heapq.heappop(queue)
            if i == back or d > dist[i]:
                continue
            steps = []
            j = target(i)
            if j is not None and i < j <= back:
                steps.append(j)
            if not (code[i][1].startswith(("BRA", "EXIT", "RET"))) and i < back:
                steps.append(i + 1)
            for j in steps:
                if d + 1 < dist.get(j, 1 << 30):
                    dist[j], prev[j] = d + 1, i
                    heapq.heappush(queue, (d + 1, j))
        if back not in dist:
            continue
        path, i = [], back
        while i != head:
            path.append(i)
            i = prev[i]
        path.append(head)
        ops = collections.Counter(PREDICATE.sub("", code[i][1]).split()[0] for i in path)
        result.append((code[head][0], dist[back], back - head + 1, ops))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sass", help="cuobjdump -sass output")
    parser.add_argument("--kernel", default="", help="substring of the mangled kernel name")
    args = parser.parse_args()
    with open(args.sass) as f:
        funcs = functions(f.read())
    for name, code in funcs.items():
        if args.kernel not in name:
            continue
        print(name)
        for head, hot, size, ops in hot_loops(code):
            shown = " ".join(
                f"{k}={sum(v for op, v in ops.items() if op.startswith(k))}" for k in SHOWN
            )
            print(f"  loop @{head:#07x}: hot path {hot:4d} of {size:4d} instructions | {shown}")


if __name__ == "__main__":
    main()
