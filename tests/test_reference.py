"""The reference network (``mstok.evaluation.reference``): shapes, gradients, save/load and its
errors, exact resume of its training, FD-ref's known answer, ``mstok reference train/eval``,
``mstok eval --feature-net`` and the reference teacher of SemTok."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mstok.cli import main
from mstok.evaluation.reference import ReferenceMeter, evaluate_reference
from mstok.losses.teachers import ReferenceTeacher, build_teacher
from mstok.networks.reference import ReferenceConfig, ReferenceNet
from mstok.tokenizers import create_tokenizer
from mstok.training import Trainer, load_train_config
from mstok.training.reference import train_reference

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# a net of a few thousand parameters: 16 px inside, two stages, 3 classes
TINY = {"widths": (4, 8), "blocks": (1, 1), "num_classes": 3, "image_size": 16, "input_size": 32}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _tiny(**overrides) -> ReferenceNet:
    return ReferenceNet(ReferenceConfig.from_dict({**TINY, **overrides}))


def _nudged(model: ReferenceNet) -> ReferenceNet:
    """Every block's last BatchNorm starts at zero (each block the identity), which leaves its
    convolutions without gradient until the first step moves it: move it here."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm2.weight"):
                p.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes of four 32 px images each, one colour cast per class."""
    root = tmp_path_factory.mktemp("ref_images")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("a", "b", "c")):
        (root / cls).mkdir()
        for i in range(4):
            pixels = rng.normal(60 + 60 * c, 30, (32, 32, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, ReferenceNet]:
    path = tmp_path_factory.mktemp("ref_model")
    torch.manual_seed(3)
    model = _nudged(_tiny())
    model.save_pretrained(path)
    return path, model.eval()


# ------------------------------------------------------------------ the network
def test_shapes_and_input_sizes() -> None:
    model = _tiny().eval()
    images = torch.rand(2, 3, 32, 32)
    assert model(images).shape == (2, 3)
    assert model.features(images).shape == (2, model.feature_dim) == (2, 8)
    assert model.feature_map(images).shape == (2, 8, model.grid, model.grid) == (2, 8, 8, 8)
    features, logits = model.classify(images)
    assert torch.allclose(features, model.feature_map(images).mean(dim=(2, 3)))
    assert torch.allclose(logits, model(images))
    # any size is resized inside to image_size: 16 px input is used as it is
    assert model(torch.rand(1, 3, 64, 48)).shape == (1, 3)
    small = torch.rand(1, 3, 16, 16)
    assert torch.allclose(
        model(small), model.head(model.blocks(model.stem((small - model.mean) / model.std)).mean((2, 3)))
    )
    default = ReferenceNet(ReferenceConfig())
    assert default.feature_dim == 256 and default.grid == 4 and default.config.num_classes == 200


def test_bad_images_and_configs() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="float tensor"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="one entry per stage"):
        ReferenceConfig(widths=(4, 8), blocks=(1,))
    with pytest.raises(ValueError, match="too small for 4 stages"):
        ReferenceConfig(image_size=4)
    with pytest.raises(ValueError, match="num_classes"):
        ReferenceConfig(num_classes=0)


def test_gradients_reach_every_trainable_parameter() -> None:
    model = _nudged(_tiny()).train()
    torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_save_load_round_trip(saved, tmp_path) -> None:
    path, model = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((path / "config.json").read_text())["family"] == "reference"
    loaded = ReferenceNet.from_pretrained(path)
    assert not loaded.training and loaded.config == model.config
    images = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded(images), model(images))
    assert torch.equal(
        ReferenceNet.from_pretrained(path / "model.safetensors").features(images), model.features(images)
    )


def test_loading_errors_name_the_problem(saved, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ReferenceNet.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        ReferenceNet.from_pretrained(tmp_path)  # an empty folder
    create_tokenizer("titok_tiny").save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="holds a 'titok' model, not a reference network"):
        ReferenceNet.from_pretrained(tmp_path / "tok")
    path, model = saved
    wrong = tmp_path / "wrong"
    model.save_pretrained(wrong)
    meta = json.loads((wrong / "config.json").read_text())
    meta["config"]["depth"] = 3
    (wrong / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json: unknown ReferenceConfig field\(s\) \['depth'\]"):
        ReferenceNet.from_pretrained(wrong)
    _tiny(widths=(4, 16)).save_pretrained(wrong)  # weights of another width under a config that says 8
    (wrong / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="shape"):
        ReferenceNet.from_pretrained(wrong)


# ------------------------------------------------------------------ FD-ref
def test_fd_ref_known_answers(saved) -> None:
    """Through the meter FD-ref uses: a pure shift of the features gives exactly ||delta||^2 (the
    sample covariances are equal), and doubling them gives ||mu||^2 + tr(S) (2 S^(1/2) S^(1/2) = 2 S...)."""
    _, model = saved
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(500, model.feature_dim)) @ rng.normal(size=(8, 8)) + 1.0)
    delta = torch.from_numpy(rng.normal(size=model.feature_dim))
    for method in ("sqrtm", "eigh"):
        meter = ReferenceMeter(model, labelled=False)
        meter.add(real[:200], real[:200] + delta)
        meter.add(real[200:], real[200:] + delta)
        result = meter.results(method)
        assert result["fd_ref"] == pytest.approx(float(delta @ delta), rel=1e-7, abs=1e-7), method
        assert result["ref_top1_real"] is None and result["ref_top1_recon"] is None
        meter = ReferenceMeter(model, labelled=False)
        meter.add(real, 2 * real)
        mu, sigma = meter.real_mu_sigma()
        # FD = ||mu - 2 mu||^2 + tr(S + 4 S - 2 * 2 S) = ||mu||^2 + tr(S)
        assert meter.results(method)["fd_ref"] == pytest.approx(float(mu @ mu + np.trace(sigma)), rel=1e-7)


def test_fd_ref_top1_and_statistics_dimension(saved, tmp_path) -> None:
    _, model = saved
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    meter = ReferenceMeter(model)
    meter.update(images, images, labels)
    result = meter.results("eigh")
    predicted = model(images).argmax(1)
    assert result["ref_top1_real"] == result["ref_top1_recon"] == (predicted == labels).sum().item() / 6
    assert result["fd_ref"] == pytest.approx(0.0, abs=1e-6)
    assert meter.save_real_stats(tmp_path / "s.npz").is_file()
    with pytest.raises(ValueError, match=r"statistics holds 7-d feature statistics but the feature net gives 8-d"):
        ReferenceMeter(model, (np.zeros(7), np.eye(7)))


# ------------------------------------------------------------------ training
def _train(folder: Path, out: Path, steps: int = 4) -> ReferenceNet:
    settings = {"ckpt_every": 2, "log_every": 1}
    return train_reference(folder, out, steps=steps, batch_size=4, threads=1, model=TINY, progress=False, **settings)


def test_training_resumes_exactly(folder, tmp_path) -> None:
    straight = _train(folder, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert torch.equal(ReferenceNet.from_pretrained(tmp_path / "a").head.weight, straight.head.weight)
    # the same run stopped after its step-2 checkpoint, then the same command again
    _train(folder, tmp_path / "b")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "b" / name).unlink()
    for file in (tmp_path / "b" / "checkpoints" / "step_0000004").iterdir():
        file.unlink()
    (tmp_path / "b" / "checkpoints" / "step_0000004").rmdir()
    resumed = _train(folder, tmp_path / "b")
    moved = [k for k, v in straight.state_dict().items() if not torch.equal(v, resumed.state_dict()[k])]
    assert not moved
    assert not torch.equal(straight.head.weight, _tiny().head.weight)  # it trained
    with pytest.raises(ValueError, match="steps"):  # other settings in the same folder are refused
        _train(folder, tmp_path / "b", steps=6)


# ------------------------------------------------------------------ CLI
def test_reference_eval_prints_one_json_line(saved, folder, capsys) -> None:
    path, model = saved
    assert main(["reference", "eval", "--model", str(path), "--data", str(folder), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["images"] == 12 and result == {**result, **evaluate_reference(model, folder)}
    assert 0 <= result["top1"] <= result["top5"] <= 1


def test_reference_cli_bad_input(saved, folder, tmp_path, capsys) -> None:
    path, _ = saved
    create_tokenizer("titok_tiny").save_pretrained(tmp_path / "tok")
    cases = [
        (["eval", "--model", str(tmp_path / "nope"), "--data", str(folder)], "does not exist"),
        (["eval", "--model", str(tmp_path / "tok"), "--data", str(folder)], "not a reference network"),
        (["eval", "--model", str(path), "--data", str(tmp_path / "nodata")], "--data: .*nodata does not exist"),
        (["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "o")], "--data: .*does not exist"),
    ]
    for argv, message in cases:
        assert main(["reference", *argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"mstok reference {argv[0]}: error:"), err
        assert __import__("re").search(message, err), err


@pytest.mark.slow
def test_reference_train_cli_with_val_data(folder, tmp_path, capsys) -> None:
    argv = ["reference", "train", "--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "2"]
    assert main([*argv, "--batch-size", "4", "--threads", "1", "--val-data", str(folder), "--no-progress"]) == 0
    assert "held-out top-1" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "val.json").read_text())["images"] == 12
    assert ReferenceNet.from_pretrained(tmp_path / "r").config == ReferenceConfig()


@pytest.mark.slow
def test_eval_feature_net_reports_fd_ref(saved, folder, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "empty"))  # no Inception or LPIPS weights: rFID null
    tokenizer = tmp_path / "tok"
    create_tokenizer("titok_tiny").save_pretrained(tokenizer)
    path, _ = saved
    base = ["eval", "--checkpoint", str(tokenizer), "--data", str(folder), "--no-download", "--no-progress"]
    base += ["--num-workers", "0", "--fid-method", "eigh", "--feature-net", str(path)]
    assert main([*base, "--out", str(tmp_path / "e" / "r.json")]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.strip().startswith(("fd_ref", "ref_top1"))]
    assert [row[0] for row in rows] == ["fd_ref", "ref_top1_real", "ref_top1_recon"]
    results = json.loads((tmp_path / "e" / "r.json").read_text())
    assert results["fd_ref"] > 0 and results["rfid"] is None and results["feature_net"] == str(path)
    assert 0 <= results["ref_top1_recon"] <= 1 and 0 <= results["ref_top1_real"] <= 1
    stats = tmp_path / "e" / "fd_ref_stats.npz"
    assert stats.is_file()
    # the saved real-image statistics give the same FD-ref
    assert main([*base, "--out", str(tmp_path / "f" / "r.json"), "--feature-net-stats", str(stats)]) == 0
    assert json.loads((tmp_path / "f" / "r.json").read_text())["fd_ref"] == pytest.approx(results["fd_ref"], rel=1e-6)
    capsys.readouterr()
    # statistics of another width: one clear error line
    np.savez(tmp_path / "wide.npz", mu=np.zeros(16), sigma=np.eye(16))
    assert main([*base, "--feature-net-stats", str(tmp_path / "wide.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "16-d feature statistics but the feature net gives 8-d" in err


# ------------------------------------------------------------------ SemTok's teacher
def test_reference_teacher(saved, tmp_path) -> None:
    path, model = saved
    teacher = build_teacher({"type": "reference", "path": str(path)})
    assert isinstance(teacher, ReferenceTeacher) and teacher.dim == model.feature_dim
    images = torch.rand(2, 3, 64, 64)
    features = teacher(images)
    assert features.shape == (2, 8, 8, 8) and not features.requires_grad
    assert torch.allclose(features.mean(dim=(2, 3)), model.features(images), atol=1e-6)  # the penultimate features
    pooled = build_teacher({"type": "reference", "path": str(path), "pooled": True})(images)
    assert pooled.shape == (2, 8, 1, 1)
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="needs a path"):
        build_teacher("reference")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_teacher({"type": "reference", "path": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="unknown setting"):
        build_teacher({"type": "reference", "path": str(path), "dim": 3})


@pytest.mark.slow
def test_semtok_trains_with_the_reference_teacher(saved, folder, tmp_path) -> None:
    path, model = saved
    settings = ["steps=2", "batch_size=4", "data.num_workers=0", "log_every=1", "tensorboard=false", "threads=1"]
    settings += ["sample_every=0", "ckpt_every=2", f"out_dir='{tmp_path / 'run'}'", f"data.path='{folder}'"]
    settings += [f"teacher.spec={{type='reference', path='{path}'}}"]
    settings += [
        "model.overrides={width=32, depth=1, num_heads=2, decoder_width=32, decoder_depth=1, sample_steps=2, "
        f"teacher_dim={model.feature_dim}, semantic_terms=['distill', 'contrastive']}}",
        "loss.contrastive_weight=0.05",  # both terms (the paper's), though the shipped config trains distillation
    ]
    trainer = Trainer(load_train_config(CONFIGS / "semtok_tiny_stage1.toml", settings), progress=False)
    before = {k: v.clone() for k, v in trainer.loss_fn.teacher.state_dict().items()}
    history = trainer.fit()
    assert len(history) == 2 and all(np.isfinite(h["distill"]) and np.isfinite(h["contrastive"]) for h in history)
    after = trainer.loss_fn.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen, BatchNorm statistics included


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")]
)
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, avx512_bf16, amx, expected):
    """Emulated bf16 is slower than fp32 (the reference step 4x on an AVX-512 CPU without BF16): auto avoids it."""
    from mstok.device import auto_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert auto_precision("auto", torch.device("cpu")) == expected
    assert (
        auto_precision("fp32", torch.device("cpu")) == "fp32" and auto_precision("bf16", torch.device("cpu")) == "bf16"
    )
    assert auto_precision("auto", torch.device("meta")) == "fp32"
