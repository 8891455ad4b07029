"""Structural checks of the source tree (issue 19)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("loglinear_grpo", "llm_head")

#: Cycles through function-level (lazy) imports that are known and accepted, each as the sorted
#: tuple of the modules of one strongly connected component. A lazy import inside a function still
#: makes the two modules depend on each other (the design has a cycle even though Python resolves it
#: at call time), so it counts: a cycle is accepted only if it is listed here, with the reason.
#: A cycle through module-level imports alone is never accepted. None remain today: the last two
#: (loglinear_grpo._validation ↔ losses, llm_head.data ↔ opinions) were removed in issue 19.
ALLOWED_LAZY_CYCLES: frozenset = frozenset()


def _module_files(root, packages=PACKAGES):
    """``{dotted module name: path}`` for every ``.py`` file of the packages (``__init__`` = the package)."""
    files = {}
    for package in packages:
        for path in sorted((Path(root) / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def import_graph(root, packages=PACKAGES):
    """The import graph of the packages from their source (``ast``; nothing is imported).

    Every ``import`` / ``from ... import`` statement counts, wherever it is: at module level, under
    ``if``/``try``, or inside a function or method (lazy). Relative imports are resolved against
    the importing module's package. ``from X import name`` depends on the submodule ``X.name`` when
    there is one, else on ``X``; ``import a.b.c`` on the longest prefix that is a module of the
    packages. Imports of anything outside the packages are ignored, and so is the implicit import of
    a module's parent packages (Python runs ``pkg/__init__`` before any ``pkg.x``; counting it would
    make every re-export in an ``__init__`` a cycle).

    Returns
    -------
    dict
        ``{module: {imported module: (lineno, lazy)}}``; ``lazy`` is True when every import of that
        module by this one is inside a function (a module-level import wins).
    """
    files = _module_files(root, packages)

    def resolve(name):
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        edges = {}

        def add(target, node, lazy):
            if target is None or target == module:
                return
            old = edges.get(target)
            if old is None or (old[1] and not lazy):
                edges[target] = (node.lineno, lazy)

        def visit(node, lazy):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        add(resolve(alias.name), child, lazy)
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        anchor = package[:len(package) - (child.level - 1)]
                        base = ".".join(anchor + ([child.module] if child.module else []))
                    else:
                        base = child.module or ""
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        add(sub if sub in files else resolve(base), child, lazy)
                visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
        graph[module] = edges
    return graph


def import_cycles(graph, module_level_only=False):
    """The strongly connected components of more than one module (Tarjan), each as a sorted tuple."""
    succ = {m: sorted(t for t, (_, lazy) in out.items() if not (module_level_only and lazy))
            for m, out in graph.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for v in sorted(succ):
        if v not in index:
            strong(v)
    return sorted(found)


def describe_cycle(graph, component):
    """One closed path through the component, edge by edge with the line of the import."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}

    def walk(v):                      # depth-first search for a path back to start inside the component
        for w in sorted(graph[v]):
            if w == start and len(path) > 1:
                return True
            if w in members and w not in seen:
                path.append(w)
                seen.add(w)
                if walk(w):
                    return True
                path.pop()
        return False

    walk(start)
    hops = []
    for a, b in zip(path, path[1:] + [start]):
        line, lazy = graph[a][b]
        hops.append(f"{a} -> {b} (line {line}{', in a function' if lazy else ''})")
    return f"{' <-> '.join(component)}: " + "; ".join(hops)


def test_no_import_cycles_inside_the_packages():
    graph = import_graph(ROOT)
    assert "loglinear_grpo.losses" in graph and "llm_head.data" in graph      # the tree was found
    strict = import_cycles(graph, module_level_only=True)
    assert not strict, "import cycles through module-level imports:\n" + "\n".join(
        describe_cycle(graph, c) for c in strict)
    cycles = import_cycles(graph)
    new = [c for c in cycles if c not in ALLOWED_LAZY_CYCLES]
    assert not new, "import cycles (counting imports inside functions; move the shared piece to the " \
                    "module it belongs to, or to a small new one):\n" + "\n".join(
                        describe_cycle(graph, c) for c in new)
    stale = sorted(set(ALLOWED_LAZY_CYCLES) - set(cycles))
    assert not stale, f"allowed cycles that no longer exist (remove them from ALLOWED_LAZY_CYCLES): {stale}"


# ============================================================================ one row interface (issue 19)
#: the modules of loglinear_grpo that may test how S is stored: the data class, the operator protocol
#: and the storage adapters (loglinear_grpo.storage); every other module asks ``data.storage`` for a
#: capability (in_memory, out_of_core, dense_rows, parallel_parts, cheap_rmatmat)
STORAGE_MODULES = frozenset({"data.py", "operators.py", "storage.py"})
#: types S may be stored as (the last part of a dotted name: np.memmap, sp.csr_matrix, torch.Tensor, ...)
STORAGE_TYPES = frozenset({
    "ndarray", "memmap", "matrix", "spmatrix", "sparray", "LinearOperator", "Tensor",
    *(f"{fmt}_{kind}" for fmt in ("csr", "csc", "coo", "lil", "dok", "bsr", "dia") for kind in ("matrix", "array")),
    "PairOperator", "LinearOperatorRows", "RowSubset", "Rows", "DenseRows", "MemmapRows", "SparseRows",
    "OperatorRows"})
#: functions that test for a storage kind
STORAGE_TESTS = frozenset({"issparse", "isspmatrix", "is_pydata_spmatrix", "_is_sparse", "as_pair_operator"})
#: PreferenceData's read-only storage conveniences (for users, not for the packages' modules)
STORAGE_ATTRIBUTES = frozenset({"is_sparse", "is_operator", "is_dense", "streamed"})
#: module aliases of scipy.sparse: any type under them is a storage type
SPARSE_PREFIXES = ("sp.", "sparse.", "scipy.sparse.")


def _dotted(node):
    """``"np.memmap"`` for a chain of attributes on a name, ``"memmap"`` for a name, else ``None``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _storage_type(node):
    """The storage type that ``node`` (a type, a tuple of types or ``A | B``) names, or ``None``."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return next((t for t in map(_storage_type, node.elts) if t), None)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _storage_type(node.left) or _storage_type(node.right)
    name = _dotted(node)
    if name is None:
        return None
    if name.rpartition(".")[2] in STORAGE_TYPES or name.startswith(SPARSE_PREFIXES):
        return name
    return None


def storage_kind_tests_in(tree):
    """``[(line, what)]``: every place in a module's ``ast`` that tests how S is stored —
    ``isinstance``/``issubclass`` against a storage type (:data:`STORAGE_TYPES`, anything under
    ``scipy.sparse``), ``type(x) is/== <storage type>``, a call of a storage test
    (:data:`STORAGE_TESTS`, ``sp.isspmatrix_*``) and a read of PreferenceData's storage
    conveniences (:data:`STORAGE_ATTRIBUTES`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func) or ""
            last = name.rpartition(".")[2]
            if last in ("isinstance", "issubclass") and len(node.args) == 2 and _storage_type(node.args[1]):
                found.append((node.lineno, f"{last}(..., {_storage_type(node.args[1])})"))
            elif last in STORAGE_TESTS or last.startswith("isspmatrix"):
                found.append((node.lineno, f"{name}(...)"))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            typed = any(isinstance(s, ast.Call) and _dotted(s.func) == "type" for s in sides)
            named = next((t for t in map(_storage_type, sides) if t), None)
            if typed and named:
                found.append((node.lineno, f"type(...) compared with {named}"))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in STORAGE_ATTRIBUTES:
            found.append((node.lineno, f"{_dotted(node) or '...' + node.attr}"))
    return sorted(found)


def storage_kind_tests(folder, allowed=STORAGE_MODULES):
    """``["file.py:line: what"]`` for every ``.py`` file under ``folder`` whose name is not in
    ``allowed`` (:func:`storage_kind_tests_in`). Point it at any folder, e.g. one holding an older
    version of the package's modules."""
    found = []
    for path in sorted(Path(folder).rglob("*.py")):
        if path.name in allowed:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [f"{path.relative_to(folder)}:{line}: {what}" for line, what in storage_kind_tests_in(tree)]
    return found


def test_no_module_outside_the_adapters_tests_the_storage_kind():
    package = ROOT / "loglinear_grpo"
    everywhere = storage_kind_tests(package, allowed=())
    assert any(f.startswith("storage.py:") for f in everywhere), everywhere    # the scanner sees the adapters'
    found = storage_kind_tests(package)
    assert not found, ("modules outside loglinear_grpo/data.py, operators.py and storage.py test how S is "
                       "stored; ask data.storage for a capability (or add one to loglinear_grpo.storage) "
                       "instead:\n" + "\n".join(found))
