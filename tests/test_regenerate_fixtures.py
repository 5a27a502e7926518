"""tools/regenerate_fixtures.py: importable without the official code, its --help, and in step with the fixtures.

The script itself runs by hand against a bytedance/1d-tokenizer checkout (see its docstring);
here we check what can be checked without one: it imports, documents itself, describes exactly
the committed fixtures (configs, weight file names, sampler cases), and refuses a folder that
is not an official checkout.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "regenerate_fixtures.py"
FIXTURES = REPO / "tests" / "fixtures" / "titok"


@pytest.fixture(scope="module")
def regen():
    spec = importlib.util.spec_from_file_location("mstok_regenerate_fixtures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_help_runs_and_names_the_inputs() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--official" in result.stdout and "--only" in result.stdout and "1d-tokenizer" in result.stdout


def test_docstring_says_what_it_imports_and_writes(regen) -> None:
    doc = regen.__doc__
    for needed in ("modeling.titok", "modeling.maskgit", "configs/infer/TiTok", "reference.safetensors", "float16"):
        assert needed in doc, needed


def test_specs_match_the_committed_fixtures(regen) -> None:
    for table in (regen.TOKENIZERS, regen.GENERATORS):
        for name, (spec, weights, _seed) in table.items():
            committed = json.loads((FIXTURES / name / "config.json").read_text())
            assert committed == spec, name
            assert (FIXTURES / name / weights).is_file(), name
    expected = {p.parent.name for p in FIXTURES.glob("*/reference.safetensors")}
    assert expected == set(regen.TOKENIZERS) | set(regen.GENERATORS)


def test_generator_layouts_match_the_releases(regen) -> None:
    # (the sampler cases are one table: tests/test_convert_titok_generator.py reads regen.SAMPLERS)
    layouts = json.loads((FIXTURES / "official_generator_layouts.json").read_text())
    assert set(layouts) == set(regen.GENERATOR_RELEASES)


def test_reference_keys_are_those_the_tests_read(regen) -> None:
    from mstok.io import read_safetensors

    vq = set(read_safetensors(FIXTURES / "legacy_s" / "reference.safetensors"))
    assert vq == {"images", "tokens", "recon", "decoded"}
    vae = set(read_safetensors(FIXTURES / "vae_ll" / "reference.safetensors"))
    assert vae == {"images", "mean", "logvar", "kl", "decoded"}
    gen = set(read_safetensors(FIXTURES / "generator_bert" / "reference.safetensors"))
    assert gen == {"tokens", "labels", "logits_cond", "logits_uncond", "gen_labels"} | {
        f"ids_{case}" for case in regen.SAMPLERS
    }


def test_refuses_a_folder_that_is_not_an_official_checkout(regen, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a bytedance/1d-tokenizer checkout"):
        regen.main(["--official", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
