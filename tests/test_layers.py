"""The package's imports run one way down (docs/design.md, "Layers"): every
module of kdfused/ imports only modules of lower layers, counting imports
inside functions, so there is no circle. A module not placed in a layer, an
upward or sideways import, or a circle fails here."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "kdfused"

# Bottom first. A module may import modules of strictly lower rows only.
# "kdfused" is the package itself (__init__.py: the public names).
LAYERS = [
    ["_validation", "ops", "_measure"],  # checks, op wrappers and backend choice
    ["_types"],  # SparseTeacher, DistillLossOutput (checks their fields)
    ["_autograd"],  # what every capability's autograd.Function shares
    ["reference"],  # the oracle, and the reference backend
    ["dense"],  # capabilities, each on the ones below it
    ["sparse_store"],
    ["sparse"],
    ["fused_linear"],
    ["parallel"],
    ["functional"],  # the public functions: validate once, route
    ["loss"],  # the nn.Modules
    ["_info"],
    ["kdfused"],  # the package's public names
    ["hf"],  # integrations: the Hugging Face Trainer, then what builds on it
    ["store"],  # the store CLI (its build runs a Hugging Face model)
    ["__main__", "demo", "lm_demo", "trl"],  # demos and integrations
]


def _layer_of():
    where = {}
    for i, row in enumerate(LAYERS):
        for name in row:
            where[name] = i
    return where


def _module_name(path: pathlib.Path) -> str:
    return "kdfused" if path.name == "__init__.py" else path.stem


def _imports(path: pathlib.Path) -> set[str]:
    """The kdfused modules a file imports, anywhere in it (function bodies
    included); a bare `import kdfused` or `from kdfused import x` of a name
    that is not a module counts as the package."""
    tree = ast.parse(path.read_text(), str(path))
    # _C is the compiled library, below everything.
    modules = ({p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}) | {"_C"}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kdfused":
                    found.add(parts[1] if len(parts) > 1 and parts[1] in modules else "kdfused")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] != "kdfused":
                continue
            if node.level > 1:
                raise AssertionError(f"{path.name}: import from above the package")
            base = (node.module or "").split(".")
            if node.level == 0:
                base = base[1:]
            if base and base[0]:
                found.add(base[0] if base[0] in modules else "kdfused")
            else:  # from . import x, y / from kdfused import x
                for alias in node.names:
                    found.add(alias.name if alias.name in modules else "kdfused")
    found.discard("_C")  # the compiled library, below everything
    return found


def test_every_module_has_a_layer():
    layer = _layer_of()
    missing = [p.name for p in PACKAGE.glob("*.py") if _module_name(p) not in layer]
    assert not missing, f"modules not placed in a layer of tests/test_layers.py: {missing}"


def test_imports_only_go_down():
    layer = _layer_of()
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        me = _module_name(path)
        for other in sorted(_imports(path) - {me}):
            if other not in layer:
                wrong.append(f"{me} imports {other}, which has no layer")
            elif layer[other] >= layer[me]:
                wrong.append(f"{me} (layer {layer[me]}) imports {other} (layer {layer[other]})")
        if me in _imports(path) and me != "kdfused":
            wrong.append(f"{me} imports itself")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The scanner finds an import in a function body and a package import."""
    f = tmp_path / "m.py"
    f.write_text(
        "def g():\n    from .functional import fused_distill_loss\n    import kdfused\n"
        "from . import ops, reference\n"
    )
    assert _imports(f) == {"functional", "kdfused", "ops", "reference"}
