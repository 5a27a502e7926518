"""tools/mutate.py: its mutants are valid, each differs from the original by one planted change."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("mstok_mutate_tool", REPO / "tools" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


SOURCE = '''
"""A docstring that must stay."""
import torch


def f(x: int, y: float = 2.0) -> float:
    if x < 3 and not y:
        raise ValueError(f"bad {x + 1}")
    z = (x + y) * 2 - torch.clamp(x, 0, 1) / y
    z += -y
    return torch.maximum(x.detach(), y) if x is None else True
'''


def _diff(a: str, b: str) -> int:
    """How many statements' text differs between two sources."""
    sa, sb = ast.parse(a).body, ast.parse(b).body
    return sum(ast.dump(x) != ast.dump(y) for x, y in zip(sa, sb, strict=True))


def test_every_mutant_compiles_and_differs_in_one_place(mutate) -> None:
    mutants = mutate.mutants_of(SOURCE)
    original = ast.unparse(ast.parse(SOURCE))
    assert len(mutants) >= 15
    for m in mutants:
        compile(m.source, "<mutant>", "exec")
        assert m.source != original, m.description
        assert _diff(original, m.source) == 1, m.description  # only the function body changed
        assert '"""A docstring that must stay."""' in m.source
    descriptions = {m.description for m in mutants}
    for expected in (
        "`+` -> `-`",
        "`*` -> `/`",
        "`/` -> `*`",
        "`+=` -> `-=`",
        "comparison `Lt` -> `GtE`",
        "comparison `Is` -> `IsNot`",
        "constant `3` -> `4`",
        "constant `2.0` -> `1.0`",
        "`True` -> `False`",
        "dropped `.detach(...)`",
        "dropped `not`",
        "dropped unary minus",
        "swapped the first two arguments of `torch.maximum(...)`",
    ):
        assert expected in descriptions, expected


def test_raise_messages_and_annotations_are_not_mutated(mutate) -> None:
    for m in mutate.mutants_of(SOURCE):
        tree = ast.parse(m.source)
        func = tree.body[2]
        assert ast.unparse(func.body[0].body[0]) == "raise ValueError(f'bad {x + 1}')", m.description
        assert ast.unparse(func.returns) == "float" and ast.unparse(func.args.args[1].annotation) == "float"


def test_specific_rewrites(mutate) -> None:
    by_description = {m.description: m.source for m in mutate.mutants_of(SOURCE)}
    assert "torch.maximum(y, x.detach())" in by_description["swapped the first two arguments of `torch.maximum(...)`"]
    assert "torch.maximum(x, y)" in by_description["dropped `.detach(...)`"]
    assert "z = (x + y) * 2 - x / y" in by_description["dropped `.clamp(...)`"]
    assert "z += y" in by_description["dropped unary minus"]


def test_lines_point_at_the_mutated_statement(mutate) -> None:
    lines = SOURCE.splitlines()
    for m in mutate.mutants_of(SOURCE):
        text = lines[m.line - 1]
        assert m.original == text.strip()  # kept with the mutant: the file may change during a run
        if "detach" in m.description:
            assert "detach" in text
        if "clamp" in m.description:
            assert "clamp" in text


def test_choice_is_seeded_and_shared_among_modules(mutate) -> None:
    pools = {name: mutate.mutants_of(SOURCE, name) for name in ("a", "b", "c")}
    first = mutate.choose(pools, 7, seed=1)
    assert [(m.module, m.index) for m in first] == [(m.module, m.index) for m in mutate.choose(pools, 7, seed=1)]
    assert len(first) == 7 and {m.module for m in first} == {"a", "b", "c"}
    assert max(sum(m.module == n for m in first) for n in "abc") == 3
    assert len(mutate.choose(pools, None, seed=0)) == sum(len(p) for p in pools.values())


def test_report_keeps_the_text_around_its_markers(mutate, tmp_path: Path) -> None:
    report = tmp_path / "MUTATION.md"
    report.write_text(f"# Notes\n\nbefore\n\n{mutate.BEGIN}\nold run\n{mutate.END}\n\nafter: survivors judged\n")
    m = mutate.mutants_of(SOURCE, "mstok.x", REPO / "tools" / "mutate.py")[0]
    generated = mutate.render_report("python tools/mutate.py --seed 0", [(m, "survived"), (m, "killed")], 61.0)
    mutate.write_report(report, generated)
    text = report.read_text()
    assert text.startswith("# Notes\n\nbefore\n\n") and text.endswith("\n\nafter: survivors judged\n")
    assert "old run" not in text and "| `mstok.x` | 2 | 1 | 1 | 0 |" in text and "Survivors (1)" in text
    # A named section is added beside the default one, and rewritten in place later.
    mutate.write_report(report, mutate.render_report("cmd a", [(m, "killed")], 1.0, "extra"), "extra")
    mutate.write_report(report, mutate.render_report("cmd b", [(m, "killed")], 1.0, "extra"), "extra")
    text = report.read_text()
    assert text.count("<!-- mutate:begin extra -->") == 1 and "cmd b" in text and "cmd a" not in text
    assert "Survivors (1)" in text  # the default section is untouched


def test_env_puts_the_copy_first_and_module_paths_resolve(mutate, tmp_path: Path) -> None:
    env = mutate.pytest_env(tmp_path)
    assert env["PYTHONPATH"].split(":")[0] == str(tmp_path) and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert mutate.module_path("mstok.evaluation.metrics") == REPO / "src" / "mstok" / "evaluation" / "metrics.py"
    assert mutate.module_path("mstok.evaluation") == REPO / "src" / "mstok" / "evaluation" / "__init__.py"
    with pytest.raises(SystemExit, match="not found"):
        mutate.module_path("mstok.nope")
    for module, tests in mutate.DEFAULT_TESTS.items():
        assert mutate.module_path(module).is_file()
        assert all((REPO / t).is_file() for t in tests), module


def test_list_mode_runs_nothing(mutate, capsys) -> None:
    assert mutate.main(["--modules", "mstok.evaluation.metrics", "--max-mutants", "3", "--list"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert mutate.main(["--modules", "mstok.evaluation.metrics", "--match", "clamp_min", "--list"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    source = (REPO / "src" / "mstok" / "evaluation" / "metrics.py").read_text().splitlines()
    line = next(i for i, text in enumerate(source, start=1) if "clamp_min" in text)  # the one line that matches
    assert listed and all(f":{line} " in entry for entry in listed)
