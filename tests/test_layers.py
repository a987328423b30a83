"""The package's layers point one way: a module imports only from its own layer or below.

Every import of every module under fast3d/ is read from its syntax tree (function-level imports
too, relative ones resolved), mapped to the fast3d module it loads, and checked against LAYERS.
The application packages of L5 must not import each other in a cycle either (CYCLE_FREE). Planted
defects in a synthetic package (an upward import, a module in no layer, a cycle) check that each
checker catches what it should.
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
    # L2: modules, file formats, camera geometry; the package root re-exports ops and io (the
    # root's entry names the module fast3d itself only: a new top-level module needs its own row)
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
    "fast3d.serving": 5,         # fast3d serve: Ray Serve deployments over the inference paths
    # L6: entry points
    "fast3d.cli": 6,
    "fast3d.demo": 6,
}


# Packages of one layer that must not import each other in a cycle (any length, any depth).
CYCLE_FREE = ("fast3d.training", "fast3d.inference", "fast3d.datagen", "fast3d.bench", "fast3d.serving")


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


def _entry(module: str, table: dict[str, int]) -> str:
    """The table entry deciding ``module``'s layer: its longest matching prefix. The package root's
    entry (a name without a dot) matches the root module only, never as a catch-all."""
    best = max((p for p in table if module == p or ("." in p and module.startswith(p + "."))), key=len, default=None)
    if best is None:
        raise KeyError(f"{module} is in no layer of the table; add it")
    return best


def layer_of(module: str, table: dict[str, int]) -> int:
    return table[_entry(module, table)]


def unlayered(root: str, package: str, table: dict[str, int]) -> list[str]:
    """Every module under ``root`` that no entry of ``table`` places."""
    out = []
    for m in sorted(modules(root, package)):
        try:
            _entry(m, table)
        except KeyError:
            out.append(m)
    return out


def cycles(root: str, package: str, table: dict[str, int], groups: tuple[str, ...]) -> list[str]:
    """Import cycles among ``groups`` (packages, each an entry of ``table``): every pair of groups
    reachable from each other through imports, with one import of each direction's first hop,
    as 'a -> b (file:line) ... -> a'. A module belongs to the group whose entry places it (so a
    lower-layer module inside a group's folder, like fast3d.bench.spec, is not part of it)."""
    mods = modules(root, package)
    edges: dict[str, dict[str, str]] = {g: {} for g in groups}  # group -> group -> one witness import
    for m, path in sorted(mods.items()):
        src = _entry(m, table)
        if src not in edges:
            continue
        for target, line in imports(m, path, mods, package):
            dst = _entry(target, table)
            if dst in edges and dst != src:
                edges[src].setdefault(dst, f"{os.path.relpath(path, os.path.dirname(root))}:{line}")

    def path_to(a: str, b: str) -> list[str] | None:
        """Groups a, ..., b along imports (breadth first), or None."""
        seen, frontier = {a: [a]}, [a]
        while frontier:
            nxt = []
            for g in frontier:
                for h in edges[g]:
                    if h not in seen:
                        seen[h] = seen[g] + [h]
                        nxt.append(h)
            frontier = nxt
        return seen.get(b) if b != a else None

    out = []
    for a in groups:
        for b in groups:
            if a < b and b in edges[a] and path_to(b, a):
                loop = [a] + path_to(b, a)
                out.append(" -> ".join(f"{x} ({edges[x][y]})" for x, y in zip(loop, loop[1:])) + f" -> {a}")
    return out


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
    missing = unlayered(ROOT, "fast3d", LAYERS)
    assert not missing, "modules in no layer of LAYERS (add a row):\n" + "\n".join(missing)


def test_no_import_cycles_between_the_applications():
    found = cycles(ROOT, "fast3d", LAYERS, CYCLE_FREE)
    assert not found, "import cycles between the L5 packages:\n" + "\n".join(found)


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


TOY_APPS = {"pkg": 0, "pkg.low": 0, "pkg.app1": 1, "pkg.app2": 1, "pkg.app3": 1}


def test_a_module_in_no_layer_is_caught(tmp_path):
    """A new top-level module is not placed by the package root's entry."""
    files = {"__init__.py": "", "low/__init__.py": "", "mid/__init__.py": "", "high/__init__.py": ""}
    root = _tree(tmp_path, files)
    assert unlayered(root, "pkg", TOY) == []
    (tmp_path / "pkg" / "newmod.py").write_text("X = 1\n")
    assert unlayered(root, "pkg", TOY) == ["pkg.newmod"]
    with pytest.raises(KeyError, match="pkg.newmod is in no layer"):
        layer_of("pkg.newmod", TOY)


@pytest.mark.parametrize("planted", [
    ("app3/tool.py", "def f():\n    from pkg.app1 import run\n"),   # a three-package loop, function level
    ("app2/__init__.py", "from ..app1 import run\n"),               # a direct loop, relative import
])
def test_a_planted_import_cycle_is_caught(tmp_path, planted):
    files = {"__init__.py": "", "low/__init__.py": "", "low/util.py": "X = 1\n",
             "app1/__init__.py": "", "app1/run.py": "from pkg.app2 import step\nfrom pkg.low import util\n",
             "app2/__init__.py": "", "app2/step.py": "import pkg.app3.tool\n",
             "app3/__init__.py": "", "app3/tool.py": "import pkg.low.util\n"}
    root = _tree(tmp_path, files)
    groups = ("pkg.app1", "pkg.app2", "pkg.app3")
    assert cycles(root, "pkg", TOY_APPS, groups) == []          # one-way imports pass
    rel, text = planted
    (tmp_path / "pkg" / rel).write_text(files[rel] + text)
    found = cycles(root, "pkg", TOY_APPS, groups)
    assert found and all(f.startswith("pkg.app") and f.endswith(f.split(" ")[0]) for f in found), found
    assert any("pkg/app1/run.py:1" in f for f in found), found
