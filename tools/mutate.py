"""A small mutation-testing runner for mstok: plant one plausible one-line bug at a time, run the tests.

Usage (from the repository root; the report goes to docs/MUTATION.md)::

    OMP_NUM_THREADS=1 .venv/bin/python tools/mutate.py \\
        --modules mstok.evaluation.metrics mstok.generators.schedules --max-mutants 40 --seed 0

How it works: ``src/`` is copied once into a temporary folder; for each mutant one node of one
module's syntax tree is changed (operator swap ``+ - * /``, comparison flip, integer constant
off by one, ``True``/``False`` swap, a dropped ``.detach()``/``.clamp*()`` call, the first two
arguments of a call swapped, a dropped unary minus or ``not``), the module is written back into
the copy with :func:`ast.unparse`, and pytest runs the module's test files with ``-x -q`` and a
timeout, with the copy first on ``PYTHONPATH``. The working tree is never modified. Each mutant
is *killed* (some test failed or the import broke), *survived* (every test passed: either a gap
in the tests or an equivalent mutant, which a person has to judge), or *timeout*.

Options: ``--modules`` (dotted names; default: every module in ``DEFAULT_TESTS``),
``--max-mutants`` (total, shared evenly among the modules), ``--seed`` (which mutants are drawn),
``--tests`` (test files for every module instead of the defaults), ``--timeout`` (seconds per
run; default three times the unmutated run, at least 60), ``--quick`` (deselect tests marked
slow), ``--list`` (print the mutants, run nothing), ``--report`` (markdown file; only the part
between the ``mutate:begin``/``mutate:end`` markers is rewritten, so notes around it are kept),
``--section`` (a name for those markers, so several runs can share one report), ``--match``
(only lines containing one of the given texts, to aim at one function or formula).
No dependency beyond the standard library and pytest.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- mutate:begin -->", "<!-- mutate:end -->"


def markers(section: str = "") -> tuple[str, str]:
    """The begin/end markers of a report section (``--section``; "" is the default section)."""
    if not section:
        return BEGIN, END
    return f"<!-- mutate:begin {section} -->", f"<!-- mutate:end {section} -->"


# The test files that exercise each module (the relevant subset keeps a mutant's run short).
DEFAULT_TESTS: dict[str, list[str]] = {
    "mstok.evaluation.metrics": [
        "tests/test_mutation_gaps.py",
        "tests/test_metrics.py",
        "tests/test_eval_reference.py",
    ],
    "mstok.evaluation.fid": [
        "tests/test_mutation_gaps.py",
        "tests/test_fid.py",
        "tests/test_eval_reference.py",
        "tests/test_inception_reference.py",  # the feature extractor's float32 forward
    ],
    "mstok.evaluation.inception": ["tests/test_inception_reference.py", "tests/test_fid.py"],
    "mstok.evaluation.evaluate": [
        "tests/test_mutation_gaps.py",
        "tests/test_eval_reference.py",
        "tests/test_evaluate.py",
        "tests/test_bad_data.py",  # skipped files counted
        "tests/test_quantizer_integration.py",  # bits per pixel and usage of a 2^32 codebook
    ],
    "mstok.quantizers.vq": ["tests/test_mutation_gaps.py", "tests/test_quantizer.py"],
    "mstok.quantizers.base": [
        "tests/test_mutation_gaps.py",
        "tests/test_quantizer_entropy.py",
        "tests/test_quantizer_zoo.py",
    ],
    "mstok.quantizers.fsq": ["tests/test_mutation_gaps.py", "tests/test_quantizer_zoo.py"],
    "mstok.quantizers.binary": [
        "tests/test_mutation_gaps.py",
        "tests/test_quantizer_zoo.py",
        "tests/test_quantizer_entropy.py",
    ],
    "mstok.quantizers.bsq": ["tests/test_mutation_gaps.py", "tests/test_quantizer_zoo.py"],
    "mstok.quantizers.lfq": ["tests/test_mutation_gaps.py", "tests/test_quantizer_zoo.py"],
    "mstok.quantizers.kl": ["tests/test_quantizer_zoo.py", "tests/test_quantizer_integration.py"],
    "mstok.quantizers.registry": ["tests/test_quantizer_zoo.py", "tests/test_quantizer_integration.py"],
    "mstok.tokenizers.mstok": [
        "tests/test_mutation_gaps.py",
        "tests/test_ablation_switches.py",
        "tests/test_tokenizers.py",
    ],
    "mstok.tokenizers.titok": ["tests/test_tokenizers.py", "tests/test_convert_titok.py"],
    "mstok.layers.attention": ["tests/test_mutation_gaps.py", "tests/test_layers.py"],
    "mstok.losses.perceptual": ["tests/test_perceptual.py"],
    "mstok.losses.gan": ["tests/test_mutation_gaps.py", "tests/test_gan.py"],
    "mstok.losses.objective": ["tests/test_mutation_gaps.py", "tests/test_training.py", "tests/test_stages.py"],
    "mstok.generators.schedules": ["tests/test_sampling_reference.py", "tests/test_generator.py"],
    "mstok.generators.maskgit_sampling": [
        "tests/test_mutation_gaps.py",
        "tests/test_sampling_reference.py",
        "tests/test_generator.py",
        "tests/test_convert_titok_generator.py",  # the official sampler, noise included, on fixtures
    ],
    "mstok.generators.common": [
        "tests/test_mutation_gaps.py",
        "tests/test_sampling_reference.py",
        "tests/test_generator.py",
        "tests/test_convert_titok_generator.py",
    ],
    "mstok.generators.sampling": ["tests/test_mutation_gaps.py", "tests/test_generator.py"],
    "mstok.training.engine": ["tests/test_mutation_gaps.py", "tests/test_training.py", "tests/test_reliability.py"],
    "mstok.training.trainer": [
        "tests/test_mutation_gaps.py",
        "tests/test_training.py",
        "tests/test_stages.py",
        "tests/test_validation.py",
        "tests/test_quantizer_integration.py",
    ],
    "mstok.training.optim": ["tests/test_mutation_gaps.py", "tests/test_training.py"],
}

_BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div}
_CMP_FLIPS = {
    ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}  # fmt: skip
_DROPPABLE_CALLS = {"detach", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "float", "double", "abs"}
# Functions whose mutants change a picture or a message, not a result: not mutated.
SKIP_FUNCTIONS = {"save_usage_histogram", "write_results", "__repr__", "extra_repr", "main"}
_LIBRARIES = {"torch", "np", "numpy", "F", "math"}
_LOG_CALLS = {"warning", "warn", "info", "debug", "log", "error"}
_OP_TEXT = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//"}


@dataclass
class Mutant:
    """One mutation: ``index`` is its position among the module's candidate sites."""

    module: str
    path: Path
    index: int
    line: int
    description: str
    source: str = ""  # the mutated module's source
    original: str = ""  # the original text of the mutated line (the file may change during a run)


def _skip_regions(tree: ast.AST) -> set[int]:
    """ids of nodes not worth mutating: annotations, docstrings, error messages, ``raise``/``assert`` subtrees."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr)):
            mark(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name in SKIP_FUNCTIONS:
                mark(node)
            mark(node.returns)
            for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs]:
                mark(arg.annotation)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _LOG_CALLS:
            mark(node)  # logging calls: a mutant there changes a message, not a result
    return skip


class _Mutator(ast.NodeTransformer):
    """Walks a module; counts candidate sites and, when ``target`` is set, rewrites that one site."""

    def __init__(self, skip: set[int], target: int | None = None) -> None:
        self.skip, self.target = skip, target
        self.sites: list[tuple[int, str]] = []  # (line, description) per candidate, in walk order
        self.applied: str | None = None

    def _site(self, node: ast.AST, description: str) -> bool:
        """Record a candidate; True when it is the one to apply."""
        self.sites.append((getattr(node, "lineno", 0), description))
        hit = self.target is not None and len(self.sites) - 1 == self.target
        if hit:
            self.applied = description
        return hit

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if id(node) in self.skip:
            return node
        return super().generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        new = _BINOP_SWAPS.get(type(node.op))
        hit = new is not None and id(node) not in self.skip
        if hit and self._site(node, f"`{_OP_TEXT[type(node.op)]}` -> `{_OP_TEXT[new]}`"):
            node.op = new()
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        new = _BINOP_SWAPS.get(type(node.op))
        hit = new is not None and id(node) not in self.skip
        if hit and self._site(node, f"`{_OP_TEXT[type(node.op)]}=` -> `{_OP_TEXT[new]}=`"):
            node.op = new()
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        if id(node) in self.skip:
            return node
        for i, op in enumerate(node.ops):
            new = _CMP_FLIPS.get(type(op))
            if new is not None and self._site(node, f"comparison `{type(op).__name__}` -> `{new.__name__}`"):
                node.ops[i] = new()
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if id(node) in self.skip:
            return node
        value = node.value
        if isinstance(value, bool):
            if self._site(node, f"`{value}` -> `{not value}`"):
                return ast.copy_location(ast.Constant(not value), node)
        elif isinstance(value, int):
            if self._site(node, f"constant `{value}` -> `{value + 1}`"):
                return ast.copy_location(ast.Constant(value + 1), node)
            if value != 0 and self._site(node, f"constant `{value}` -> `{value - 1}`"):
                return ast.copy_location(ast.Constant(value - 1), node)
        elif isinstance(value, float) and value in (0.0, 1.0, 0.5, 2.0):
            new = {0.0: 1.0, 1.0: 0.0, 0.5: 1.0, 2.0: 1.0}[value]
            if self._site(node, f"constant `{value}` -> `{new}`"):
                return ast.copy_location(ast.Constant(new), node)
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        # -1 is a literal, mutated as a constant
        candidate = isinstance(node.op, (ast.USub, ast.Not)) and not isinstance(node.operand, ast.Constant)
        if id(node) not in self.skip and candidate:
            name = "unary minus" if isinstance(node.op, ast.USub) else "`not`"
            if self._site(node, f"dropped {name}"):
                return node.operand
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        if id(node) in self.skip:
            return node
        func = node.func
        droppable = isinstance(func, ast.Attribute) and func.attr in _DROPPABLE_CALLS
        if droppable and self._site(node, f"dropped `.{func.attr}(...)`"):
            # torch.clamp(x, ...) keeps x; x.clamp(...) keeps x too, which is the receiver
            functional = isinstance(func.value, ast.Name) and func.value.id in _LIBRARIES and node.args
            return node.args[0] if functional else func.value
        plain = len(node.args) >= 2 and not any(isinstance(a, ast.Starred) for a in node.args)
        if plain and ast.dump(node.args[0]) != ast.dump(node.args[1]):
            name = ast.unparse(func)
            if len(name) <= 40 and self._site(node, f"swapped the first two arguments of `{name}(...)`"):
                node.args[0], node.args[1] = node.args[1], node.args[0]
        return node


def module_path(module: str, src: Path = REPO / "src") -> Path:
    """``mstok.a.b`` -> ``<src>/mstok/a/b.py`` (or its ``__init__.py``)."""
    base = src.joinpath(*module.split("."))
    path = base.with_suffix(".py")
    if path.is_file():
        return path
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    raise SystemExit(f"module {module!r} not found under {src} (expected {path})")


def mutants_of(source: str, module: str = "<module>", path: Path = Path("<string>")) -> list[Mutant]:
    """Every valid mutant of ``source``: each compiles and differs from the original after unparsing."""
    tree = ast.parse(source)
    original = ast.unparse(tree)
    counter = _Mutator(_skip_regions(tree))  # target None: only counts, changes nothing
    counter.visit(tree)
    found = []
    for index in range(len(counter.sites)):
        fresh = ast.parse(source)
        mutator = _Mutator(_skip_regions(fresh), target=index)
        mutated = ast.fix_missing_locations(mutator.visit(fresh))
        text = ast.unparse(mutated)
        if mutator.applied is None or text == original:
            continue
        try:
            compile(text, str(path), "exec")
        except SyntaxError:
            continue
        line = counter.sites[index][0]
        original_line = source.splitlines()[line - 1].strip() if 0 < line <= source.count("\n") + 1 else ""
        found.append(Mutant(module, path, index, line, mutator.applied, text, original_line))
    return found


def choose(pools: dict[str, list[Mutant]], max_mutants: int | None, seed: int) -> list[Mutant]:
    """Up to ``max_mutants`` mutants, shared evenly among modules (unused shares pass on), drawn with ``seed``."""
    rng = random.Random(seed)
    shuffled = {name: rng.sample(pool, len(pool)) for name, pool in pools.items()}
    limit = sum(len(pool) for pool in pools.values()) if max_mutants is None else max_mutants
    chosen: list[Mutant] = []
    while len(chosen) < limit and any(shuffled.values()):
        for pool in shuffled.values():
            if pool and len(chosen) < limit:
                chosen.append(pool.pop())
    return sorted(chosen, key=lambda m: (m.module, m.line, m.index))


def pytest_env(src_copy: Path) -> dict[str, str]:
    """The environment of a test run: the copy first on PYTHONPATH, no bytecode written, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src_copy), env.get("PYTHONPATH", "")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant of the same size and second must not reuse a stale .pyc
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_tests(tests: list[str], env: dict[str, str], timeout: float, quick: bool) -> tuple[str, float]:
    """('killed' | 'survived' | 'timeout', seconds) of one pytest run."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if quick:
        cmd += ["-m", "not slow"]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - started
    seconds = time.perf_counter() - started
    if proc.returncode == 5:
        raise SystemExit(f"no tests collected by {' '.join(tests)}")
    return ("survived" if proc.returncode == 0 else "killed"), seconds


def render_report(command: str, rows: list[tuple[Mutant, str]], seconds: float, section: str = "") -> str:
    """The generated part of the report: the command, counts per module, and each survivor."""
    begin, end = markers(section)
    lines = [begin, "", f"Command: `{command}`", "", f"{len(rows)} mutants in {seconds / 60:.1f} min.", ""]
    lines += ["| module | mutants | killed | survived | timeout |", "|---|---|---|---|---|"]
    for module in sorted({m.module for m, _ in rows}):
        outcomes = [o for m, o in rows if m.module == module]
        counts = [outcomes.count(k) for k in ("killed", "survived", "timeout")]
        lines.append(f"| `{module}` | {len(outcomes)} | {counts[0]} | {counts[1]} | {counts[2]} |")
    survivors = [m for m, o in rows if o == "survived"]
    lines += ["", f"Survivors ({len(survivors)}):", ""]
    for m in survivors:
        rel = m.path.relative_to(REPO) if m.path.is_relative_to(REPO) else m.path
        lines.append(f"- `{rel}:{m.line}` {m.description} in `{m.original}`")
    lines += ["", end]
    return "\n".join(lines)


def write_report(path: Path, generated: str, section: str = "") -> None:
    """Replace the marked section of ``path`` with ``generated``; keep everything around it."""
    begin, end = markers(section)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() else "# Mutation testing\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + generated + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_TESTS), help="dotted module names")
    parser.add_argument("--max-mutants", type=int, default=None, help="total mutants (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="which mutants are drawn")
    parser.add_argument("--tests", nargs="+", help="test files for every module (default: DEFAULT_TESTS)")
    parser.add_argument("--timeout", type=float, help="seconds per run (default: 3x the unmutated run, >= 60)")
    parser.add_argument("--quick", action="store_true", help="deselect tests marked slow")
    parser.add_argument("--list", action="store_true", help="print the chosen mutants and exit")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "MUTATION.md", help="markdown report")
    parser.add_argument("--match", nargs="+", help="only mutate lines containing one of these texts")
    parser.add_argument("--section", default="", help="name of the report section this run rewrites")
    args = parser.parse_args(argv)

    for module in args.modules:
        if not args.tests and module not in DEFAULT_TESTS:
            parser.error(f"no default tests for {module}; pass --tests FILE ...")
    pools = {m: mutants_of(module_path(m).read_text(), m, module_path(m)) for m in args.modules}
    if args.match:  # only mutants of lines holding one of the given texts
        pools = {m: [x for x in pool if any(t in x.original for t in args.match)] for m, pool in pools.items()}
    chosen = choose(pools, args.max_mutants, args.seed)
    if args.list:
        for m in chosen:
            print(f"{m.module}:{m.line} {m.description}")
        return 0
    # a plain kill must still remove the temporary copy (the context manager's exit runs on SystemExit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = "python tools/mutate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="mstok-mutate-") as tmp:
        src_copy = Path(tmp) / "src"
        shutil.copytree(REPO / "src", src_copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        env = pytest_env(src_copy)
        probe = subprocess.run([sys.executable, "-c", "import mstok; print(mstok.__file__)"], env=env, cwd=REPO,
                               capture_output=True, text=True, check=True)  # fmt: skip
        if not probe.stdout.strip().startswith(str(src_copy)):
            raise SystemExit(f"the tests would import mstok from {probe.stdout.strip()}, not from the copy")
        baselines: dict[tuple[str, ...], float] = {}
        for m in chosen:
            tests = args.tests or DEFAULT_TESTS[m.module]
            key = tuple(tests)
            if key not in baselines:  # the unmutated run must pass, and sets the timeout
                outcome, seconds = run_tests(tests, env, 3600, args.quick)
                if outcome != "survived":
                    raise SystemExit(f"the unmutated package fails {' '.join(tests)}: fix that first")
                baselines[key] = seconds
                print(f"baseline {' '.join(tests)}: {seconds:.1f} s", flush=True)
            target = src_copy / module_path(m.module).relative_to(REPO / "src")
            original = target.read_text()
            target.write_text(m.source)
            try:
                timeout = args.timeout or max(60.0, 3 * baselines[key])
                outcome, seconds = run_tests(tests, env, timeout, args.quick)
            finally:
                target.write_text(original)
            rows.append((m, outcome))
            print(f"{outcome:>8} {seconds:5.1f}s {m.module}:{m.line} {m.description}", flush=True)
    generated = render_report(command, rows, time.perf_counter() - started, args.section)
    write_report(args.report, generated, args.section)
    survived = sum(o == "survived" for _, o in rows)
    print(f"{len(rows)} mutants, {survived} survived; report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
