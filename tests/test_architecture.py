"""The import layers of ``src/mstok`` (declared in ``mstok/_layers.py``, explained in docs/architecture.md).

Every module imports in a fresh interpreter; every ``mstok`` import, at module level or inside a
function, goes to the importer's own layer or a lower one (the one exception: a deprecation shim,
a module-level ``__getattr__`` that warns with a DeprecationWarning); neither packages nor
modules import each other in a cycle; every function-level ``mstok`` import says why it is lazy;
old import paths still work and warn. The checker is tested on small synthetic trees too, so a
broken checker cannot pass an upward import.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from mstok._layers import DEPRECATED_MODULES, LAYERS

SRC = Path(__file__).resolve().parents[1] / "src"
LAZY_MARK = "# lazy:"
SHIM_MARK = "# deprecation shim"


# ----------------------------------------------------------------------------- the checker
@dataclass(frozen=True)
class ImportEdge:
    """One ``import`` statement of ``source`` that names ``target`` (both dotted module names)."""

    source: str
    target: str
    line: int
    in_function: bool  # inside a def (runs when called), not at import time
    in_shim: bool  # inside a module-level __getattr__ that raises a DeprecationWarning
    says_why: bool  # a "# lazy:" or "# deprecation shim" comment on its line or just above


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root/package`` (``__init__`` = the package)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest known module that ``name`` starts with (``a.b.c`` -> ``a.b`` if ``c`` is a name in it)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _import_runs(tree: ast.AST) -> dict[int, ast.stmt]:
    """id of each import statement -> the first statement of its run of consecutive imports."""
    first: dict[int, ast.stmt] = {}
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            run_start = None
            statements = getattr(node, field, None)
            for stmt in statements if isinstance(statements, list) else []:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    run_start = run_start or stmt
                    first[id(stmt)] = run_start
                else:
                    run_start = None
    return first


def _says_why(lines: list[str], node: ast.stmt, run_start: ast.stmt) -> bool:
    """A lazy/shim comment on the statement's own line, or in the comment lines right above the
    first statement of its run of imports."""
    marks = (LAZY_MARK, SHIM_MARK)
    if any(mark in lines[node.lineno - 1] for mark in marks):
        return True
    row = run_start.lineno - 2
    while row >= 0 and lines[row].strip().startswith("#"):
        if any(mark in lines[row] for mark in marks):
            return True
        row -= 1
    return False


def _is_shim(function: ast.FunctionDef) -> bool:
    """A module-level ``__getattr__`` that warns with a DeprecationWarning."""
    names = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
    return function.name == "__getattr__" and "DeprecationWarning" in names


def imports_of(module: str, path: Path, modules: set[str]) -> list[ImportEdge]:
    """Every import of a known module in ``path``: module level (``if TYPE_CHECKING`` included,
    class bodies included) and inside functions."""
    source = path.read_text()
    lines = source.splitlines()
    is_package = path.name == "__init__.py"
    edges: list[ImportEdge] = []

    def add(target: str | None, node: ast.stmt, in_function: bool, in_shim: bool) -> None:
        if target is not None and target != module:
            why = _says_why(lines, node, runs.get(id(node), node))
            edges.append(ImportEdge(module, target, node.lineno, in_function, in_shim, why))

    def visit(node: ast.AST, in_function: bool, in_shim: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(_resolve(alias.name, modules), child, in_function, in_shim)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the importer's package
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join([*package, base] if base else package)
                for alias in child.names:
                    # "from pkg import sub" names the submodule when there is one
                    add(
                        _resolve(f"{base}.{alias.name}", modules) or _resolve(base, modules),
                        child,
                        in_function,
                        in_shim,
                    )
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                shim = in_shim or (node is tree and _is_shim(child))
                visit(child, True, shim)
            else:
                visit(child, in_function, in_shim)

    tree = ast.parse(source, str(path))
    runs = _import_runs(tree)
    visit(tree, False, False)
    return edges


def layer_index(module: str, layers: tuple[tuple[str, tuple[str, ...]], ...]) -> int | None:
    """The position of ``module``'s layer (its longest matching prefix), or None when undeclared.
    A prefix without a dot (the root package) matches only its ``__init__``, not its submodules."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            below = "." in prefix and module.startswith(prefix + ".")
            if (module == prefix or below) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def package_of(module: str, root_package: str) -> str:
    """``mstok.tokenizers.base`` -> ``mstok.tokenizers``; a top-level module is its own package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == root_package and len(parts) > 1 else module


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def check_layers(root: Path, package: str, layers: tuple[tuple[str, tuple[str, ...]], ...]) -> list[str]:
    """Every violation of the layer rules in ``root/package``, one message each (empty: none)."""
    files = module_files(root, package)
    modules = set(files)
    names = [name for name, _ in layers]
    problems = [f"{m}: in no layer of the declaration" for m in sorted(modules) if layer_index(m, layers) is None]
    module_graph: dict[str, set[str]] = {}
    package_graph: dict[str, set[str]] = {}
    for module, path in sorted(files.items()):
        for edge in imports_of(module, path, modules):
            where = f"{path.relative_to(root)}:{edge.line}"
            low, high = layer_index(module, layers), layer_index(edge.target, layers)
            if edge.in_shim:
                continue  # runs only when an old name is used, and warns: not a dependency
            if low is not None and high is not None and high > low:
                kind = "inside a function" if edge.in_function else "at module level"
                problems.append(
                    f"{where}: {module} ({names[low]}) imports {edge.target} ({names[high]}) {kind}: an upward import"
                )
            if edge.in_function and not edge.says_why:
                problems.append(f"{where}: function-level import of {edge.target} without a '{LAZY_MARK} why' comment")
            module_graph.setdefault(module, set()).add(edge.target)
            source_package, target_package = package_of(module, package), package_of(edge.target, package)
            if source_package != target_package and package not in (source_package, target_package):
                package_graph.setdefault(source_package, set()).add(target_package)
    problems += [f"import cycle between packages: {' <-> '.join(c)}" for c in cycles(package_graph)]
    problems += [f"import cycle between modules: {' <-> '.join(c)}" for c in cycles(module_graph)]
    return list(dict.fromkeys(problems))  # one message per statement, not per imported name


# ----------------------------------------------------------------------------- mstok itself
def test_mstok_imports_only_downward() -> None:
    problems = check_layers(SRC, "mstok", LAYERS)
    assert not problems, "\n".join(problems)
    # the checker saw the real graph: the registry imports a model, the CLI the training stack
    edges = {
        (e.source, e.target) for e in imports_of("mstok.cli", SRC / "mstok" / "cli.py", set(module_files(SRC, "mstok")))
    }
    assert ("mstok.cli", "mstok.training") in edges


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """Each module imported in turn in a new interpreter, with DeprecationWarnings as errors
    (internal code uses no deprecated path); the deprecated aliases are imported last and must warn."""
    modules = [m for m in module_files(SRC, "mstok") if m not in DEPRECATED_MODULES]
    script = textwrap.dedent(
        """
        import importlib, json, sys, traceback, warnings
        modules, deprecated = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        failed = {}
        warnings.simplefilter("error", DeprecationWarning)
        for name in modules:
            try:
                importlib.import_module(name)
            except BaseException:
                failed[name] = traceback.format_exc(limit=3)
        warnings.simplefilter("always", DeprecationWarning)
        for name in deprecated:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    importlib.import_module(name)
                except BaseException:
                    failed[name] = traceback.format_exc(limit=3)
                    continue
            if not any(issubclass(w.category, DeprecationWarning) for w in caught):
                failed[name] = "a deprecated alias that did not warn"
        print(json.dumps(failed))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(modules), json.dumps(list(DEPRECATED_MODULES))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{why}" for name, why in failed.items())


@pytest.mark.slow
def test_each_module_imports_first() -> None:
    """Each module as the first mstok module an interpreter imports (catches an order-dependent
    cycle). One interpreter for all: before each module every ``mstok`` entry leaves
    ``sys.modules``, so mstok is imported afresh while torch & co. stay loaded (a new interpreter
    per module cost ~2.5 s each, 124 of them, for the same check)."""
    script = textwrap.dedent(
        """
        import importlib, json, sys, traceback, warnings
        import torch  # noqa: F401  (loaded once; only mstok is imported afresh below)
        warnings.simplefilter("ignore", DeprecationWarning)
        failed = {}
        for name in json.loads(sys.argv[1]):
            for loaded in [m for m in sys.modules if m == "mstok" or m.startswith("mstok.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except BaseException:
                failed[name] = traceback.format_exc(limit=3)
        print(json.dumps(failed))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    modules = sorted(module_files(SRC, "mstok"))
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(modules)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{why}" for name, why in failed.items())


# old import paths that must keep working (each warns, naming the new one)
OLD_PATHS = [
    ("from mstok.tokenizers import load_tokenizer", "mstok.persistence"),
    ("from mstok.tokenizers import load_official_vqgan", "mstok.persistence"),
    ("from mstok.tokenizers.registry import load_tokenizer", "mstok.persistence.loading"),
    ("from mstok.tokenizers.vqgan import load_official_vqgan", "mstok.persistence.convert.vqgan"),
    ("from mstok.generators import load_generator", "mstok.persistence"),
    ("from mstok.generators.registry import load_generator", "mstok.persistence.loading"),
    ("from mstok.evaluation.reference_train import train_reference, DEFAULT_STEPS", "mstok.training.reference"),
    ("from mstok.convert import convert_titok", "mstok.persistence.convert"),
    ("from mstok.convert.titok import load_official_titok, _official_key", "mstok.persistence.convert.titok"),
    ("from mstok.convert.generator import load_official_generator", "mstok.persistence.convert.generator"),
    ("from mstok.convert.hub import download, is_hub_id", "mstok.persistence.hub"),
    ("from mstok.weights import locate_model, resolve_weights, MissingWeightsError", "mstok.storage"),
    ("from mstok.saved import ConfigDict, SavedModel, read_saved_config", "mstok.storage.saved"),
]


def test_old_import_paths_work_and_warn() -> None:
    script = textwrap.dedent(
        """
        import json, sys, warnings
        results = {}
        for statement, new in json.loads(sys.argv[1]):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    exec(statement, {})
                except Exception as err:
                    results[statement] = f"failed: {type(err).__name__}: {err}"
                    continue
            messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
            if not any(new in m for m in messages):
                results[statement] = f"no DeprecationWarning naming {new}: {messages}"
        print(json.dumps(results))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(OLD_PATHS)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())


def test_public_api_paths_without_warnings() -> None:
    """The paths the README, the docs pages and the benchmarks use, and the names that moved down (re-exported
    from their old modules), import without a DeprecationWarning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        import mstok
        from mstok.evaluation.reference import ReferenceConfig, ReferenceNet, load_reference_net
        from mstok.generators.sampling import SamplingConfig, check_class_labels, generate_images, sample
        from mstok.losses.semantic import SemanticLoss
        from mstok.persistence import load_generator, load_tokenizer
        from mstok.training.checkpoint import EMA_FILE, latest_checkpoint, load_tokenizer_folder
        from mstok.training.distributed import resolve_device
        from mstok.training.logger import make_grid

    assert mstok.load_tokenizer is load_tokenizer and mstok.load_generator is load_generator
    assert ReferenceNet.config_class is ReferenceConfig and callable(load_reference_net)
    assert callable(sample) and callable(generate_images) and callable(check_class_labels) and SamplingConfig
    assert SemanticLoss.__module__ == "mstok.tokenizers.semtok_semantic"
    assert (EMA_FILE, callable(latest_checkpoint), callable(load_tokenizer_folder)) == ("ema.safetensors", True, True)
    assert resolve_device.__module__ == "mstok.device" and make_grid.__module__ == "mstok.images"


# ----------------------------------------------------------------------------- the checker on synthetic trees
TINY_LAYERS = (("low", ("pkg.low", "pkg.low2")), ("high", ("pkg", "pkg.high")))


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"pkg/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_checker_accepts_downward_imports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "pkg/low.py": "X = 1\n",
            "pkg/high.py": """
                from pkg.low import X
                from pkg import low


                def f():
                    import pkg.low  # lazy: a same-or-lower layer, with its reason
                    return X
                """,
        },
    )
    assert check_layers(root, "pkg", TINY_LAYERS) == []


@pytest.mark.parametrize(
    "low_source",
    [
        "from pkg.high import Y\n",  # module level
        "import pkg.high\n",
        "from pkg import high\n",  # the submodule, named as an attribute of its package
        "from .high import Y\n",  # relative
        "def f():\n    from pkg.high import Y  # lazy: even with a reason\n    return Y\n",  # inside a function
        "class C:\n    def m(self):\n        import pkg.high  # lazy: a method\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import Y\n",  # type-only
    ],
)
def test_checker_fails_an_upward_import(tmp_path: Path, low_source: str) -> None:
    root = _tree(tmp_path, {"pkg/low.py": low_source, "pkg/high.py": "Y = 1\n"})
    problems = check_layers(root, "pkg", TINY_LAYERS)
    assert any("pkg.low (low) imports pkg.high (high)" in p and "upward" in p for p in problems), problems


def test_checker_allows_only_a_warning_getattr_shim(tmp_path: Path) -> None:
    shim = """
        import warnings


        def __getattr__(name):
            if name == "Y":
                from pkg.high import Y  # deprecation shim
                warnings.warn("moved to pkg.high", DeprecationWarning, stacklevel=2)
                return Y
            raise AttributeError(name)
        """
    root = _tree(tmp_path, {"pkg/low.py": shim, "pkg/high.py": "from pkg.low import *\nY = 1\n"})
    assert check_layers(root, "pkg", TINY_LAYERS) == []
    silent = shim.replace('warnings.warn("moved to pkg.high", DeprecationWarning, stacklevel=2)', "pass")
    root = _tree(tmp_path / "silent", {"pkg/low.py": silent, "pkg/high.py": "Y = 1\n"})
    assert any("upward" in p for p in check_layers(root, "pkg", TINY_LAYERS))


def test_checker_wants_a_reason_for_a_function_level_import(tmp_path: Path) -> None:
    source = "def f():\n    from pkg.low import X\n    return X\n"
    root = _tree(tmp_path, {"pkg/low.py": "X = 1\n", "pkg/high.py": source})
    problems = check_layers(root, "pkg", TINY_LAYERS)
    assert len(problems) == 1 and "without a '# lazy: why' comment" in problems[0], problems
    commented = "def f():\n    # lazy: the reason, above the imports\n    import json\n\n    from pkg.low import X\n"
    root = _tree(tmp_path / "ok", {"pkg/low.py": "X = 1\n", "pkg/high.py": commented})
    assert check_layers(root, "pkg", TINY_LAYERS) == []


def test_checker_fails_cycles_and_undeclared_modules(tmp_path: Path) -> None:
    # same layer, so no upward import: only the cycle is wrong (a lazy import hiding it included)
    root = _tree(
        tmp_path,
        {
            "pkg/low.py": "from pkg.low2 import B\nA = 1\n",
            "pkg/low2.py": "B = 2\n\n\ndef f():\n    from pkg.low import A  # lazy: dodging the cycle\n    return A\n",
            "pkg/extra.py": "",
        },
    )
    problems = check_layers(root, "pkg", TINY_LAYERS)
    assert "pkg.extra: in no layer of the declaration" in problems
    assert "import cycle between modules: pkg.low <-> pkg.low2" in problems
    layers = (("low", ("pkg.a", "pkg.b")), ("high", ("pkg",)))
    root = _tree(
        tmp_path / "packages",
        {
            "pkg/a/__init__.py": "",
            "pkg/a/x.py": "import pkg.b.y\n",
            "pkg/b/__init__.py": "",
            "pkg/b/y.py": "import pkg.a\n",
        },
    )
    assert "import cycle between packages: pkg.a <-> pkg.b" in check_layers(root, "pkg", layers)
