"""Length chosen per image: ragged token shards (pretokenize --target-psnr), the MaskGIT end token that
learns lengths, and the pipeline from a nested tokenizer to generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mstok.cli import main
from mstok.data import TokenDataset, pretokenize
from mstok.generators import GeneratorConfig, create_generator, generate_images, sample, token_lengths
from mstok.generators.registry import FAMILIES
from mstok.persistence import load_generator, load_tokenizer
from mstok.tokenizers import create_tokenizer
from mstok.tokenizers.nested import image_psnr
from mstok.training import GeneratorTrainConfig, load_train_config
from mstok.training.generator_trainer import GeneratorTrainer, check_family_fits, data_overrides

K, V = 32, 1024


class RandomImages:
    """Deterministic random 64x64 images, labels 0..2."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(key[0])), key[0] % 3


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # batches of a few 64px images: a second thread only waits for a core


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return create_tokenizer("mstok_tiny", nested=True).save_pretrained(tmp_path_factory.mktemp("tok") / "nested")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir).eval()


def _target(tok, images: torch.Tensor) -> float:
    """A PSNR between the worst and the best prefix of these images, so the lengths chosen differ."""
    tokens = tok.encode(images)
    scores = torch.stack([image_psnr(images, tok.decode(tokens[:, :k])) for k in (1, K)])
    return float(scores.mean())


def test_a_ragged_folder_holds_each_images_shortest_prefix(tok, tmp_path) -> None:
    data = RandomImages(6)
    images = torch.stack([data[(i, 0)][0] for i in range(6)])
    target = _target(tok, images)
    index = pretokenize(tok, data, tmp_path, flip=True, target_psnr=target, shard_size=4, batch_size=2, progress=False)
    assert index["version"] == 2 and index["ragged"] == {"target_psnr": target, "max_tokens": K, "candidates": None,
                                                         "end_id": V}  # fmt: skip
    ds = TokenDataset(tmp_path)
    assert ds.ragged and ds.end_id == V and ds.lengths.shape == (6, 2) and ds.num_tokens == K
    for view, batch in ((0, images), (1, images.flip(-1))):
        chosen = tok.encode_adaptive(batch, target)
        assert torch.equal(ds.lengths[:, view], chosen.lengths)
    assert len(set(ds.lengths.flatten().tolist())) > 1  # the lengths differ between images
    assert index["mean_length"] == pytest.approx(float(ds.lengths.double().mean()))
    shard = load_file(tmp_path / "shard-000000.safetensors")
    assert shard["lengths"].dtype == torch.int16 and shard["psnr"].shape == (4, 2)
    for i in range(6):
        row, n = ds[i][0], int(ds.lengths[i, 0])
        assert (row[n:] == V).all() and (row[:n] < V).all()  # the end id past the length
        recon = tok.decode(row[None], lengths=torch.tensor([n]))  # end ids are ignored past the length
        assert float(image_psnr(images[i : i + 1], recon)) >= target or n == K
    fixed = pretokenize(tok, data, tmp_path / "fixed", shard_size=4, progress=False)
    assert fixed["version"] == 1 and "ragged" not in fixed and not TokenDataset(tmp_path / "fixed").ragged


def test_ragged_settings_are_checked(tok, tmp_path) -> None:
    data = RandomImages(2)
    with pytest.raises(ValueError, match=r"needs a tokenizer trained with nested tokens"):
        pretokenize(create_tokenizer("mstok_tiny"), data, tmp_path / "a", target_psnr=20.0, progress=False)
    latents = create_tokenizer("mstok_tiny", nested=True, quantizer="none")
    with pytest.raises(ValueError, match=r"continuous latents"):
        pretokenize(latents, data, tmp_path / "b", target_psnr=20.0, progress=False)
    with pytest.raises(ValueError, match=r"--max-tokens must be an integer in 1\.\.32"):
        pretokenize(tok, data, tmp_path / "c", target_psnr=20.0, max_tokens=0, progress=False)
    with pytest.raises(ValueError, match=r"give a target_psnr"):
        pretokenize(tok, data, tmp_path / "d", max_tokens=8, progress=False)
    with pytest.raises(ValueError, match=r"--target-psnr must be a finite number"):
        pretokenize(tok, data, tmp_path / "e", target_psnr=float("inf"), progress=False)
    pretokenize(tok, data, tmp_path / "f", target_psnr=20.0, max_tokens=8, progress=False)
    assert TokenDataset(tmp_path / "f").lengths.max() <= 8
    with pytest.raises(ValueError, match=r"has version=2 but this run has version=1"):  # no mixing of settings
        pretokenize(tok, data, tmp_path / "f", progress=False)
    with pytest.raises(ValueError, match=r"has ragged=.*refuses to mix"):
        pretokenize(tok, data, tmp_path / "f", target_psnr=21.0, max_tokens=8, progress=False)


def test_a_corrupt_ragged_folder_is_refused(tok, tmp_path) -> None:
    pretokenize(tok, RandomImages(2), tmp_path, target_psnr=20.0, progress=False)
    shard = tmp_path / "shard-000000.safetensors"
    tensors = load_file(shard)
    save_file({**tensors, "lengths": torch.full((2, 1), 40, dtype=torch.int16)}, str(shard))
    with pytest.raises(ValueError, match=r"lengths in \[40, 40\], outside 1\.\.32"):
        TokenDataset(tmp_path)
    save_file({k: v for k, v in tensors.items() if k != "psnr"}, str(shard))
    with pytest.raises(ValueError, match=r"lacks the tensor\(s\) psnr"):
        TokenDataset(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**index, "version": 1}))
    with pytest.raises(ValueError, match=r"version 2 \(and only it\) has a 'ragged' table"):
        TokenDataset(tmp_path)


def test_the_end_token_shifts_the_layout_and_is_saved_only_when_on() -> None:
    plain = GeneratorConfig(num_tokens=8, codebook_size=16, num_classes=3)
    ended = GeneratorConfig(num_tokens=8, codebook_size=16, num_classes=3, end_token=True)
    assert (plain.mask_id, plain.vocab_size, plain.end_id) == (16, 21, None)  # the official layout
    assert (ended.end_id, ended.mask_id, ended.num_outputs, ended.vocab_size) == (16, 17, 17, 22)
    assert "end_token" not in plain.to_dict() and ended.to_dict()["end_token"] is True
    model = create_generator("maskgit_tiny", num_tokens=8, codebook_size=16, num_classes=3, end_token=True).eval()
    logits = model(torch.full((2, 8), ended.mask_id), torch.tensor([0, 3]))
    assert logits.shape == (2, 8, 17)


def test_sampling_with_an_end_token_returns_lengths() -> None:
    torch.manual_seed(0)
    model = create_generator("maskgit_tiny", num_tokens=8, codebook_size=4, num_classes=2, end_token=True).eval()
    with torch.no_grad():
        model.head.bias[4] = 3.0  # the end id likely everywhere: every sample still keeps slot 0
    ids = sample(model, torch.tensor([0, 1, 0, 1]), generator=torch.Generator().manual_seed(0))
    lengths = token_lengths(ids, 4)
    assert (lengths >= 1).all() and (lengths < 8).any()
    for row, n in zip(ids, lengths.tolist(), strict=True):
        assert (row[:n] < 4).all() and (row[n:] == 4).all()
    again = sample(model, torch.tensor([0, 1, 0, 1]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    assert token_lengths(torch.tensor([[1, 2, 3]]), None).tolist() == [3]


def test_the_trainer_takes_the_end_token_from_the_data(tok, tmp_path) -> None:
    pretokenize(tok, RandomImages(3), tmp_path, target_psnr=20.0, progress=False)
    ragged = TokenDataset(tmp_path)
    fields = data_overrides(ragged, {}, FAMILIES["maskgit"])
    assert fields["end_token"] is True and fields["codebook_size"] == V and fields["num_tokens"] == K
    with pytest.raises(ValueError, match=r"model\.overrides\.end_token = False, but the token data has end_token"):
        data_overrides(ragged, {"end_token": False}, FAMILIES["maskgit"])
    for family in ("dit", "bitmar"):
        with pytest.raises(ValueError, match=r"token data is ragged.*only MaskGIT learns lengths"):
            check_family_fits(FAMILIES[family], f"{family}_tiny", ragged)


def test_an_end_token_generator_needs_a_nested_tokenizer(tok) -> None:
    generator = create_generator("maskgit_tiny", num_tokens=K, codebook_size=V, num_classes=3, end_token=True)
    with pytest.raises(ValueError, match=r"samples ragged tokens .* no nested tokens"):
        generate_images(generator, create_tokenizer("mstok_tiny"), torch.tensor([0]))
    images, ids = generate_images(generator.eval(), tok, torch.tensor([0, 1]), seed=0)
    assert images.shape == (2, 3, 64, 64) and ids.shape == (2, K)


def test_nested_tokenizer_to_ragged_tokens_to_generator_to_samples(tok_dir, tmp_path, capsys) -> None:
    """End to end from the CLI: adaptive tokenize to a ragged folder, train a MaskGIT generator a few steps on
    it, sample (the lengths come back in samples.npz)."""
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    tokens = tmp_path / "tokens"
    argv = ["tokenize", "--checkpoint", str(tok_dir), "--data", str(tmp_path / "images"), "--out", str(tokens)]
    argv += ["--target-psnr", "6.0", "--max-tokens", "16", "--workers", "0", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    assert "tokens per image on average for 6 dB" in capsys.readouterr().out
    data = TokenDataset(tokens)
    assert data.ragged and data.lengths.max() <= 16

    run = tmp_path / "gen"
    settings = [f"data.path='{tokens}'", f"out_dir='{run}'", f"tokenizer='{tok_dir}'", "steps=3", "batch_size=4"]
    settings += ["sample_every=3", "num_samples=2", "device='cpu'", "tensorboard=false", "log_every=1", "threads=1"]
    settings += ["model.overrides.width=32", "model.overrides.depth=2", "model.overrides.num_heads=2"]
    config = load_train_config(str(Path(__file__).parents[1] / "configs" / "maskgit_tiny.toml"), settings,
                               GeneratorTrainConfig)  # fmt: skip
    history = GeneratorTrainer(config, progress=False).fit()
    assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)
    generator = load_generator(run)
    assert generator.config.end_token and generator.config.end_id == V
    assert (run / "generated" / "step_0000003.png").is_file()

    out = tmp_path / "samples"
    argv = ["sample", "--generator", str(run), "--tokenizer", str(tok_dir), "--classes", "0,1", "--n", "2"]
    assert main([*argv, "--out-dir", str(out), "--no-progress", "--device", "cpu"]) == 0
    batch = np.load(out / "samples.npz")
    lengths, ids = batch["lengths"], batch["tokens"]
    assert lengths.shape == (4,) and ((lengths >= 1) & (lengths <= K)).all()
    for row, n in zip(ids, lengths, strict=True):
        assert (row[:n] < V).all() and (row[n:] == V).all()
