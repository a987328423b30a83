"""The package's layers point one way: a module imports only from its own layer or below.

Every import of every module under fast3d/ is read from its syntax tree (function-level imports
too, relative ones resolved), mapped to the fast3d module it loads, and checked against LAYERS.
A second test plants an upward import in a synthetic package and checks the checker catches it.
"""

from __future__ import annotations

import ast
import os
import textwrap

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fast3d")

# Module prefix -> layer (lowest first); the longest matching prefix decides.
LAYERS = {
    # L0: the native extension, the backend registry, shared helpers that import no other layer
    "fast3d._native": 0,
    "fast3d._yaml": 0,
    "fast3d.backends": 0,
    "fast3d.checks": 0,
    "fast3d.triton_aot": 1,      # compiles the ops' Triton kernels ahead of time: reads ops
    # The bench's registry: the vocabulary the ops declare their workloads in (imports no fast3d).
    "fast3d.bench.spec": 0,
    # L1: the kernels
    "fast3d.ops": 1,
    # L2: modules, file formats, camera geometry; the package root re-exports ops and io
    "fast3d": 2,
    "fast3d.nn": 2,
    "fast3d.io": 2,
    "fast3d.cameras": 2,
    # L3: models
    "fast3d.models": 3,
    # L4: the shard format and its reader, evaluation metrics
    "fast3d.data": 4,
    "fast3d.evaluation": 4,
    # L5: applications
    "fast3d.training": 5,
    "fast3d.inference": 5,
    "fast3d.datagen": 5,
    "fast3d.bench": 5,
    # L6: entry points
    "fast3d.cli": 6,
    "fast3d.demo": 6,
}


def modules(root: str, package: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py under ``root`` (the folder of ``package``)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join([package, *rel])] = os.path.join(d, f)
    return out


def _loaded(name: str, mods: dict[str, str]) -> str:
    """The module of ``mods`` that importing dotted ``name`` executes last (its longest known prefix)."""
    while name not in mods and "." in name:
        name = name.rpartition(".")[0]
    return name


def imports(module: str, path: str, mods: dict[str, str], package: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import of ``package`` in the file, at any depth."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` loads pkg.sub when sub is a module, else names an attribute of pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        out += [(_loaded(n, mods), node.lineno) for n in names if n.split(".")[0] == package]
    return out


def layer_of(module: str, table: dict[str, int]) -> int:
    best = max((p for p in table if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise KeyError(f"{module} is in no layer of the table; add it")
    return table[best]


def upward_edges(root: str, package: str, table: dict[str, int]) -> list[str]:
    """Every import from a lower layer into a higher one, as 'file:line: a (Lx) -> b (Ly)'."""
    mods = modules(root, package)
    bad = []
    for m, path in sorted(mods.items()):
        lm = layer_of(m, table)
        for target, line in imports(m, path, mods, package):
            lt = layer_of(target, table)
            if lt > lm:
                bad.append(f"{os.path.relpath(path, os.path.dirname(root))}:{line}: {m} (L{lm}) -> {target} (L{lt})")
    return bad


def test_every_import_points_down_or_sideways():
    bad = upward_edges(ROOT, "fast3d", LAYERS)
    assert not bad, "imports from a lower layer into a higher one:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    for m in modules(ROOT, "fast3d"):
        layer_of(m, LAYERS)


def _tree(tmp_path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        p = tmp_path / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return str(tmp_path / "pkg")


TOY = {"pkg": 0, "pkg.low": 0, "pkg.mid": 1, "pkg.high": 2}


@pytest.mark.parametrize("planted", [
    "from pkg.high import app\n",                       # absolute, top level
    "def f():\n    from ..high import app\n",           # relative, inside a function
    "def f():\n    import pkg.high.app\n",              # plain import, inside a function
    "from pkg import high\n",                           # a submodule through `from package import`
])
def test_a_planted_upward_import_is_caught(tmp_path, planted):
    files = {"__init__.py": "", "low/__init__.py": "", "low/util.py": "X = 1\n",
             "mid/__init__.py": "", "mid/model.py": "from pkg.low import util\nfrom . import other\n",
             "mid/other.py": "from ..low.util import X\n", "high/__init__.py": "", "high/app.py": "import pkg.mid.model\n"}
    root = _tree(tmp_path, files)
    assert upward_edges(root, "pkg", TOY) == []          # the clean tree passes
    (tmp_path / "pkg" / "mid" / "model.py").write_text(files["mid/model.py"] + planted)
    bad = upward_edges(root, "pkg", TOY)
    assert len(bad) == 1 and bad[0].startswith("pkg/mid/model.py:") and "pkg.mid.model (L1) -> pkg.high" in bad[0], bad
