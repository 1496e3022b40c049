"""scripts/sass_loops.py, the SASS loop counter behind docs/cuda-tuning.md's
instruction counts, on hand-written cuobjdump-style listings."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sass_loops", ROOT / "scripts/sass_loops.py")
sass_loops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_loops)


def _listing(name, body):
    """cuobjdump -sass text for one function: one instruction per 16 bytes."""
    lines = [f"\t\tFunction : {name}"]
    for k, text in enumerate(body):
        lines.append(f"        /*{16 * k:04x}*/                   {text} ;   /* 0x0000 */")
    return "\n".join(lines)


# A loop (0x10 .. 0x80) whose body branches around a rare two-instruction block,
# an if/else whose else arm is the longer, then a second loop after the first.
BODY = [
    "MOV R0, RZ",  # 0x00
    "LDG.E.128 R4, desc[UR4][R2.64]",  # 0x10  loop 1 head
    "FADD.FTZ R0, R0, R4",  # 0x20
    "@P0 BRA 0x60",  # 0x30  skips the rare block
    "MUFU.EX2 R5, R5",  # 0x40  rare
    "FMUL.FTZ R5, R5, R5",  # 0x50  rare
    "FSETP.GT.FTZ.AND P1, PT, R0, RZ, PT",  # 0x60
    "@P1 BRA 0x10",  # 0x70  back-branch
    "@!P2 BRA 0xb0",  # 0x80  loop 2 head: else arm at 0xb0
    "FADD.FTZ R1, R1, R1",  # 0x90  then arm (short)
    "BRA 0xe0",  # 0xa0
    "FMUL.FTZ R1, R1, R1",  # 0xb0  else arm (long)
    "FMUL.FTZ R1, R1, R1",  # 0xc0
    "FMUL.FTZ R1, R1, R1",  # 0xd0
    "@P3 BRA 0x80",  # 0xe0  back-branch
    "EXIT",  # 0xf0
]


def test_hot_path_skips_the_rare_blocks():
    funcs = sass_loops.functions(_listing("kernel_a", BODY) + "\n" + _listing("kernel_b", ["EXIT"]))
    assert set(funcs) == {"kernel_a", "kernel_b"}
    loops = sass_loops.hot_loops(funcs["kernel_a"])
    assert [(head, hot, size) for head, hot, size, _ in loops] == [(0x10, 5, 7), (0x80, 4, 7)]
    ops = loops[0][3]
    assert ops["LDG.E.128"] == 1 and ops["FADD.FTZ"] == 1 and "MUFU.EX2" not in ops
    assert loops[1][3]["FADD.FTZ"] == 1 and "FMUL.FTZ" not in loops[1][3]


def test_only_innermost_loops():
    # An outer loop (0x00 .. 0x40) around an inner one (0x10 .. 0x30).
    body = ["MOV R0, RZ", "FADD R1, R1, R1", "IADD3 R2, R2, 1, RZ", "@P0 BRA 0x10", "@P1 BRA 0x0"]
    loops = sass_loops.hot_loops(sass_loops.functions(_listing("k", body))["k"])
    assert [(head, hot) for head, hot, _, _ in loops] == [(0x10, 3)]
