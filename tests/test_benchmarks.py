"""Smoke tests of the benchmark scripts: they run end to end on tiny presets (no timing asserted)."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_runs(tmp_path: Path) -> None:
    """The train-step benchmark times one real trainer step and returns a positive rate, writing nothing."""
    bench = _load("train_step")
    out = tmp_path / "RESULTS.md"
    # one thread: with OpenMP on a busy 2-core machine, 2 threads can make a step many times slower
    argv = ["--presets", "vqgan_tiny", "--stage-presets", "", "--modes", "fp32", "--batch-size", "2", "--threads", "1"]
    threads = torch.get_num_threads()
    results = bench.main([*argv, "--warmup", "1", "--steps", "1", "--no-append", "--out", str(out)])
    assert torch.get_num_threads() == threads  # main puts the thread count back
    assert [(r.row.preset, r.row.stage, r.row.mode) for r in results] == [("vqgan_tiny", "single", "fp32")]
    for r in results:
        assert r.error is None
        assert len(r.step_times) == 1
        assert r.samples_per_s > 0 and math.isfinite(r.samples_per_s)
    assert not out.exists()
    table = bench.make_table(results)
    assert "| vqgan_tiny | single" in table


# one thread, tiny matmul reference: rows run in milliseconds even on a busy 2-core machine
THROUGHPUT_ARGS = ["--batch-sizes", "2", "--modes", "fp32", "--reps", "1", "--mm-size", "128", "--mm-reps", "1"]


def test_throughput_benchmark_runs(tmp_path: Path) -> None:
    """Encode, decode and two-stage decode rows of a tiny preset get positive images/s and GFLOP/s, writing nothing."""
    bench = _load("throughput")
    out = tmp_path / "RESULTS.md"
    threads = torch.get_num_threads()
    argv = ["--presets", "titok_tiny", "--two-stage", "titok_tiny", *THROUGHPUT_ARGS, "--threads", "1"]
    results = bench.main([*argv, "--no-append", "--out", str(out)])
    assert torch.get_num_threads() == threads  # main puts the thread count back
    rows = [(r.row.model.label, r.row.part, r.row.batch_size, r.row.mode) for r in results]
    assert rows == [
        ("titok_tiny", "encode", 2, "fp32"),
        ("titok_tiny", "decode", 2, "fp32"),
        ("titok_tiny + vqgan_tiny", "decode2", 2, "fp32"),
    ]
    for r in results:
        assert r.error is None and r.skipped is None
        assert len(r.call_times) == 1
        assert r.images_per_s > 0 and math.isfinite(r.images_per_s)
        assert r.gflops_per_s > 0 and math.isfinite(r.gflops_per_s)
    # the pixel decoder makes the two-stage decode cost more than the ViT decoder alone
    assert results[2].flops_per_image > results[1].flops_per_image > 0
    assert not out.exists()
    table = bench.make_table(results)
    assert "| titok_tiny | encode | cpu fp32 | 2 |" in table
    assert "| titok_tiny + vqgan_tiny | decode (two-stage, to pixels) |" in table


def test_throughput_benchmark_skips_rows_over_the_call_limit(tmp_path: Path) -> None:
    """A row estimated above --max-call-s is reported as skipped, never run; the section says so."""
    bench = _load("throughput")
    out = tmp_path / "RESULTS.md"
    argv = ["--presets", "mstok_tiny", "--two-stage", "", *THROUGHPUT_ARGS, "--threads", "1"]
    results = bench.main([*argv, "--max-call-s", "1e-9", "--out", str(out)])
    assert [r.row.part for r in results] == ["encode", "decode"]
    assert all(r.skipped and not r.call_times and r.error is None for r in results)
    text = out.read_text()
    assert "## Inference throughput" in text and "| mstok_tiny | encode | cpu fp32 | 2 |" in text
    assert "skipped (est." in text


def test_throughput_preset_overrides_and_the_random_first_stage(tmp_path: Path) -> None:
    """NAME:FIELD=VALUE builds the preset with that field changed (here fewer tokens: fewer decoder
    FLOPs); a bad override is a usage error; a VAE that is not on disk is replaced by SD3.5's
    architecture with random weights only when asked."""
    bench = _load("throughput")
    argv = ["--presets", "mstok_tiny,mstok_tiny:num_latent_tokens=8", "--two-stage", "", *THROUGHPUT_ARGS]
    results = bench.main([*argv, "--threads", "1", "--no-append"])
    labels = [r.row.model.label for r in results]
    assert labels == ["mstok_tiny", "mstok_tiny", "mstok_tiny num_latent_tokens=8", "mstok_tiny num_latent_tokens=8"]
    assert all(r.error is None for r in results) and results[3].flops_per_image < results[1].flops_per_image
    for bad in ("mstok_tiny:num_latent_tokens", "mstok_tiny:no_such_field=1"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--presets", bad])
    pytest.importorskip("diffusers")
    vae = {"type": "vae", "path": str(tmp_path / "absent")}
    model = bench.Model(
        "semtok_tiny", overrides=(("latent_space", vae), ("latent_channels", 16), ("latent_downsample", 8))
    )
    assert bench.first_stage(model) == (None, "first stage 'vae' not available offline")
    space, why = bench.first_stage(model, random_vae=True)
    assert why is None and (space.channels, space.downsample) == (16, 8)


def test_flops_benchmark_plots_and_adds_two_stage_rows(tmp_path: Path) -> None:
    """flops_vs_tokens on tiny presets writes a PNG and a section with the two-stage (pixel decoder) table."""
    bench = _load("flops_vs_tokens")
    png, out = tmp_path / "flops.png", tmp_path / "RESULTS.md"
    argv = ["--models", "titok_tiny,mstok_tiny", "--ks", "8,32", "--image-size", "64"]
    assert bench.main([*argv, "--plot", str(png), "--out", str(out)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.read_text()
    assert "| titok_tiny | 32 | vqgan_tiny |" in text  # two-stage row: decoder + the tiny proxy's pixel decoder
    assert "![GFLOPs vs K](flops.png)" in text
    assert "the same as the two-stage tokenizers' `pixel_decoder`" in text
    # a second run replaces its section in place (the first moves to history/); --section keeps a variant apart
    assert bench.main([*argv, "--ks", "8", "--no-plot", "--out", str(out)]) == 0
    assert bench.main([*argv, "--ks", "32", "--no-plot", "--out", str(out), "--section", "flops-k32"]) == 0
    text = out.read_text()
    assert text.count("<!-- benchmark: flops_vs_tokens -->") == 1 and "<!-- benchmark: flops-k32 -->" in text
    assert "| titok_tiny | 32 | vqgan_tiny |" in text.split("<!-- benchmark: flops-k32 -->")[1]
    assert "| titok_tiny | 32 |" not in text.split("<!-- benchmark: flops-k32 -->")[0]
    assert "![GFLOPs vs K](flops.png)" in (tmp_path / "history" / "flops_vs_tokens.md").read_text()


def test_harness_tables() -> None:
    """Mean ± half the spread (one seed: the value alone), mean ± std, and the markdown alignment rule."""
    harness = _load("harness")
    assert harness.cell([1.0, 2.0, None], 2) == "1.50 ± 0.50" and harness.cell([3.0], 1) == "3.0"
    assert harness.cell([None], 2) == "-"
    assert harness.mean_std([1.0, 3.0], 1) == "2.0 ± 1.4" and harness.mean_std([2.0], 2) == "2.00 ± 0.00"
    table = harness.markdown_table(["a", "b", "c"], [["x", "1", "2"], harness.mean_colour_row(3, {2: "9"})], left=2)
    assert table.splitlines() == [
        "| a | b | c |",
        "|---|---|---:|",
        "| x | 1 | 2 |",
        f"| {harness.MEAN_COLOUR} | - | 9 |",
    ]
    assert harness.markdown_table(["a", "b", "c"], [], left=(0, 2)).splitlines()[1] == "|---|---:|---|"


def _section(text: str, name: str) -> str:
    start, end = f"<!-- benchmark: {name} -->", f"<!-- end benchmark: {name} -->"
    return text[text.index(start) : text.index(end) + len(end)]


def test_saved_run_ignores_where_a_run_lives_but_not_what_it_is(tmp_path: Path) -> None:
    """A finished run is reused when only its paths are spelt another way (the same work dir given as
    ``../runs`` retrained a generator once); any other setting that differs is a new run; the result file
    is replaced whole."""
    harness = _load("harness")
    identity = {"steps": 2, "out_dir": "runs/g/run", "data": {"path": "runs/g/tokens", "num_workers": 0}}
    harness.save_result(tmp_path, {"identity": identity, "loss": [1.0]})
    assert not (tmp_path / "result.json.partial").exists()
    where = ("out_dir", "data.path")
    moved = {**identity, "out_dir": "../runs/g/run", "data": {"path": "../runs/g/tokens", "num_workers": 0}}
    assert harness.saved_run(tmp_path / "result.json", moved, False, where=where)["loss"] == [1.0]
    assert harness.saved_run(tmp_path / "result.json", moved, False) is None  # without ``where`` paths count
    assert harness.saved_run(tmp_path / "result.json", {**moved, "steps": 3}, False, where=where) is None
    other = {**moved, "data": {"path": "x", "num_workers": 2}}
    assert harness.saved_run(tmp_path / "result.json", other, False, where=where) is None
    assert harness.saved_run(tmp_path / "result.json", identity, True, where=where) is None  # fresh


def test_a_generator_run_is_the_same_whether_its_config_restates_the_preset_or_not(tmp_path: Path) -> None:
    """Overrides equal to what the preset holds (a config spelling ``label_gain = 32`` out, or not) name the
    same run; one that differs from the preset, or one of a preset edited since, is another run."""
    harness = _load("harness")
    model = {"preset": "dit_tiny", "overrides": {"num_tokens": 85, "label_gain": 32.0, "scales": [1, 2, 4, 8]}}
    identity = {"steps": 2, "model": model}
    harness.save_result(tmp_path, {"identity": identity, "loss": [1.0]})
    left = {"steps": 2, "model": {**model, "overrides": {"num_tokens": 85, "scales": [1, 2, 4, 8]}}}
    found = functools.partial(harness.saved_run, tmp_path / "result.json", fresh=False, same=harness.unrestated)
    assert found(left)["loss"] == [1.0]
    assert harness.saved_run(tmp_path / "result.json", left, False) is None  # compared as written
    assert found({**left, "model": {**model, "overrides": {**model["overrides"], "label_gain": 8.0}}}) is None
    assert found({**left, "model": {**model, "overrides": {"num_tokens": 85}}}) is None  # scales: not the preset's
    unknown = {"steps": 2, "model": {"preset": "gone", "overrides": {"a": 1}}}
    assert harness.unrestated(unknown) == unknown  # a preset that no longer exists restates nothing


def test_write_section_creates_replaces_and_keeps_the_old_one_in_history(tmp_path: Path) -> None:
    """A benchmark's section is added when missing, then replaced in place by each newer run: the rest of
    the file is untouched, the replaced section is appended unchanged to history/<name>.md, and the
    reading is kept (unless the script writes one)."""
    harness = _load("harness")
    out = tmp_path / "RESULTS.md"
    before = "# Benchmark results\n\nIntro.\n\n## A section written by hand (2026-12-01)\n\nIts text.\n"
    out.write_text(before)
    assert harness.write_section(out, "quantizers", "Quantizers at equal bits", "Newest run: 1.\n\n| t | 1 |") is None
    assert harness.write_section(out, "semtok", "SemTok at tiny scale", "Newest run: S.") is None
    text = out.read_text()
    assert text.startswith(before + "\n<!-- benchmark: quantizers -->\n## Quantizers at equal bits\n\nNewest run: 1.")
    assert harness.NO_READING in _section(text, "quantizers") and not (tmp_path / "history").exists()
    # the reading is written by hand, and text after the sections too
    first = _section(text, "quantizers").replace(harness.NO_READING, "Reading: VQ leads.")
    out.write_text(text.replace(_section(text, "quantizers"), first) + "\nA note after the sections.\n")
    moved = harness.write_section(out, "quantizers", "Quantizers at equal bits", "Newest run: 2.\n\n| t | 2 |")
    assert moved == tmp_path / "history" / "quantizers.md"
    text = out.read_text()
    second = _section(text, "quantizers")
    assert "| t | 2 |" in second and "| t | 1 |" not in text and "Reading: VQ leads." in second
    assert "Earlier runs: `history/quantizers.md`." in second
    assert text.startswith(before) and text.endswith("\nA note after the sections.\n")
    assert text.index(second) < text.index("<!-- benchmark: semtok -->")  # in place, before the later section
    assert "Newest run: S." in _section(text, "semtok")  # other sections untouched
    assert moved.read_text().endswith("\n" + first + "\n")  # the replaced section, unchanged
    harness.write_section(out, "quantizers", "Quantizers at equal bits", "Newest run: 3.", reading="Reading: new.")
    text = out.read_text()
    assert "Reading: new." in text and "Reading: VQ leads." not in text
    history = moved.read_text()
    assert history.index(first) < history.index(second) and history.count("<!-- benchmark: quantizers -->") == 2


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("<!-- benchmark: quantizers -->\n## Q\n", r"RESULTS.md:1: section 'quantizers' has no end marker"),
        ("## Q\n<!-- end benchmark: quantizers -->\n", r"RESULTS.md:2: end of section 'quantizers' without its start"),
        ("<!-- benchmark: quantizers\n## Q\n", r"RESULTS.md:1: malformed benchmark marker"),
        ("<!--end benchmark:quantizers->\n", r"RESULTS.md:1: malformed benchmark marker"),
        (
            "<!-- benchmark: semtok -->\n<!-- benchmark: quantizers -->\n<!-- end benchmark: quantizers -->\n",
            r"RESULTS.md:2: section 'quantizers' starts inside section 'semtok'",
        ),
        (
            "<!-- benchmark: quantizers -->\n<!-- end benchmark: quantizers -->\n" * 2,
            r"RESULTS.md:3: a second section 'quantizers'",
        ),
        (
            "<!-- benchmark: quantizers -->\n<!-- reading -->\nR\n<!-- end benchmark: quantizers -->\n",
            r"RESULTS.md:2: the section's reading needs",
        ),
    ],
)
def test_write_section_refuses_a_malformed_marker(tmp_path: Path, text: str, error: str) -> None:
    """A marker that is malformed, unmatched or nested is a clear error naming the line; nothing is written."""
    harness = _load("harness")
    out = tmp_path / "RESULTS.md"
    out.write_text(text)
    with pytest.raises(ValueError, match=error):
        harness.write_section(out, "quantizers", "Quantizers at equal bits", "Newest run.")
    assert out.read_text() == text and not (tmp_path / "history").exists()


def _published_sections() -> dict[str, str]:
    """Section name -> title of every ``harness.publish`` call into RESULTS.md, read from the scripts'
    source: a literal name and title, a title in ``title = "..."``, or the ``--quick`` variants
    (``name = "X-quick" if args.quick else "X"`` with the title ``f"...{quick}"``, quick = " (quick)")."""
    found = {}
    for script in sorted(BENCHMARKS.glob("*.py")):
        source = script.read_text()
        if "REPLICATION.md" in source:  # replicate.py writes its own file
            continue
        found.update(re.findall(r'harness\.publish\(args, "([\w.-]+)", "([^"{]+)"', source))
        title = re.search(r'^\s*title = "([^"]+)"\n\s*harness\.publish\(args, "([\w.-]+)", title', source, re.M)
        if title:
            found[title[2]] = title[1]
        quick = re.search(r'name = "([\w.-]+)-quick" if args\.quick else "\1"', source)
        if quick:
            base = re.search(r'harness\.publish\(args, name, f"([^"{]+)\{quick\}"', source)[1]
            found.update({quick[1]: base, f"{quick[1]}-quick": f"{base} (quick)"})
    return found


def test_results_md_has_the_section_each_benchmark_replaces() -> None:
    """The committed RESULTS.md parses, and holds one section for each name a script publishes under, with
    the title it writes (so a run replaces that section instead of adding one), a reading and a history file."""
    harness = _load("harness")
    text = harness.RESULTS.read_text()
    lines = text.splitlines()
    sections = harness.find_sections(text, harness.RESULTS)
    published = _published_sections()
    assert len(published) == 17 and set(published) <= set(sections)
    for name, (start, end) in sections.items():
        heading = lines[start + 1]
        assert heading == f"## {published[name]}" if name in published else heading.startswith("## ")
        assert harness.section_reading(lines[start : end + 1], harness.RESULTS, start) not in (None, harness.NO_READING)
        assert (BENCHMARKS / "history" / f"{name}.md").is_file()
    # the index at the top links every section (a reader finds the current number there first)
    indexed = re.findall(r"^\| \[([\w.-]+)\]\(#", text, re.M)
    assert sorted(indexed) == sorted(sections), set(indexed) ^ set(sections)


def test_write_section_refuses_a_name_no_marker_can_hold(tmp_path: Path) -> None:
    harness = _load("harness")
    with pytest.raises(ValueError, match="section name 'flops k32'"):
        harness.write_section(tmp_path / "RESULTS.md", "flops k32", "FLOPs", "Newest run.")
    assert not (tmp_path / "RESULTS.md").exists()


def test_mstok_bench_runs_one_script(tmp_path: Path, capsys) -> None:
    """`mstok bench --only throughput -- ARGS` runs the script from --benchmarks-dir, prints, appends nothing."""
    from mstok.cli import BENCH_HARNESS, BENCH_SCRIPTS, main

    for name in [*BENCH_SCRIPTS.values(), BENCH_HARNESS]:  # `mstok bench` wants every script it knows in the folder
        (tmp_path / f"{name}.py").write_text((BENCHMARKS / f"{name}.py").read_text())
    argv = ["--presets", "titok_tiny", "--two-stage", "", *THROUGHPUT_ARGS, "--threads", "1"]
    before = sys.modules.get("harness")
    assert main(["bench", "--only", "throughput", "--benchmarks-dir", str(tmp_path), "--", *argv]) == 0
    assert "| titok_tiny | decode | cpu fp32 | 2 |" in capsys.readouterr().out
    assert not (tmp_path / "RESULTS.md").exists()
    # the copy's harness is not left behind for the next test's scripts (they would find the copy's paths)
    assert sys.modules.get("harness") is before


# tiny pairs, few steps, one timed call: each row runs in well under a second on one thread
SAMPLING_ARGS = ["--batch-size", "2", "--precisions", "fp32", "--reps", "1", "--threads", "1"]


def test_sampling_benchmark_runs(tmp_path: Path) -> None:
    """Sampling + decoding rows of both tiny pairs get positive, finite timings and images/s; a section is written."""
    bench = _load("sampling")
    quick = bench.parse_args(["--quick"])
    assert (quick.pairs, quick.generator, quick.batch_size, quick.steps) == (
        ["titok_tiny", "mstok_tiny"],
        "maskgit_tiny",
        8,
        [8, 64],
    )
    out = tmp_path / "RESULTS.md"
    threads = torch.get_num_threads()
    argv = ["--quick", "--steps", "2,4", *SAMPLING_ARGS, "--out", str(out)]
    results = bench.main(argv)
    assert torch.get_num_threads() == threads  # main puts the thread count back
    rows = [(r.row.pair, r.num_tokens, r.row.steps, r.row.mode, r.row.batch_size) for r in results]
    assert rows == [
        ("titok_tiny + maskgit_tiny", 32, 2, "fp32", 2),
        ("titok_tiny + maskgit_tiny", 32, 4, "fp32", 2),
        ("mstok_tiny + maskgit_tiny", 32, 2, "fp32", 2),
        ("mstok_tiny + maskgit_tiny", 32, 4, "fp32", 2),
    ]
    for r in results:
        assert r.error is None and r.calls == 1
        for value in (r.sample_s, r.decode_s, r.total_s, r.images_per_s):
            assert value > 0 and math.isfinite(value)
        assert r.peak_mem_bytes is None  # CPU: no peak memory
    text = out.read_text()
    assert "## Sampling + decoding throughput (quick)" in text
    assert "| titok_tiny + maskgit_tiny | 32 | 1024 | 64x64 | 4 | cpu fp32 | 2 | 1 |" in text
    assert "classifier-free guidance off" in text


# gpu_check.py's CPU run: tiny presets at 64 px against vqgan_tiny, fp32 only, compile skipped
GPU_CHECK_CPU = ["--device", "cpu", "--presets", "titok_tiny,mstok_tiny", "--steps", "2", "--budget", "1"]


def _table_rows(table: str) -> tuple[list[str], list[list[str]]]:
    """A markdown table's header cells and its rows' cells."""
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    return lines[0], lines[2:]


@pytest.mark.slow  # ~10 s on a busy 2-core machine (8 rows, FLOPs counted for each)
def test_gpu_check_runs_on_cpu_with_tiny_presets(tmp_path: Path, capsys) -> None:
    """gpu_check.py with tiny presets on the CPU: a stage-1 training row per preset x mode and the encode/decode
    rows, with finite images/s, an MFU column (no peak known for a CPU), the official row not run; nothing written."""
    bench = _load("gpu_check")
    out = tmp_path / "RESULTS.md"
    threads = torch.get_num_threads()
    results = bench.main([*GPU_CHECK_CPU, "--threads", "1", "--no-write", "--out", str(out)])
    assert torch.get_num_threads() == threads  # main puts the thread count back
    presets = ["titok_tiny", "mstok_tiny"]
    assert [(r.row.model, r.row.mode) for r in results if r.row.training] == [(p, "fp32") for p in presets]
    inference = [(r.row.model, r.row.kind, r.row.mode) for r in results if not r.row.training]
    assert inference == [(p, part, "fp32") for p in presets for part in ("encode", "decode", "decode2")]
    for r in results:
        assert r.error is None and r.skipped is None
        assert 1 <= len(r.times) <= 2
        assert r.images_per_s > 0 and math.isfinite(r.images_per_s)
        assert r.forward_flops > 0 and r.peak_mem_bytes is None  # CPU: no peak memory
        assert r.warmup_s >= 0 and r.build_s >= 0
    for r in (r for r in results if r.row.training):
        assert (r.batch_size, r.image_size) == (8, 64)
        assert math.isfinite(r.loss) and r.trainable_params > 0 and r.proxy_flops > 0
        assert r.model_flops == 3 * r.forward_flops
    printed = capsys.readouterr().out
    table = bench.train_table(results, None, False)
    assert table in printed and "not run (pass --official DIR)" in printed
    head, rows = _table_rows(table)
    assert {"images/s", "MFU", "MFU +proxy", "÷ official", "warm-up (s)"} <= set(head)
    assert [row[:2] for row in rows] == [
        ["titok_tiny stage 1", "cpu fp32"],
        ["mstok_tiny stage 1", "cpu fp32"],
        ["official TiTok-B-64", "not run (pass --official DIR)"],
    ]
    for row in rows[:2]:
        assert float(row[head.index("images/s")]) > 0 and math.isfinite(float(row[head.index("images/s")]))
        assert row[head.index("MFU")] == "unknown peak"
    head, rows = _table_rows(bench.infer_table(results, None))
    assert len(rows) == 6 and all(row[head.index("MFU")] == "unknown peak" for row in rows)
    # with a peak (--peak-tflops), the MFU column holds percentages
    head, rows = _table_rows(bench.train_table(results, 1e12, False))
    assert all(re.fullmatch(r"\d+\.\d%", row[head.index("MFU")]) for row in rows[:2])
    assert not out.exists()


def test_gpu_check_mfu_arithmetic() -> None:
    """MFU = 3 x forward FLOPs x batch / median step / peak; the peak by device name, or unknown."""
    bench = _load("gpu_check")
    # 100 GFLOPs forward per image, batch 32: 9.6 TFLOP per training step; 20 ms steps on a 989 TFLOP/s device
    assert bench.mfu(9.6e12, 0.02, 989e12) == pytest.approx(0.48533, abs=1e-5)
    assert bench.mfu_cell(bench.mfu(9.6e12, 0.02, 989e12)) == "48.5%"
    assert bench.mfu(9.6e12, 0.02, None) is None and bench.mfu_cell(None) == "unknown peak"
    assert bench.mfu_cell(bench.mfu(9.6e12, math.nan, 989e12)) == "-"
    train = bench.Result(bench.Row("train", "titok_b64", "bf16"), "cuda", 32, 256, forward_flops=100 * 10**9,
                         proxy_flops=50 * 10**9, times=[0.03, 0.02, 0.01])  # fmt: skip
    assert train.model_flops == 300 * 10**9 and train.median_s == 0.02 and train.images_per_s == 1600
    assert train.mfu(989e12) == pytest.approx(0.48533, abs=1e-5)
    assert train.mfu(989e12, with_proxy=True) == pytest.approx(350e9 * 32 / 0.02 / 989e12)
    encode = bench.Result(bench.Row("encode", "titok_b64", "bf16"), "cuda", 32, 256, forward_flops=10**11, times=[0.01])
    assert encode.model_flops == 10**11 and encode.mfu(312e12) == pytest.approx(1e11 * 32 / 0.01 / 312e12)
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == ("H100 SXM bf16 dense 989 TFLOP/s", 989e12)
    assert bench.peak_flops("NVIDIA H100 PCIe")[1] == 756e12
    assert bench.peak_flops("NVIDIA H200")[1] == 989e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB")[1] == 312e12
    assert bench.peak_flops("NVIDIA H100 NVL") is None and bench.peak_flops("AMD EPYC") is None
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", 500.0) == ("--peak-tflops 500", 500e12)


@pytest.mark.slow
def test_gpu_check_sh_runs_the_check_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh installs nothing where torch and mstok import, and runs gpu_check.py (on the CPU
    when allowed), copying the log and RESULTS.md to $OUT."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_ALLOW_CPU": "1", "OUT": str(tmp_path),
           "OMP_NUM_THREADS": "1", "WHEELHOUSE": str(tmp_path / "none")}  # fmt: skip
    # the script's own job (install nothing, run, copy the log): one preset, no inference rows
    argv = [*GPU_CHECK_CPU, "--presets", "titok_tiny", "--parts", "", "--threads", "1", "--no-write"]
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), *argv], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installing nothing" in done.stdout and "torch sees no CUDA" not in done.stderr
    assert "| titok_tiny stage 1 | cpu fp32 | 8 | 64 |" in done.stdout
    assert "| titok_tiny stage 1 | cpu fp32 |" in (tmp_path / "gpu_check.log").read_text()
    assert (tmp_path / "RESULTS.md").read_text() == (BENCHMARKS / "RESULTS.md").read_text()  # --no-write
    without_cuda = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), *argv], capture_output=True, text=True,
                                  env={**env, "GPU_CHECK_ALLOW_CPU": "0"}, timeout=600)  # fmt: skip
    assert without_cuda.returncode == (0 if torch.cuda.is_available() else 2)


@pytest.mark.slow
def test_gpu_check_official_row_on_cpu(tmp_path: Path) -> None:
    """With MSTOK_OFFICIAL_TITOK=DIR (a bytedance/1d-tokenizer checkout whose imports are installed), the official
    stage-1 model counts mstok's titok_b64 stage-1 FLOPs and parameters, and its step runs at a small size."""
    official = os.environ.get("MSTOK_OFFICIAL_TITOK")
    if not official:
        pytest.skip("MSTOK_OFFICIAL_TITOK (a bytedance/1d-tokenizer checkout) not set")
    bench = _load("gpu_check")
    step = bench.official_stage1(Path(official), bench.OFFICIAL_CONFIG, [], "fp32", torch.device("cpu"), tmp_path)
    step.restore()
    image = torch.rand(1, 3, 256, 256)
    forward, proxy = bench.stage1_flops("titok_b64")
    # their forward also counts the quantizer's distance matmul (2 x 64 x 12 x 4096 FLOPs), mstok's does not
    assert bench.count_flops(step.model, image) - forward == 2 * 64 * 12 * 4096
    assert bench.count_flops(step.proxy.encoder, image) == proxy
    with torch.device("meta"):
        mstok = bench.create_tokenizer("titok_b64", head="proxy_codes")
    assert sum(p.numel() for p in step.model.parameters()) == sum(p.numel() for p in mstok.parameters())
    small = ["dataset.preprocessing.crop_size=64", "model.vq_model.vit_enc_model_size=small",
             "model.vq_model.vit_dec_model_size=small"]  # fmt: skip
    argv = ["--device", "cpu", "--presets", "titok_tiny", "--parts", "", "--steps", "1", "--budget", "0.1",
            "--batch-size", "2", "--threads", "1", "--no-write", "--official", official,
            *[a for s in small for a in ("--official-set", s)]]  # fmt: skip
    results = bench.main(argv)
    assert [(r.row.kind, r.error) for r in results] == [("train", None), ("official", None)]
    assert math.isfinite(results[1].loss) and results[1].image_size == 64 and results[1].forward_flops > 0
    _, rows = _table_rows(bench.train_table(results, None, True))
    assert rows[1][0] == "official TiTok (titok_b64, changed)" and rows[1][13] == "1.00"


def test_mstok_bench_runs_sampling_with_guidance(tmp_path: Path, capsys) -> None:
    """`mstok bench --only sampling` runs sampling.py --quick (here with guidance on), prints, appends nothing."""
    from mstok.cli import BENCH_HARNESS, BENCH_SCRIPTS, main

    for name in [*BENCH_SCRIPTS.values(), BENCH_HARNESS]:
        (tmp_path / f"{name}.py").write_text((BENCHMARKS / f"{name}.py").read_text())
    argv = ["--pairs", "mstok_tiny", "--steps", "2", "--guidance", "1.5", *SAMPLING_ARGS]
    assert main(["bench", "--only", "sampling", "--benchmarks-dir", str(tmp_path), "--", *argv]) == 0
    assert "| mstok_tiny + maskgit_tiny | 32 | 1024 | 64x64 | 2 | cpu fp32 | 2 | 1 |" in capsys.readouterr().out
    assert not (tmp_path / "RESULTS.md").exists()


def test_mstok_bench_without_benchmarks_folder(tmp_path: Path, capsys) -> None:
    """An installed copy has no benchmarks/ folder: a clear error, exit code 2."""
    from mstok.cli import main

    assert main(["bench", "--benchmarks-dir", str(tmp_path / "missing")]) == 2
    assert "no benchmark scripts in" in capsys.readouterr().err


def test_replicate_runs_a_variant_end_to_end(tmp_path, tiny_imagenet):
    replicate = _load("replicate")
    argv = ["--data", str(tiny_imagenet), "--steps", "2", "--batch-size", "8", "--classes", "3", "--seeds", "0"]
    argv += ["--variants", "mstok K=32", "--probe-epochs", "2", "--jobs", "1", "--work-dir", str(tmp_path)]
    argv += ["--results", str(tmp_path / "results.json")]
    results = replicate.main([*argv, "--out", str(tmp_path / "REPLICATION.md")])
    runs = results["mstok K=32"]
    assert len(runs) == 1 and all(r["psnr"] > 0 and 0 <= r["probe_top1"] <= 1 for r in runs)
    text = (tmp_path / "REPLICATION.md").read_text()
    assert "| mstok K=32 |" in text and "Command: `python benchmarks/replicate.py --data" in text
    assert "| mstok K=32 | 1 |" in text and "| each image in its own mean colour |" in text
    # A second call reuses the finished run instead of retraining it (the study is resumable), from
    # the --results file that spans sessions, or else from the work dir's result.json.
    recorded = json.loads((tmp_path / "results.json").read_text())
    assert recorded["mstok K=32|0"]["metrics"] == runs[0]
    recorded["mstok K=32|0"]["metrics"]["psnr"] = -1.0  # a marker only a reused run can return
    (tmp_path / "results.json").write_text(json.dumps(recorded))
    assert replicate.main([*argv, "--no-append"])["mstok K=32"][0]["psnr"] == -1.0
    (tmp_path / "results.json").unlink()
    result_file = next(tmp_path.glob("mstok_K32/seed0/result.json"))
    saved = json.loads(result_file.read_text())
    saved["metrics"]["psnr"] = -2.0
    result_file.write_text(json.dumps(saved))
    again = replicate.main([*argv, "--no-append"])
    assert again["mstok K=32"][0]["psnr"] == -2.0
    assert json.loads((tmp_path / "results.json").read_text())["mstok K=32|0"]["metrics"]["psnr"] == -2.0
    # --finished-only tabulates what is finished and trains nothing (titok K=32 never ran here).
    both = [a if a != "mstok K=32" else "mstok K=32,titok K=32" for a in argv]
    partial = replicate.main([*both, "--no-append", "--finished-only"])
    assert list(partial) == ["mstok K=32"] and not (tmp_path / "titok_K32").exists()


def test_replicate_two_stage_row_end_to_end(tmp_path, tiny_imagenet):
    """The two-stage row trains a proxy, stage 1 and stage 2 and measures stage 2's pixels."""
    replicate = _load("replicate")
    argv = ["--data", str(tiny_imagenet), "--steps", "3", "--batch-size", "4", "--classes", "2", "--seeds", "0"]
    argv += ["--variants", "titok two-stage", "--probe-epochs", "1", "--jobs", "1", "--work-dir", str(tmp_path)]
    argv += ["--results", str(tmp_path / "results.json")]
    results = replicate.main([*argv, "--no-append"])
    (run,) = results["titok two-stage"]
    assert run["psnr"] > 0 and 0 <= run["probe_top1"] <= 1
    seed_dir = tmp_path / "titok_two-stage" / "seed0"
    for part, steps in (("proxy", 3), ("stage1", 2), ("stage2", 1)):
        assert (seed_dir / part / "checkpoints" / f"step_{steps:07d}").is_dir(), part


@pytest.mark.slow
def test_convergence_benchmark_end_to_end(tmp_path, tiny_imagenet):
    convergence = _load("convergence")
    rows = "titok VQ (recipe),mstok continuous (recipe),conv AE VQ 8x8 V=32 (320 bits)"
    argv = ["--data", str(tiny_imagenet), "--steps", "4", "--val-every", "2", "--val-images", "8", "--jobs", "1"]
    argv += ["--threads", "1", "--wall", "1000", "--work-dir", str(tmp_path / "work")]
    out = tmp_path / "RESULTS.md"
    results = convergence.main([*argv, "--rows", rows, "--out", str(out), "--plot", str(tmp_path / "c.png")])
    assert list(results) == rows.split(",")
    for result in results.values():
        assert [r["step"] for r in result["val"]] == [2, 4]
        assert all(r["val_psnr"] > 0 and r["train_seconds"] > 0 for r in result["val"])
    text = out.read_text()
    assert "| titok VQ (recipe) |" in text and "| each image in its mean colour |" in text
    assert (tmp_path / "c.png").stat().st_size > 1000
    # finished rows are reused, not retrained
    saved_file = next((tmp_path / "work").glob("titok_VQ*/result.json"))
    saved = json.loads(saved_file.read_text())
    saved["val"][-1]["val_psnr"] = -1.0
    saved_file.write_text(json.dumps(saved))
    assert not [name for name in convergence.ROWS if "," in name]  # --rows is comma-separated
    again = convergence.main([*argv, "--rows", "titok VQ (recipe)", "--no-append", "--seeds", "2"])
    assert list(again) == ["titok VQ (recipe)", "titok VQ (recipe) [seed 1]"]
    assert again["titok VQ (recipe)"]["val"][-1]["val_psnr"] == -1.0
    assert again["titok VQ (recipe) [seed 1]"]["val"][-1]["val_psnr"] > 0  # a new run, not the edited one
    assert again["titok VQ (recipe) [seed 1]"]["loss"] != results["titok VQ (recipe)"]["loss"]  # another seed


@pytest.mark.slow  # ~15 s: three 2-step rows, two overhead and compile rounds, two profiled runs, two loader reads
def test_time_to_quality_benchmark_end_to_end(tmp_path, tiny_imagenet, monkeypatch):
    """time_to_quality.py at a trivial size: the curves of the shipped configs and the calibration, the
    trainer-vs-bare table and the profiler's breakdown by the trainer's labels, written with the plot."""
    ttq = _load("time_to_quality")
    argv = ["--data", str(tiny_imagenet), "--train-data", str(tiny_imagenet), "--steps", "2", "--val-every", "1",
            "--val-images", "4", "--final-images", "4", "--overhead-reps", "1", "--profile-steps", "2",
            "--threads", "1", "--seconds", "1000", "--target", "1", "--loader-batches", "2",
            "--work-dir", str(tmp_path / "work")]  # fmt: skip
    out, figure = tmp_path / "R.md", tmp_path / "t.png"
    compiled = []  # torch.compile's plumbing, not its minutes: the trainer's switch reaches torch.compile

    def record(module, **_):
        compiled.append(type(module).__name__)
        return module

    monkeypatch.setattr(torch, "compile", record)
    found = ttq.main([*argv, "--out", str(out), "--plot", str(figure)])
    assert compiled == ["TiTok", "MsTok"]  # one compiled trainer per shipped config, eager ones untouched
    speed = [line.split("|") for line in found["compile"].splitlines()[2:]]
    assert [row[1].strip() for row in speed] == ["titok_tiny.toml", "mstok_tiny.toml"]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 and float(row[6]) >= 0 for row in speed)
    assert list(found["curves"]) == ["titok_tiny.toml", "mstok_tiny.toml", "conv AE VQ 8x8 V=32 (320 bits)"]
    for result in found["curves"].values():
        assert [r["step"] for r in result["val"]] == [1, 2] and ttq.first_reaching(result["val"], 1.0)["step"] == 1
    text = out.read_text()
    assert "## Time to quality" in text and "| s to 1 dB | steps to 1 dB |" in text and figure.stat().st_size > 1000
    ratios = [line.split("|")[-2] for line in found["overhead"].splitlines()[2:]]
    assert len(ratios) == 2 and all(float(r) > 0 for r in ratios)
    breakdown = found["breakdown"].splitlines()
    assert "| forward (ms) | backward (ms) | optimizer (ms) | ema (ms) | quantizer bookkeeping (ms) |" in breakdown[0]
    forward, backward = (float(breakdown[2].split("|")[i]) for i in (4, 5))
    assert forward > 0 and backward > 0  # the labels were seen by the profiler
    loader = [line.split("|") for line in found["loader"].splitlines()[2:]]
    assert [row[1].strip() for row in loader] == ["shards", "folder"]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 and row[5].strip().endswith("%") for row in loader)
    with pytest.raises(SystemExit):
        ttq.main([*argv, "--parts", "curves,speed", "--no-write"])


def test_run_pooled_runs_one_job_in_this_process():
    """One job runs in this process (a forked worker may inherit a dead OpenMP pool and hang on its first
    multithreaded op); two or more run in worker processes; results come back in the tasks' order."""
    harness = _load("harness")
    loads: list[float] = []
    reported: list[str] = []

    def report(key, result):
        reported.append(key)
        return key

    one = harness.run_pooled(1, {"pid": os.getpid, "seven": functools.partial(int, "7")}, report, loads)
    assert one == {"pid": os.getpid(), "seven": 7} and reported == ["pid", "seven"] and len(loads) == 2
    two = harness.run_pooled(2, {"pid": os.getpid, "eight": functools.partial(int, "8")}, report, loads)
    assert list(two) == ["pid", "eight"] and two["pid"] != os.getpid() and two["eight"] == 8


def test_time_to_quality_rows_train_as_their_configs_ship(tmp_path, monkeypatch):
    """Each curve trains for its own config's steps and batch size (the calibration for the first config's),
    unless --steps / --batch-size set them for every row."""
    ttq = _load("time_to_quality")
    for name, (steps, batch) in zip(ttq.SHIPPED, ((2500, 16), (2000, 32)), strict=True):
        (tmp_path / name).write_text(f"steps = {steps}\nbatch_size = {batch}\n")
    monkeypatch.setattr(ttq.harness, "CONFIGS", tmp_path)
    calibration = next(name for name in ttq.ROWS if name not in ttq.SHIPPED)
    default = ttq.argparse.Namespace(steps=0, batch_size=0)
    assert [ttq.row_run(name, default) for name in (*ttq.SHIPPED, calibration)] == [(2500, 16), (2000, 32), (2500, 16)]
    given = ttq.argparse.Namespace(steps=7, batch_size=3)
    assert {ttq.row_run(name, given) for name in ttq.ROWS} == {(7, 3)}


def test_quantizers_benchmark_end_to_end(tmp_path, tiny_imagenet):
    quantizers = _load("quantizers")
    assert not [name for name in quantizers.BOTTLENECKS if "," in name]  # --rows is comma-separated
    argv = ["--data", str(tiny_imagenet), "--steps", "2", "--val-every", "2", "--val-images", "8", "--jobs", "1"]
    argv += ["--threads", "1", "--seeds", "2", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "R.md")]
    argv += ["--final-images", "16", "--grid", str(tmp_path / "grid.png")]
    results = quantizers.main([*argv, "--rows", "FSQ 8-5-5-5,KL C=12 (continuous)"])
    assert list(results) == ["titok: FSQ 8-5-5-5", "titok: KL C=12 (continuous)", "conv AE VQ 8x8 V=32 (320 bits)"]
    fsq = results["titok: FSQ 8-5-5-5"]
    assert len(fsq) == 2 and fsq[0]["val"] != fsq[1]["val"]  # two seeds, two different runs
    assert 0 < fsq[0]["usage"] <= 1 and fsq[0]["perplexity"] >= 1
    assert "usage" not in results["titok: KL C=12 (continuous)"][0]  # continuous: no ids
    text = (tmp_path / "R.md").read_text()
    assert "| titok: FSQ 8-5-5-5 | 9.97 |" in text and " ± " in text and "| each image in its mean colour |" in text
    assert (tmp_path / "grid.png").stat().st_size > 1000 and "grid.png" in text
    with pytest.raises(SystemExit):
        quantizers.main([*argv, "--rows", "FSQ 8,5"])


def test_quantizer_diagnosis_end_to_end(tmp_path, tiny_imagenet):
    diagnosis = _load("quantizer_diagnosis")
    argv = ["--data", str(tiny_imagenet), "--steps", "2", "--images", "16", "--jobs", "1", "--threads", "1"]
    argv += ["--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "R.md")]
    names = list(diagnosis.ROWS)
    assert not [name for name in names if "," in name]  # --rows is comma-separated
    with pytest.raises(SystemExit):  # an unknown row fails before any training
        diagnosis.main([*argv, "--rows", "BSQ"])
    results = diagnosis.main([*argv, "--rows", ",".join(names[i] for i in (1, 7))])
    assert list(results) == [names[1], names[7]]
    for result in results.values():
        assert 0 <= result["position_bit_entropy"] <= 1 and 0 < result["usage"] <= 1
        assert result["within_position_std"] >= 0 and result["terms"] and "entropy" in result["terms"][-1]
    text = (tmp_path / "R.md").read_text()
    assert "## Binary quantizers that keep their codes: diagnosis" in text and f"| {names[1]} |" in text


def _reference_net(folder: Path) -> Path:
    """A tiny random reference network of Tiny ImageNet's 200 classes (16-d features), saved into ``folder``."""
    from mstok.networks.reference import ReferenceConfig, ReferenceNet

    torch.manual_seed(0)
    config = ReferenceConfig(widths=(4, 8, 16), blocks=(1, 1, 1), num_classes=200, image_size=16, input_size=64)
    return ReferenceNet(config).save_pretrained(folder)


# a few steps on a few images: tokenizer 2 steps, 24 training images' tokens, generator 2 steps, 2 images of each of
# 4 classes per guidance scale, one seed
GENERATION_ARGS = ["--tokenizer-steps", "2", "--gen-steps", "2", "--train-images", "24", "--classes", "4",
                   "--per-class", "2", "--guidance", "1,2", "--val-images", "4", "--batch-size", "4",
                   "--gen-batch-size", "8", "--jobs", "1", "--threads", "1", "--seeds", "1"]  # fmt: skip


@pytest.mark.slow  # ~40 s on a busy 2-core machine: four tokenizers and generators, sampled and scored
def test_generation_benchmark_end_to_end(tmp_path: Path, tiny_imagenet: Path, monkeypatch) -> None:
    """The four family pipelines train, sample and score at trivial size, write their section and grids; a second
    run reuses the finished tokenizers and generators (not after their preset is edited), and a given tokenizer
    run is used instead of training one."""
    from mstok.generators.registry import preset_family
    from mstok.persistence import load_generator, load_tokenizer
    from mstok.tokenizers.registry import PRESETS as TOKENIZER_PRESETS

    generation = _load("generation")
    net = _reference_net(tmp_path / "net")
    work, out = tmp_path / "work", tmp_path / "R.md"
    argv = [*GENERATION_ARGS, "--data", str(tiny_imagenet), "--train-data", str(tiny_imagenet), "--feature-net",
            str(net), "--work-dir", str(work)]  # fmt: skip
    rows = generation.main([*argv, "--out", str(out), "--grid-dir", str(tmp_path)])
    assert list(rows) == ["titok", "mstok", "hieratok", "semtok"]
    for name, row in rows.items():
        (seed,) = row["seeds"]
        assert [g["scale"] for g in seed["eval"]["guided"]] == [1.0, 2.0]
        for scored in [*seed["eval"]["guided"], row["prepared"]["reconstructions"], row["prepared"]["random tokens"]]:
            assert math.isfinite(scored["fd_ref"]) and 0 <= scored["class_accuracy"] <= 1, name
        assert [t["steps"] for t in seed["eval"]["timing"]] == list(
            generation.STEPS[seed["identity"]["model"]["preset"].split("_")[0]]
        )
        assert (tmp_path / f"generation_{name}_grid.png").stat().st_size > 1000
    text = out.read_text()
    for title in ("TiTok + MaskGIT", "MsTok + MaskGIT", "HieraTok + DiT", "SemTok + BitMAR"):
        assert f"| {title} | 2 | 8 |" in text
    assert "| the held-out images themselves | 160 | 0.00 |" in text and "| HieraTok: random tokens | 8 |" in text
    assert "## Generation at tiny scale" in text and "generation_semtok_grid.png" in text
    # a second run reuses the finished tokenizer, tokens and generator (a marker only a reused run returns)
    saved_file = work / "titok" / "generator_seed0" / "result.json"
    saved = json.loads(saved_file.read_text())
    saved["eval"]["guided"][0]["fd_ref"] = -1.0
    saved_file.write_text(json.dumps(saved))
    again = generation.main([*argv, "--rows", "titok", "--no-write"])
    assert again["titok"]["seeds"][0]["eval"]["guided"][0]["fd_ref"] == -1.0
    # scores are kept per scale: a new scale is the only one sampled, and the sweep's order is the one asked for
    more = generation.main([*argv, "--rows", "titok", "--no-write", "--guidance", "3,1"])
    (seed,) = more["titok"]["seeds"]
    assert [g["scale"] for g in seed["eval"]["guided"]] == [3.0, 1.0] and sorted(seed["grids"]) == [1.0, 3.0]
    assert seed["eval"]["guided"][1]["fd_ref"] == -1.0 and math.isfinite(seed["eval"]["guided"][0]["fd_ref"])
    kept = json.loads(saved_file.read_text())["eval"]
    assert [g["scale"] for g in kept["guided"]] == [1.0, 2.0, 3.0] and kept["timing_scale"] == 3.0
    # --more-guidance extends one row's sweep: here all reused (the marker), after the common scales
    extended = generation.main([*argv, "--rows", "titok", "--no-write", "--guidance", "1", "--more-guidance=titok=3"])
    assert [g["scale"] for g in extended["titok"]["seeds"][0]["eval"]["guided"]] == [1.0, 3.0]
    assert extended["titok"]["seeds"][0]["eval"]["guided"][0]["fd_ref"] == -1.0
    # an edited preset builds another model: the finished run, whose identity names the preset only, trains again
    preset = saved["identity"]["model"]["preset"]
    presets = preset_family(preset).presets
    monkeypatch.setitem(presets, preset, {**presets[preset], "dropout": 0.25})
    edited = generation.main([*argv, "--rows", "titok", "--no-write", "--guidance", "1"])
    assert math.isfinite(edited["titok"]["seeds"][0]["eval"]["guided"][0]["fd_ref"])  # not the marker
    assert load_generator(work / "titok" / "generator_seed0" / "run").config.dropout == 0.25
    # so does an edited tokenizer preset: the tokenizer trains again (then its tokens and generator)
    tokenizer_result = work / "tokenizer_titok" / "result.json"
    marked = {**json.loads(tokenizer_result.read_text()), "final_psnr": -3.0}
    tokenizer_result.write_text(json.dumps(marked))
    assert generation.main([*argv, "--rows", "titok", "--no-write"])["titok"]["prepared"]["trained"]["final_psnr"] == -3
    family, fields = TOKENIZER_PRESETS["titok_tiny"]
    monkeypatch.setitem(TOKENIZER_PRESETS, "titok_tiny", (family, {**fields, "commitment_weight": 0.5}))
    retrained = generation.main([*argv, "--rows", "titok", "--no-write"])["titok"]["prepared"]["trained"]
    assert retrained["final_psnr"] > 0 and load_tokenizer(work / "tokenizer_titok").config.commitment_weight == 0.5
    # a given tokenizer run: nothing trained for it in the new work dir
    given = ["--rows", "titok", "--tokenizer", f"titok={work / 'tokenizer_titok'}", "--no-write"]
    other = generation.main([*argv, *given, "--work-dir", str(tmp_path / "other")])
    assert not (tmp_path / "other" / "tokenizer_titok").exists()
    assert other["titok"]["prepared"]["tokenizer"] == str(work / "tokenizer_titok")


def test_generation_benchmark_refuses_bad_input(tmp_path: Path, tiny_imagenet: Path, capsys) -> None:
    """An unknown row, a tokenizer run that is missing or of another family, a feature net of another kind and a
    guidance scale below 1 are each one error line, before anything trains."""
    from mstok.tokenizers import create_tokenizer

    generation = _load("generation")
    net = _reference_net(tmp_path / "net")
    tokenizer = create_tokenizer("titok_tiny").save_pretrained(tmp_path / "titok")
    argv = [*GENERATION_ARGS, "--data", str(tiny_imagenet), "--train-data", str(tiny_imagenet), "--no-write",
            "--work-dir", str(tmp_path / "work")]  # fmt: skip
    cases = {
        ("--feature-net", str(net), "--rows", "titok,dit"): "unknown row(s) ['dit']",
        ("--feature-net", str(net), "--tokenizer", f"titok={tmp_path / 'missing'}"): "does not exist",
        ("--feature-net", str(net), "--tokenizer", f"mstok={tokenizer}"): "holds a 'titok' tokenizer; row 'mstok'",
        ("--feature-net", str(tokenizer)): "--feature-net: ",
        ("--feature-net", str(net), "--guidance", "0.5,2"): "--guidance '0.5,2': comma-separated guidance",
        ("--feature-net", str(net), "--guidance", "1,x"): "scales such as 1,2,4, each >= 1",
        ("--feature-net", str(net), "--rows", "titok", "--more-guidance", "mstok=16"): "ROW one of --rows (titok)",
        ("--feature-net", str(net), "--more-guidance", "semtok=0.5"): "--more-guidance 'semtok=0.5': comma-separated",
    }
    for extra, message in cases.items():
        with pytest.raises(SystemExit):
            generation.main([*argv, *extra])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert ": error: " in error and message in error, error
    assert not (tmp_path / "work").exists()


def test_nested_benchmark_end_to_end(tmp_path, tiny_imagenet):
    """nested.py at a trivial size: the nested row and one dedicated row train, every prefix is measured, the
    adaptive rows agree with encode_adaptive, and the section is written."""
    nested = _load("nested")
    argv = ["--data", str(tiny_imagenet), "--steps", "2", "--val-every", "2", "--val-images", "8", "--jobs", "1"]
    argv += ["--threads", "1", "--seeds", "1", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "R.md")]
    argv += ["--final-images", "16", "--dedicated", "8", "--prefixes", "1,8,32", "--targets", "5,40"]
    results = nested.main([*argv, "--feature-net", str(_reference_net(tmp_path / "net"))])
    assert list(results) == ["nested K=32 (uniform+full)", "dedicated K=8"]
    (run,) = results["nested K=32 (uniform+full)"]
    assert set(run["psnr"]) == {1, 8, 32} and all(v > 0 for v in run["psnr"].values()) and len(run["curve"]) == 32
    assert set(run["fd_ref"]) == {1, 8, 32} and all(v >= 0 for v in run["fd_ref"].values())
    assert all(0 <= v <= 1 for v in run["top1"].values())
    assert results["dedicated K=8"][0]["psnr"].keys() == {8} and results["dedicated K=8"][0]["fd_ref"].keys() == {8}
    unreachable = run["adaptive"][40.0]
    assert unreachable["tokens"] == 32 and unreachable["reached"] == 0  # none reaches 40 dB: all 32 tokens
    assert 1 <= run["adaptive"][5.0]["tokens"] <= 32
    text = (tmp_path / "R.md").read_text()
    assert "## Nested tokens: PSNR against the prefix length" in text
    assert "| nested K=32 (uniform+full) - dedicated PSNR (dB) |" in text and "| 40 | 32.00 |" in text
    assert "| nested K=32 (uniform+full) FD-ref |" in text
    with pytest.raises(SystemExit):
        nested.main([*argv, "--prefixes", "64"])
    with pytest.raises(SystemExit):
        nested.main([*argv, "--nested", "pow3"])
    with pytest.raises(SystemExit):
        nested.main([*argv, "--feature-net", str(tmp_path / "missing")])
