"""Every quantizer of the zoo inside both tokenizer families: config data, training, ids, save/load.

The quantizers themselves are tested in test_quantizer_zoo.py; this file checks the seams: a spec
given as config data (``create_tokenizer(..., quantizer={...})``, ``[model.overrides.quantizer]``)
builds the right bottleneck, its loss terms reach the objective and the log, its ids reach every
consumer with the right size (``vocab_size``; int64 ids up to 2^32), and a saved model comes back.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mstok.data import InMemoryImages, RandomResizedCropFlip, center_crop_transform
from mstok.data.tokens import pretokenize, token_dtype
from mstok.demo import TRAIN_PHOTOS, skimage_photos
from mstok.evaluation.evaluate import evaluate_reconstruction
from mstok.persistence import load_tokenizer
from mstok.quantizers import (
    BinarySphericalQuantizer,
    FiniteScalarQuantizer,
    IdentityQuantizer,
    KLQuantizer,
    LookupFreeQuantizer,
    VectorQuantizer,
)
from mstok.tokenizers import create_tokenizer
from mstok.training import Trainer, load_train_config

# name -> (model overrides, quantizer class, V)
BOTTLENECKS = {
    "vq_ema_kmeans": ({"quantizer": {"type": "vq", "ema": True, "kmeans_init": True}}, VectorQuantizer, 1024),
    "fsq": ({"quantizer": {"type": "fsq", "levels": [8, 5, 5, 5]}, "code_dim": 4}, FiniteScalarQuantizer, 1000),
    "lfq": ({"quantizer": "lfq", "code_dim": 10}, LookupFreeQuantizer, 1024),
    "bsq": ({"quantizer": {"type": "bsq", "entropy_weight": 0.05}, "code_dim": 10}, BinarySphericalQuantizer, 1024),
    "bsq32": ({"quantizer": "bsq", "code_dim": 32}, BinarySphericalQuantizer, 2**32),
    "vae": ({"quantizer": "vae"}, KLQuantizer, None),
    "kl_table": ({"quantizer": {"type": "kl", "kl_weight": 1e-3}}, KLQuantizer, None),
    "identity": ({"quantizer": {"type": "identity", "use_l2_norm": False}}, IdentityQuantizer, None),
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    crop = RandomResizedCropFlip(64, scale=(0.2, 0.5))
    photos = InMemoryImages(skimage_photos(TRAIN_PHOTOS[:2]), crop)
    return torch.stack([photos[(i % 2, i)][0] for i in range(4)])  # (4, 3, 64, 64)


@pytest.mark.parametrize("family", ["titok", "mstok"])
@pytest.mark.parametrize("name", list(BOTTLENECKS))
def test_every_quantizer_trains_and_round_trips_inside_both_families(family, name, images, tmp_path):
    overrides, cls, vocab = BOTTLENECKS[name]
    torch.manual_seed(0)
    model = create_tokenizer(f"{family}_tiny", **overrides)
    assert type(model.quantizer) is cls
    assert model.vocab_size == model.config.vocab_size == vocab
    assert model.config.continuous == (vocab is None)
    assert model.encoder.proj.out_features == model.quantizer.input_dim  # 2C for a Gaussian

    model.train()
    out = model(images)
    total = sum(out.quantizer_losses.values(), torch.zeros(()))
    assert torch.allclose(out.quantizer_loss, total)
    if cls in (LookupFreeQuantizer, BinarySphericalQuantizer):
        assert "entropy" in out.quantizer_losses
    if cls is KLQuantizer:
        assert "kl" in out.quantizer_losses
    (F.mse_loss(out.reconstruction, images) + out.quantizer_loss).backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name}: no gradient for {pname}"
            if not pname.startswith("quantizer"):
                assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"

    model.eval()
    tokens = model.encode(images)
    if vocab is None:
        assert tokens.dtype == torch.float32 and tokens.shape == (4, 32, model.config.code_dim)
    else:
        assert tokens.dtype == torch.int64 and tokens.shape == (4, 32)
        assert int(tokens.min()) >= 0 and int(tokens.max()) < vocab
    recon = model.decode(tokens)
    assert recon.shape == images.shape

    model.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path).eval()
    assert loaded.config == model.config and type(loaded.quantizer) is cls
    assert torch.equal(loaded.encode(images), tokens)
    assert torch.equal(loaded.decode(tokens), recon)


def test_a_2_to_the_32_codebook_has_int64_ids_end_to_end(images):
    model = create_tokenizer("titok_tiny", quantizer="bsq", code_dim=32).eval()
    k = model.config.num_latent_tokens
    top = torch.full((1, k), 2**32 - 1)  # every bit set: the last code
    assert model.decode(top).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 4294967296\)"):
        model.decode(torch.full((1, k), 2**32))
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, k))
    assert token_dtype(2**32) == torch.int64 and token_dtype(2**31) == torch.int32 and token_dtype(1024) == torch.int16
    ids = model.encode(images)
    # 128 ids of 32 bits: some has its top bit set (all below 2^31 has odds 2^-128), i.e. is past int32
    assert int(ids.max()) >= 2**31
    codes = model.quantizer.indices_to_codes(ids)
    assert torch.equal(codes, model.quantizer(model.encoder(images)).codes)


def _photos() -> InMemoryImages:
    return InMemoryImages(skimage_photos(TRAIN_PHOTOS[:4]), center_crop_transform(64))


def test_evaluation_reports_usage_of_a_huge_codebook_without_a_v_sized_tensor():
    model = create_tokenizer("mstok_tiny", quantizer="bsq", code_dim=32)
    data = _photos()
    results = evaluate_reconstruction(model, data, batch_size=2, progress=False)
    assert results["codebook_size"] == 2**32
    assert results["bits_per_pixel"] == pytest.approx(32 * 32 / 64**2)
    assert 1 <= results["codes_used"] <= 4 * 32 and results["codebook_usage"] == results["codes_used"] / 2**32
    assert 0 <= results["bit_usage"] <= 1 and results["perplexity_bits"] >= 1


def test_continuous_tokenizers_pretokenize_to_latents(tmp_path):
    model = create_tokenizer("titok_tiny", quantizer="none")
    index = pretokenize(model, _photos(), tmp_path / "tokens", progress=False)  # float16 latents (tokens.py)
    assert index["continuous"] and index["codebook_size"] is None and index["token_dim"] == model.config.code_dim


def test_a_quantizer_table_in_the_training_config(tmp_path):
    def config(*overrides: str):
        return load_train_config(None, ["model.preset='titok_tiny'", f"out_dir='{tmp_path}'", *overrides])

    good = config("model.overrides.quantizer={type='fsq', levels=[8, 5, 5, 5]}", "model.overrides.code_dim=4")
    assert good.model.overrides["quantizer"] == {"type": "fsq", "levels": [8, 5, 5, 5]}
    with pytest.raises(ValueError, match=r"^model.overrides.quantizer.levels has 3 values but the model's code_dim"):
        config("model.overrides.quantizer={type='fsq', levels=[8, 5, 5]}", "model.overrides.code_dim=4")
    with pytest.raises(ValueError, match=r"^model.overrides.quantizer.entropy_wieght is not a setting of a 'bsq'"):
        config("model.overrides.quantizer={type='bsq', entropy_wieght=0.1}")
    with pytest.raises(ValueError, match=r"^model.overrides.quantizer.type must be one of"):
        config("model.overrides.quantizer={type='rvq'}")
    with pytest.raises(ValueError, match=r"^model.overrides.quantizer must be one of 'vq', 'none', 'vae'"):
        config("model.overrides.quantizer='fsq8'")


def _train(tmp_path, *overrides: str, size: int = 64) -> Trainer:
    config = load_train_config(
        None,
        [
            "steps=3",
            "batch_size=4",
            f"out_dir='{tmp_path}'",
            "data.num_workers=0",
            "optim.warmup_steps=1",
            "log_every=1",
            "ckpt_every=3",
            "tensorboard=false",
            "model.preset='titok_tiny'",
            *overrides,
        ],
    )
    data = InMemoryImages(skimage_photos(TRAIN_PHOTOS[:2]), RandomResizedCropFlip(size, scale=(0.2, 0.5)))
    trainer = Trainer(config, data, progress=False)
    trainer.fit()
    return trainer


def test_training_logs_the_quantizers_own_terms_and_saves_what_loads(tmp_path):
    trainer = _train(
        tmp_path, "model.overrides.quantizer={type='bsq', entropy_weight=0.1}", "model.overrides.code_dim=16"
    )
    last = trainer.history[-1]
    assert "entropy" in last and math.isfinite(last["entropy"])
    assert 0 < last["usage"] <= 1  # V = 2^16: exact per-code counts
    loaded = load_tokenizer(tmp_path)
    assert type(loaded.quantizer) is BinarySphericalQuantizer and loaded.vocab_size == 2**16


def test_an_ema_codebook_is_never_given_to_the_optimizer(tmp_path):
    torch.manual_seed(0)
    before = create_tokenizer("titok_tiny", quantizer={"type": "vq", "ema": True}).quantizer.embedding.weight.clone()
    torch.manual_seed(0)
    trainer = _train(tmp_path, "model.overrides.quantizer={type='vq', ema=true}")
    # trained by the stage (so dead codes are revived in step_hook) but never by the optimizer
    assert "quantizer.embedding.weight" in trainer.trainable
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(trainer.model.quantizer.embedding.weight) not in optimized
    assert "revived_codes" in trainer.history[-1]
    after = trainer.model.quantizer.embedding.weight
    assert not after.requires_grad
    assert not torch.equal(after, before)  # moved by the EMA update in step_hook, not by AdamW


def test_a_vae_tokenizer_trains_and_then_fine_tunes_from_its_checkpoint(tmp_path):
    first = _train(tmp_path / "a", "model.overrides.quantizer='vae'", "model.overrides.kl_weight=1e-3")
    assert "kl" in first.history[-1]
    assert all(math.isfinite(row["kl"]) and row["kl"] > 0 for row in first.history if "kl" in row)
    assert "usage" not in first.history[-1]  # no ids, so no codebook usage
    tuned = _train(tmp_path / "b", "model.overrides.quantizer='vae'", f"model.init_from='{tmp_path / 'a'}'")
    start = load_tokenizer(tmp_path / "a")
    assert type(tuned.model.quantizer) is KLQuantizer
    moved = [n for n, p in tuned.model.named_parameters() if not torch.equal(p, start.state_dict()[n])]
    assert moved, "fine-tuning changed no weight"


def test_the_quantizers_page_table_lists_every_quantizer_setting():
    from pathlib import Path

    from mstok.quantizers.registry import SPECS

    page = (Path(__file__).resolve().parents[1] / "docs" / "quantizers.md").read_text()
    rows = {line.split("`")[1]: line for line in page.splitlines() if line.strip().startswith("| `")}
    for kind, spec in SPECS.items():
        row = rows.get(kind)
        assert row is not None, f"the quantizer table of docs/quantizers.md has no row for {kind!r}"
        settings = row.rsplit("|", 2)[-2]
        documented = rows["lfq"].rsplit("|", 2)[-2] if "as `lfq`" in settings else settings
        missing = [name for name in spec.field_names() if f"`{name}`" not in documented]
        assert not missing, f"the {kind!r} row of docs/quantizers.md does not document {missing}"


def test_a_converted_official_vae_fine_tunes(tmp_path):
    from pathlib import Path

    from mstok.persistence.convert.titok import load_official_titok

    fixture = Path(__file__).parent / "fixtures" / "titok" / "vae_ll"
    official = load_official_titok(fixture)
    assert official.is_vae
    official.save_pretrained(tmp_path / "converted")
    # the preset plus every field of the converted config (None ones are the preset's too): the released layout
    every = dataclasses.asdict(official.config)
    fields = [f"model.overrides.{k}={json.dumps(v)}" for k, v in every.items() if v is not None]
    trainer = _train(tmp_path / "run", *fields, f"model.init_from='{tmp_path / 'converted'}'", "batch_size=2", size=32)
    assert trainer.model.config == official.config and "kl" in trainer.history[-1]
    start = official.state_dict()
    assert any(not torch.equal(p, start[n]) for n, p in trainer.model.named_parameters())


def test_token_shards_of_a_2_to_the_32_codebook_are_int64(tmp_path):
    from safetensors.torch import load_file

    from mstok.data.tokens import TokenDataset

    model = create_tokenizer("titok_tiny", quantizer="bsq", code_dim=32).eval()
    photos = _photos()
    index = pretokenize(model, photos, tmp_path / "t", batch_size=2, progress=False)
    assert index["codebook_size"] == 2**32 and index["num_valid"] == 4
    raw = load_file(str(tmp_path / "t" / "shard-000000.safetensors"))
    assert raw["tokens"].dtype == torch.int64
    direct = torch.cat([model.encode(torch.stack([photos[(i, 0)][0]])) for i in range(4)])
    shards = TokenDataset(tmp_path / "t")
    assert shards.codebook_size == 2**32 and torch.equal(shards.tokens[:, 0].long(), direct)
    assert int(direct.max()) >= 2**31  # ids past int32 survived the round trip


def test_a_stage_that_freezes_an_ema_codebook_leaves_it_alone(tmp_path):
    torch.manual_seed(0)
    before = create_tokenizer("titok_tiny", quantizer={"type": "vq", "ema": True, "kmeans_init": True})
    torch.manual_seed(0)
    vq = "model.overrides.quantizer={type='vq', ema=true, kmeans_init=true}"
    trainer = _train(tmp_path, vq, "stage.train=['decoder']")
    q = trainer.model.quantizer
    assert q.frozen and "quantizer.embedding.weight" in trainer.frozen
    assert torch.equal(q.embedding.weight, before.quantizer.embedding.weight)  # no EMA step, no k-means
    assert not bool(q.kmeans_done) and "revived_codes" not in trainer.history[-1]


def test_fsq_levels_set_the_code_dim_when_it_is_not_given(tmp_path):
    # as a new user writes it: no code_dim beside the levels (the preset's own code_dim is 12)
    model = create_tokenizer("titok_tiny", quantizer={"type": "fsq", "levels": [8, 5, 5, 5]})
    assert model.config.code_dim == 4 and model.vocab_size == 1000
    ids = model.eval().encode(torch.rand(2, 3, 64, 64))
    assert ids.shape == (2, model.config.num_latent_tokens) and int(ids.max()) < 1000
    fsq3 = "model.overrides.quantizer={type='fsq', levels=[8, 5, 5]}"
    config = load_train_config(None, ["model.preset='titok_tiny'", f"out_dir='{tmp_path}'", fsq3])
    assert create_tokenizer(config.model.preset, **config.model.overrides).config.code_dim == 3
    # a code_dim given beside the levels still has to agree with them
    with pytest.raises(ValueError, match=r"levels has 4 values but the model's code_dim is 6"):
        create_tokenizer("titok_tiny", quantizer={"type": "fsq", "levels": [8, 5, 5, 5]}, code_dim=6)
    # types that go with any code dim leave the preset's alone
    assert create_tokenizer("titok_tiny", quantizer={"type": "bsq"}).config.code_dim == 12
