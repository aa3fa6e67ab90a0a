"""No import circle among the modules of ``src/anydepth``, counting imports inside functions.

The graph is read from the source with ``ast``, without importing anything. An edge ``M -> N`` means
"running M (its module body or any of its functions) may start executing N's code". The rules:

* Every ``import`` and ``from ... import`` anywhere in a module counts: module level, inside functions,
  methods, ``try`` and ``if`` blocks (there is no ``TYPE_CHECKING`` exception: such a block would count too).
* Relative imports are resolved against the importing module's package.
* ``import anydepth.a.b`` executes ``anydepth/a/__init__`` and then ``anydepth/a/b``: both are edges,
  except for packages that contain the importer (their ``__init__`` started before the importer's own
  code could run, so importing them executes nothing new).
* ``from anydepth.a import x``: an edge to ``anydepth.a`` (as above) and, when ``anydepth/a/x`` is a module,
  to it. When ``x`` is a name listed in the package's lazy table (``_LAZY``, ``_SUBMODULES``,
  ``_ALIASES`` in its ``__init__``, served by a PEP 562 ``__getattr__``), the edge goes to the module
  the table names: the import runs that module on behalf of the importer, so the importer owns the edge.
  A name the ``__init__`` re-exports with an ordinary import needs no rule: the ``__init__``'s own
  import is an edge of the package.
* ``import anydepth`` followed by ``anydepth.name`` (an attribute read) is the same lazy lookup and
  resolves the same way.
* ``importlib.import_module`` with a literal string is an import; with a computed argument it is allowed
  only in a package ``__getattr__`` that serves a lazy table (covered by the rule above), or in a package
  ``__init__`` that imports its own modules as ``pkgutil.iter_modules(__path__)`` lists them (the
  residual schemes): then it is an edge to every module of that package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PKG = "anydepth"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _lazy_table(package: str) -> dict[str, str]:
    """``name -> module`` served by the package's PEP 562 ``__getattr__`` (empty if it has none)."""
    if not _is_package(package):
        return {}
    table: dict[str, str] = {}
    tree = ast.parse(MODULES[package].read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            target = node.target
        elif isinstance(node, ast.Assign):
            target = node.targets[0]
        else:
            continue
        if not isinstance(target, ast.Name) or node.value is None:
            continue
        if target.id == "_LAZY":
            table.update(ast.literal_eval(node.value))
        elif target.id == "_SUBMODULES":
            table.update({n: f"{package}.{n}" for n in ast.literal_eval(node.value)})
        elif target.id == "_ALIASES":
            table.update(ast.literal_eval(node.value))
    return table


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(importer: str, imported: str) -> set[str]:
    """Modules of ``anydepth`` that ``import <imported>`` in ``importer`` may execute."""
    own = set(_ancestors(importer)) | ({importer} if _is_package(importer) else set())
    out = set()
    for name in [*_ancestors(imported), imported]:
        if name in MODULES and name not in own and name != importer:
            out.add(name)
    return out


def _resolve_relative(importer: str, level: int, module: str | None) -> str:
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _edges(importer: str) -> dict[str, int]:
    """``{target module: line of the first import that reaches it}``."""
    tree = ast.parse(MODULES[importer].read_text(), filename=str(MODULES[importer]))
    edges: dict[str, int] = {}
    bare_root = False

    def add(targets, line):
        for t in targets:
            edges.setdefault(t, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    add(_targets(importer, alias.name), node.lineno)
                    bare_root |= alias.name == PKG and alias.asname is None
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_relative(importer, node.level, node.module) if node.level else node.module
            if source is None or not (source == PKG or source.startswith(PKG + ".")):
                continue
            add(_targets(importer, source), node.lineno)
            lazy = _lazy_table(source)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:
                    add(_targets(importer, sub), node.lineno)
                elif alias.name in lazy:
                    add(_targets(importer, lazy[alias.name]), node.lineno)
        elif isinstance(node, ast.Call) and _is_import_module(node.func):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if arg.value.startswith(PKG):
                    add(_targets(importer, arg.value), node.lineno)
            elif _imports_own_modules(importer):
                prefix = importer + "."
                add((m for m in MODULES if m.startswith(prefix) and "." not in m[len(prefix) :]), node.lineno)
            elif not _serves_lazy_table(importer):
                raise AssertionError(
                    f"{MODULES[importer]}:{node.lineno}: importlib.import_module with a computed name; "
                    "the import graph cannot see where it goes. Import the module by name."
                )
    if bare_root:
        lazy = _lazy_table(PKG)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == PKG:
                if node.attr in lazy:
                    add(_targets(importer, lazy[node.attr]), node.lineno)
    return edges


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__")
    )


def _imports_own_modules(module: str) -> bool:
    """A package ``__init__`` that walks ``pkgutil.iter_modules(__path__)``."""
    if not _is_package(module):
        return False
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "iter_modules"
        and node.args
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id == "__path__"
        for node in ast.walk(ast.parse(MODULES[module].read_text()))
    )


def _serves_lazy_table(module: str) -> bool:
    return bool(_lazy_table(module))


def import_graph() -> dict[str, dict[str, int]]:
    return {m: _edges(m) for m in MODULES}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        iters = [iter(sorted(graph[start]))]
        state[start] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def _describe(graph, cycle: list[str]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        steps.append(f"  {a}  (line {graph[a][b]} of {MODULES[a].relative_to(ROOT)})\n    -> {b}")
    return "\n".join(steps)


def test_no_import_cycle():
    graph = import_graph()
    # The graph is read, not empty: edges this layout must have, from each kind of import.
    assert "anydepth.model.build" in graph["anydepth.model.pretrained"]  # module level
    assert "anydepth.nn" in graph["anydepth.registry"]  # a package's __init__
    assert "anydepth.model.pretrained" in graph["anydepth.cli"]  # inside a function
    assert "anydepth.sampling" in graph["anydepth.model.lm"]  # inside a method
    assert "anydepth.nn.residual.rezero" in graph["anydepth.nn.residual"]  # a package importing its own modules
    cycle = find_cycle(graph)
    assert cycle is None, "import circle among anydepth modules:\n" + _describe(graph, cycle)


# The rules above, checked on small sources whose answer is known.


def _graph_of(sources: dict[str, str], tmp_path, monkeypatch) -> dict[str, dict[str, int]]:
    """The graph of a made-up ``anydepth`` whose modules hold ``sources`` (a name that prefixes
    another is a package)."""
    modules = {}
    for name, text in sources.items():
        parts = name.split(".")
        is_pkg = any(other.startswith(name + ".") for other in sources)
        path = tmp_path.joinpath(*parts, "__init__.py") if is_pkg else tmp_path.joinpath(*parts[:-1], parts[-1] + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        modules[name] = path
    monkeypatch.setitem(globals(), "MODULES", modules)
    return {m: _edges(m) for m in modules}


def test_rules_on_known_sources(tmp_path, monkeypatch):
    g = _graph_of(
        {
            "anydepth": '_LAZY = {"build": "anydepth.b.build"}\n_SUBMODULES = {"b"}\n',
            "anydepth.b": "from anydepth.b import c\n",
            "anydepth.b.c": "def f():\n    from . import d\n",
            "anydepth.b.d": "import anydepth\nx = lambda: anydepth.build\n",
            "anydepth.b.build": "",
            "anydepth.e": "from anydepth import build\n",
            "anydepth.f": "def g():\n    import anydepth.b.c\n",
        },
        tmp_path,
        monkeypatch,
    )
    assert set(g["anydepth.b"]) == {"anydepth.b.c"}  # its own __init__ is not an edge
    assert set(g["anydepth.b.c"]) == {"anydepth.b.d"}  # in-function relative import
    assert set(g["anydepth.b.d"]) == {"anydepth.b.build"}  # attribute of the lazy root
    assert set(g["anydepth.e"]) == {"anydepth.b", "anydepth.b.build"}  # lazy re-export -> defining module
    assert set(g["anydepth.f"]) == {"anydepth.b", "anydepth.b.c"}  # the package __init__ runs first
    assert find_cycle(g) is None
    g["anydepth.b.build"]["anydepth.b.c"] = 1
    assert find_cycle(g) == ["anydepth.b.c", "anydepth.b.d", "anydepth.b.build", "anydepth.b.c"]
