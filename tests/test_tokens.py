"""Token shards: pretokenize round trip, flip views, multi-rank and resumed runs, refusals, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mstok import create_tokenizer, load_tokenizer
from mstok.cli import main
from mstok.data import ImageFolder, TokenDataset, center_crop_transform, pretokenize, tokenizer_identity


class RandomImages:
    """Deterministic random 64x64 images; the items in ``broken`` fail to decode (None)."""

    def __init__(self, n: int, broken: tuple[int, ...] = ()) -> None:
        self.n, self.broken = n, set(broken)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        index, _seed = key
        if index in self.broken:
            return None
        return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(index)), index % 3


class Subset:
    """A few items of an ``(index, seed)`` dataset."""

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]):
        return self.dataset[(self.indices[key[0]], key[1])]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return create_tokenizer("titok_tiny").save_pretrained(tmp_path_factory.mktemp("tok") / "titok")


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return load_tokenizer(tok_dir)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # batches of a few 64px images gain nothing from a second thread, and on a busy 2-core
    # machine a second OpenMP thread waiting for a core made each encode ~50x slower
    torch.set_num_threads(1)


def expected(tok, dataset, batch_size: int, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (N_valid, views, K) and labels of the valid items, encoded in pretokenize's batches
    (batch_size divides the shard size here), so the comparison can be exact."""
    tokens, labels = [], []
    for lo in range(0, len(dataset), batch_size):
        items = [dataset[(i, 0)] for i in range(lo, min(lo + batch_size, len(dataset)))]
        items = [item for item in items if item is not None]
        images = torch.stack([item[0] for item in items])
        views = [tok.encode(images)] + ([tok.encode(images.flip(-1))] if flip else [])
        tokens.append(torch.stack(views, dim=1))
        labels += [item[1] for item in items]
    return torch.cat(tokens), torch.tensor(labels)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def test_round_trip_with_flip_and_broken_rows(tok, tok_dir: Path, tmp_path: Path) -> None:
    data = RandomImages(10, broken=(3,))
    index = pretokenize(
        tok, data, tmp_path / "t", flip=True, batch_size=2, shard_size=4, checkpoint=tok_dir, progress=False
    )
    assert index["complete"] and index["num_images"] == 10 and index["num_valid"] == 9
    assert [(s["count"], s["valid"]) for s in index["shards"]] == [(4, 3), (4, 4), (2, 2)]
    assert index["num_classes"] == 3 and index["views"] == 2
    raw = load_file(str(tmp_path / "t" / "shard-000000.safetensors"))
    assert raw["tokens"].dtype == torch.int16 and raw["tokens"].shape == (4, 2, 32)
    assert raw["valid"].tolist() == [True, True, True, False] and raw["tokens"][3].abs().sum() == 0

    ds = TokenDataset(tmp_path / "t")
    want_tokens, want_labels = expected(tok, data, batch_size=2, flip=True)
    assert len(ds) == 9 and ds.views == 2 and ds.num_tokens == 32 and ds.codebook_size == 1024
    assert ds.num_classes == 3
    assert torch.equal(ds.tokens.long(), want_tokens) and torch.equal(ds.labels, want_labels)
    assert ds.identity == tokenizer_identity(tok, tok_dir)
    assert ds.meta["views"] == 2 and "shards" not in ds.meta
    ds.check_matches(tok)

    # the view is a pure function of the seed, and both views occur
    row = 4  # dataset item 5
    tokens, label = ds[row]
    assert tokens.dtype == torch.int64 and torch.equal(tokens, want_tokens[row, 0]) and label == 5 % 3
    assert not torch.equal(want_tokens[row, 0], want_tokens[row, 1])
    seen = set()
    for seed in range(16):
        first, again = ds[(row, seed)][0], ds[(row, seed)][0]
        assert torch.equal(first, again)
        seen.add(0 if torch.equal(first, want_tokens[row, 0]) else 1)
        assert torch.equal(first, want_tokens[row, 0]) or torch.equal(first, want_tokens[row, 1])
    assert seen == {0, 1}
    with pytest.raises(IndexError):
        ds[9]


def test_real_images_round_trip(tok, tiny_imagenet: Path, tmp_path: Path) -> None:
    folder = ImageFolder(tiny_imagenet, center_crop_transform(64))
    data = Subset(folder, list(range(0, 20 * 41, 41)))  # 20 images over several classes
    index = pretokenize(tok, data, tmp_path / "t", batch_size=5, shard_size=10, progress=False)
    assert index["num_valid"] == 20 and len(index["shards"]) == 2
    ds = TokenDataset(tmp_path / "t")
    want_tokens, want_labels = expected(tok, data, batch_size=5)
    assert torch.equal(ds.tokens.long(), want_tokens) and torch.equal(ds.labels, want_labels)
    assert ds.num_classes == int(want_labels.max()) + 1 and len(set(want_labels.tolist())) > 1
    # one view: the seed does not matter
    assert torch.equal(ds[(3, 123)][0], want_tokens[3, 0])


def test_two_ranks_write_the_same_shards_as_one(tok, tmp_path: Path) -> None:
    data = RandomImages(11, broken=(6,))
    kwargs = {"flip": True, "batch_size": 3, "shard_size": 3, "progress": False}
    single = pretokenize(tok, data, tmp_path / "one", num_workers=2, **kwargs)  # loader workers keep the order
    part = pretokenize(tok, data, tmp_path / "two", rank=1, world_size=2, **kwargs)
    assert part["complete"] is False
    assert sorted(shard_bytes(tmp_path / "two")) == ["shard-000001.safetensors", "shard-000003.safetensors"]
    both = pretokenize(tok, data, tmp_path / "two", rank=0, world_size=2, **kwargs)
    assert both == single
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
    assert len(shard_bytes(tmp_path / "one")) == 4


def test_rank_0_refuses_an_index_with_missing_shards(tok, tmp_path: Path) -> None:
    # rank 1 never ran: rank 0 must not declare the folder complete
    with pytest.raises(ValueError, match="missing"):
        pretokenize(tok, RandomImages(6), tmp_path, rank=0, world_size=2, shard_size=2, progress=False)
    assert not (tmp_path / "index.json").exists()


def test_resume_recomputes_only_missing_shards(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = RandomImages(9)
    pretokenize(tok, data, tmp_path, batch_size=2, shard_size=4, progress=False)
    before = shard_bytes(tmp_path)
    (tmp_path / "shard-000001.safetensors").unlink()  # an interrupted run: shard 1 and the index missing
    (tmp_path / "index.json").unlink()
    calls = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda images: calls.append(len(images)) or encode(images))
    index = pretokenize(tok, data, tmp_path, batch_size=2, shard_size=4, progress=False)
    assert calls == [2, 2]  # only shard 1's items 4..7
    assert shard_bytes(tmp_path) == before and index["complete"]
    # a finished folder: nothing to encode, the index is rewritten
    calls.clear()
    pretokenize(tok, data, tmp_path, batch_size=2, shard_size=4, progress=False)
    assert calls == [] and len(TokenDataset(tmp_path)) == 9


def test_stale_index_is_removed_when_shards_are_missing(tok, tmp_path: Path) -> None:
    data = RandomImages(4)
    pretokenize(tok, data, tmp_path, shard_size=2, progress=False)
    (tmp_path / "shard-000001.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):  # shard 1 belongs to rank 1, which did not run
        pretokenize(tok, data, tmp_path, shard_size=2, rank=0, world_size=2, progress=False)
    with pytest.raises(FileNotFoundError, match="to completion"):
        TokenDataset(tmp_path)


def test_refuses_to_mix_tokenizers_or_settings(tok, tok_dir: Path, tmp_path: Path) -> None:
    data = RandomImages(4)
    pretokenize(tok, data, tmp_path / "t", shard_size=2, progress=False)
    torch.manual_seed(1)
    other = create_tokenizer("titok_tiny")
    with pytest.raises(ValueError, match=r"different tokenizer.*weights_sha256"):
        pretokenize(other, data, tmp_path / "t", shard_size=2, progress=False)
    with pytest.raises(ValueError, match="views"):
        pretokenize(tok, data, tmp_path / "t", shard_size=2, flip=True, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        pretokenize(tok, data, tmp_path / "t", shard_size=3, progress=False)
    with pytest.raises(ValueError, match="num_images"):
        pretokenize(tok, RandomImages(5), tmp_path / "t", shard_size=2, progress=False)
    with pytest.raises(ValueError, match="differs in weights_sha256"):
        TokenDataset(tmp_path / "t").check_matches(other)
    # the same weights saved elsewhere are the same tokenizer
    copy = tokenizer_identity(load_tokenizer(tok_dir), "elsewhere")
    assert copy["checkpoint"] == "elsewhere" and TokenDataset(tmp_path / "t").check_matches(tok) is None
    assert {k: v for k, v in copy.items() if k != "checkpoint"} == {
        k: v for k, v in tokenizer_identity(tok).items() if k != "checkpoint"
    }
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        pretokenize(tok, data, tmp_path / "other", progress=False)


def test_reader_errors(tok, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run mstok pretokenize to completion first"):
        TokenDataset(tmp_path)
    pretokenize(tok, RandomImages(4), tmp_path, shard_size=2, progress=False)
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(ValueError, match="run mstok pretokenize to completion first"):
        TokenDataset(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(index))
    shard = tmp_path / "shard-000001.safetensors"
    tensors = load_file(str(shard))
    tensors["tokens"][0, 0, 5] = 2000  # outside V = 1024
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=r"shard-000001.*outside the codebook"):
        TokenDataset(tmp_path)
    tensors["tokens"] = tensors["tokens"][:, :, :16].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=r"shard-000001.*expects"):
        TokenDataset(tmp_path)


def test_cli_end_to_end(tok_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "images" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "images" / "dog" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "tokens"
    args = ["pretokenize", "--checkpoint", str(tok_dir), "--data", str(tmp_path / "images"), "--out", str(out)]
    args += ["--flip", "--shard-size", "3", "--batch-size", "3", "--workers", "0", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "7 images (6 valid, 2 view(s)" in printed and "3 shards" in printed
    ds = TokenDataset(out)
    assert len(ds) == 6 and ds.views == 2 and ds.num_classes == 2
    assert ds.meta["source"] == str(tmp_path / "images")
    assert ds.identity["checkpoint"] == str(tok_dir / "model.safetensors")
    ds.check_matches(load_tokenizer(tok_dir))
    assert main(args) == 0  # a finished folder: resumes with nothing to do
    assert main([*args, "--resolution", "32"]) == 2
    assert "takes 64px images" in capsys.readouterr().err
