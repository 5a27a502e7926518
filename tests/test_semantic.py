"""SemTok's semantic alignment: the frozen teachers and the distillation / contrastive losses of eq. 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mstok.losses.teachers import CallableTeacher, SiglipTeacher, Teacher, TinyTeacher, build_teacher
from mstok.storage.weights import MissingWeightsError
from mstok.tokenizers.semtok_semantic import ContrastiveLoss, DistillationLoss, SemanticLoss, resize_grid

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ references


def _infonce_reference(loss: ContrastiveLoss, tokens: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Eq. 2 written out with Python loops over the batch, in float64."""
    weight, bias = loss.proj.weight.detach().double(), loss.proj.bias.detach().double()
    tokens, teacher = tokens.double(), teacher.double()
    batch = tokens.shape[0]
    v, u = [], []
    for i in range(batch):
        projected = weight @ tokens[i].mean(dim=0) + bias  # w_z of the mean over K
        v.append(projected / projected.norm())
        pooled = teacher[i].mean(dim=(1, 2))  # P(x_sig)
        u.append(pooled / pooled.norm())

    def direction(queries: list[torch.Tensor], keys: list[torch.Tensor]) -> float:
        total = 0.0
        for i in range(batch):
            logits = [float(queries[i] @ keys[j]) / temperature for j in range(batch)]
            total -= logits[i] - math.log(sum(math.exp(x) for x in logits))
        return total / batch

    if loss.symmetric:
        return (direction(v, u) + direction(u, v)) / 2
    return direction(v, u)


def _area_reference(grid: torch.Tensor, out: tuple[int, int]) -> torch.Tensor:
    """(D, h_t, w_t) -> (D, h, w): each output cell the mean of the input cells its window covers."""
    d, h_in, w_in = grid.shape
    result = torch.zeros(d, *out, dtype=torch.float64)
    for i in range(out[0]):
        for j in range(out[1]):
            top, bottom = (i * h_in) // out[0], -((-(i + 1) * h_in) // out[0])  # floor, ceil
            left, right = (j * w_in) // out[1], -((-(j + 1) * w_in) // out[1])
            result[:, i, j] = grid[:, top:bottom, left:right].double().mean(dim=(1, 2))
    return result


def _bilinear_reference(grid: torch.Tensor, out: tuple[int, int]) -> torch.Tensor:
    """(D, h_t, w_t) -> (D, h, w) by bilinear interpolation between cell centres (align_corners=False)."""
    d, h_in, w_in = grid.shape
    grid = grid.double()

    def source(index: int, size_in: int, size_out: int) -> tuple[int, int, float]:
        position = max((index + 0.5) * size_in / size_out - 0.5, 0.0)
        low = math.floor(position)
        return low, min(low + 1, size_in - 1), position - low

    result = torch.zeros(d, *out, dtype=torch.float64)
    for i in range(out[0]):
        y0, y1, wy = source(i, h_in, out[0])
        for j in range(out[1]):
            x0, x1, wx = source(j, w_in, out[1])
            top = (1 - wx) * grid[:, y0, x0] + wx * grid[:, y0, x1]
            bottom = (1 - wx) * grid[:, y1, x0] + wx * grid[:, y1, x1]
            result[:, i, j] = (1 - wy) * top + wy * bottom
    return result


# ------------------------------------------------------------------------------------------ contrastive


@pytest.mark.parametrize("symmetric", [False, True])
def test_contrastive_loss_matches_a_brute_force_infonce(symmetric):
    loss = ContrastiveLoss(code_dim=6, teacher_dim=8, temperature=0.2, symmetric=symmetric)
    tokens, teacher = torch.randn(5, 3, 6), torch.randn(5, 8, 4, 4)
    value = loss(tokens, teacher)
    assert value.shape == () and value.dtype == torch.float32
    assert value.item() == pytest.approx(_infonce_reference(loss, tokens, teacher, 0.2), rel=1e-5)
    # teacher features given already pooled give the same loss
    assert loss(tokens, teacher.mean(dim=(2, 3))).item() == pytest.approx(value.item(), rel=1e-6)


def test_temperature_scales_the_logits_and_a_learnable_one_trains():
    tokens, teacher = torch.randn(6, 4, 5), torch.randn(6, 7, 3, 3)
    values = {}
    for temperature in (0.05, 0.5, 5.0):
        torch.manual_seed(0)
        loss = ContrastiveLoss(5, 7, temperature=temperature)
        values[temperature] = loss(tokens, teacher).item()
        assert values[temperature] == pytest.approx(_infonce_reference(loss, tokens, teacher, temperature), rel=1e-5)
    assert len(set(values.values())) == 3
    # a high temperature flattens the softmax towards uniform: the loss tends to log B
    assert values[5.0] == pytest.approx(math.log(6), abs=0.1)

    learnable = ContrastiveLoss(5, 7, temperature=0.1, learnable_temperature=True)
    assert learnable.temperature.item() == pytest.approx(0.1)
    assert learnable.log_scale in set(learnable.parameters())
    learnable(tokens, teacher).backward()
    assert learnable.log_scale.grad is not None and learnable.log_scale.grad.abs() > 0
    fixed = ContrastiveLoss(5, 7, temperature=0.1)
    assert "log_scale" not in dict(fixed.named_parameters()) and "log_scale" not in fixed.state_dict()
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ContrastiveLoss(5, 7, temperature=0.0)
    with pytest.raises(ValueError, match="its cap"):
        ContrastiveLoss(5, 7, temperature=0.001, learnable_temperature=True)


def _aligned(batch: int, temperature: float) -> tuple[ContrastiveLoss, torch.Tensor, torch.Tensor]:
    """A loss whose w_z is the identity, with tokens and teacher features both e_i for sample i."""
    loss = ContrastiveLoss(code_dim=batch, teacher_dim=batch, temperature=temperature)
    with torch.no_grad():
        loss.proj.weight.copy_(torch.eye(batch))
        loss.proj.bias.zero_()
    basis = torch.eye(batch)
    tokens = basis[:, None, :].expand(batch, 3, batch)  # (B, K, C): e_i at every token
    teacher = basis[:, :, None, None].expand(batch, batch, 2, 2)  # (B, D_t, h, w): e_i at every cell
    return loss, tokens, teacher


def test_loss_is_minimal_when_pairs_coincide_and_are_orthogonal():
    batch = 4
    for temperature in (1.0, 0.1, 0.01):
        loss, tokens, teacher = _aligned(batch, temperature)
        # cosines are 1 on the diagonal and 0 off it: log(1 + (B - 1) exp(-1 / temperature))
        expected = math.log(1 + (batch - 1) * math.exp(-1 / temperature))
        assert loss(tokens, teacher).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert loss(tokens, teacher).item() < 1e-6  # temperature 0.01
    # any other pairing of the same vectors costs about 1 / temperature per mismatched sample
    shuffled = loss(tokens, teacher[torch.tensor([1, 0, 2, 3])]).item()
    assert shuffled == pytest.approx(50.0, rel=1e-3)
    for _ in range(5):  # and random embeddings do no better
        assert loss(torch.randn(batch, 3, batch), torch.randn(batch, batch, 2, 2)).item() > 1e-3


def test_contrastive_input_errors():
    loss = ContrastiveLoss(6, 8)
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, K, C=6\)"):
        loss(torch.randn(2, 3, 5), torch.randn(2, 8, 2, 2))
    with pytest.raises(ValueError, match=r"teacher_features must have shape \(B=2, D_t=8"):
        loss(torch.randn(2, 3, 6), torch.randn(3, 8, 2, 2))
    with pytest.raises(ValueError, match="float tensor"):
        loss(torch.randn(2, 3, 6), torch.ones(2, 8, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        loss([[0.0]], torch.randn(2, 8, 2, 2))


# ------------------------------------------------------------------------------------------ distillation


def _distill_reference(loss: DistillationLoss, features: torch.Tensor, target: torch.Tensor) -> float:
    """mean over (b, p, c) of (target[b, c, p] - sum_d features[b, p, d] W[c, d] - bias[c])^2, float64."""
    weight, bias = loss.proj.weight.detach().double(), loss.proj.bias.detach().double()
    batch, patches, _ = features.shape
    target = target.double().flatten(2)  # (B, D_t, P), raster order
    total = 0.0
    for b in range(batch):
        for p in range(patches):
            total += float(((target[b, :, p] - weight @ features[b, p].double() - bias) ** 2).sum())
    return total / (batch * patches * weight.shape[0])


@pytest.mark.parametrize(
    ("teacher_grid", "latent_grid", "reference"),
    [
        ((8, 8), (8, 8), None),  # equal grids: the teacher's features as they are
        ((14, 14), (8, 8), _area_reference),  # SigLIP patch14 at 196 px onto an 8x8 latent grid
        ((16, 16), (8, 8), _area_reference),  # 2x2 block means
        ((4, 4), (8, 8), _bilinear_reference),  # a coarser teacher is interpolated
        ((6, 9), (4, 3), _area_reference),  # non-square
    ],
)
def test_distillation_aligns_the_teacher_grid_to_the_latent_grid(teacher_grid, latent_grid, reference):
    h, w = latent_grid
    loss = DistillationLoss(dim=12, teacher_dim=5)
    features, teacher = torch.randn(2, h * w, 12), torch.randn(2, 5, *teacher_grid)
    target = teacher if reference is None else torch.stack([reference(t, latent_grid) for t in teacher])
    resized = resize_grid(teacher, latent_grid)
    assert resized.shape == (2, 5, h, w)
    assert torch.allclose(resized.double(), target.double(), atol=1e-6)
    grid = None if h == w else latent_grid
    value = loss(features, teacher, grid)
    assert value.item() == pytest.approx(_distill_reference(loss, features, target), rel=1e-5)


def test_resize_modes_and_distillation_errors():
    teacher = torch.randn(1, 3, 4, 4)
    assert torch.allclose(resize_grid(teacher, (2, 2), "bilinear"), F.interpolate(teacher, (2, 2), mode="bilinear"))
    upsampled = resize_grid(teacher, (8, 8), "area")  # area upsampling repeats each cell
    assert torch.equal(upsampled, teacher.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    with pytest.raises(ValueError, match="resize must be one of"):
        DistillationLoss(4, 3, resize="nearest")
    loss = DistillationLoss(4, 3)
    with pytest.raises(ValueError, match="not a square grid: pass grid"):
        loss(torch.randn(1, 6, 4), teacher)
    with pytest.raises(ValueError, match=r"grid \(2, 2\) does not hold the P=6"):
        loss(torch.randn(1, 6, 4), teacher, (2, 2))
    with pytest.raises(ValueError, match=r"features must have shape \(B, P, D=4\)"):
        loss(torch.randn(1, 4, 5), teacher)
    with pytest.raises(ValueError, match=r"teacher_features must have shape \(B=2, D_t=3"):
        loss(torch.randn(2, 4, 4), teacher)


# ------------------------------------------------------------------------------------------ combined


def test_gradients_reach_the_projections_and_the_encoder_but_not_the_teacher():
    teacher = TinyTeacher(dim=16, width=8, patch=8)
    images = torch.rand(4, 3, 32, 32)
    teacher_features = teacher(images)  # (4, 16, 4, 4)
    assert not teacher_features.requires_grad
    loss = SemanticLoss(dim=10, code_dim=6, teacher_dim=16, distill_weight=0.5, contrastive_weight=2.0)
    features = torch.randn(4, 9, 10, requires_grad=True)  # a 3x3 latent grid
    tokens = torch.randn(4, 5, 6, requires_grad=True)
    total, terms = loss(teacher_features, features, tokens)
    assert set(terms) == {"distill", "contrastive"} and all(not t.requires_grad for t in terms.values())
    assert total.item() == pytest.approx(0.5 * terms["distill"].item() + 2.0 * terms["contrastive"].item(), rel=1e-6)
    total.backward()
    for name, param in loss.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert features.grad.abs().sum() > 0 and tokens.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(("distill", "contrastive"), [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_each_term_switches_off_with_a_zero_weight(distill, contrastive):
    """The four rows of Table 4: a term off has no projection and needs no input."""
    loss = SemanticLoss(dim=10, code_dim=6, teacher_dim=16, distill_weight=distill, contrastive_weight=contrastive)
    assert (loss.distill is not None) == (distill > 0) and (loss.contrastive is not None) == (contrastive > 0)
    assert loss.enabled == (distill > 0 or contrastive > 0)
    teacher_features = torch.randn(3, 16, 2, 2)
    features = torch.randn(3, 4, 10) if distill else None
    tokens = torch.randn(3, 5, 6) if contrastive else None
    total, terms = loss(teacher_features if loss.enabled else None, features, tokens)
    expected = {name for name, w in (("distill", distill), ("contrastive", contrastive)) if w > 0}
    assert set(terms) == expected
    assert total.item() == pytest.approx(sum(terms[k].item() for k in expected), abs=1e-6)
    widths = {p.shape for p in loss.parameters()}
    assert ((16, 10) in widths) == (distill > 0) and ((16, 6) in widths) == (contrastive > 0)


def test_semantic_loss_errors():
    with pytest.raises(ValueError, match="distill_weight must be a finite number >= 0"):
        SemanticLoss(4, 4, 4, distill_weight=-1.0)
    with pytest.raises(ValueError, match="contrastive_weight must be a finite number >= 0"):
        SemanticLoss(4, 4, 4, contrastive_weight=float("nan"))
    with pytest.raises(ValueError, match="teacher_dim must be a positive integer"):
        SemanticLoss(4, 4, 0)
    loss = SemanticLoss(4, 4, 8)
    with pytest.raises(ValueError, match="needs features"):
        loss(torch.randn(2, 8, 2, 2), tokens=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="needs tokens"):
        loss(torch.randn(2, 8, 2, 2), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="no teacher_features"):
        loss(None, torch.randn(2, 4, 4), torch.randn(2, 3, 4))


def test_learnable_temperature_survives_init_weights_and_is_logged():
    from mstok.layers.init import init_weights

    holder = nn.Module()
    holder.semantic = SemanticLoss(4, 4, 8, learnable_temperature=True, temperature=0.2)
    init_weights(holder)  # a model holding the loss re-initialises it: the temperature keeps its start
    assert holder.semantic.contrastive.temperature.item() == pytest.approx(0.2)
    _, terms = holder.semantic(torch.randn(2, 8, 2, 2), torch.randn(2, 4, 4), torch.randn(2, 3, 4))
    assert terms["temperature"].item() == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------ teachers


def test_tiny_teacher_is_frozen_deterministic_and_leaves_the_global_rng_alone():
    images = torch.rand(2, 3, 32, 48)
    state = torch.get_rng_state()
    a, b, c = TinyTeacher(dim=12, seed=3), TinyTeacher(dim=12, seed=3), TinyTeacher(dim=12, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    out = a(images)
    assert out.shape == (2, 12, 4, 6) and out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(out, b(images)) and torch.equal(out, a(images))
    assert not torch.allclose(out, c(images))
    assert all(not p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training and not any(m.training for m in a.modules())


def test_teachers_reject_bad_images():
    teacher = TinyTeacher(dim=4)
    with pytest.raises(ValueError, match="divide by 255"):
        teacher(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        teacher(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        teacher(torch.rand(1, 3, 16, 16) * 2 - 1)
    with pytest.raises(ValueError, match="NaN"):
        teacher(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="multiples of patch=8"):
        teacher(torch.rand(1, 3, 20, 16))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        teacher([[0.5]])
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        TinyTeacher(dim=0)


def test_callable_teacher_wraps_functions_and_freezes_modules():
    def pooled_colours(images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 4)

    teacher = CallableTeacher(pooled_colours, dim=3)
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(teacher(images), F.avg_pool2d(images, 4))
    conv = nn.Conv2d(3, 5, 4, stride=4).train()
    wrapped = CallableTeacher(conv, dim=5)
    assert wrapped.fn is conv and not conv.training and not conv.weight.requires_grad
    assert wrapped(images).shape == (2, 5, 4, 4) and not wrapped(images).requires_grad
    with pytest.raises(ValueError, match=r"expected \(B=2, D_t=4, h, w\)"):
        CallableTeacher(pooled_colours, dim=4)(images)
    with pytest.raises(TypeError, match="returned a tuple"):
        CallableTeacher(lambda x: (x,), dim=3)(images)
    with pytest.raises(TypeError, match="must be callable"):
        CallableTeacher(3, dim=3)


def test_build_teacher_specs_and_errors():
    assert isinstance(build_teacher("tiny"), TinyTeacher)
    built = build_teacher({"type": "tiny", "dim": 20, "patch": 4, "seed": 1})
    assert built.dim == 20 and built.patch == 4
    assert torch.equal(built.net[0].weight, TinyTeacher(dim=20, patch=4, seed=1).net[0].weight)
    assert build_teacher(built) is built
    with pytest.raises(ValueError, match="unknown teacher type 'clip'; known types: tiny, siglip"):
        build_teacher("clip")
    with pytest.raises(ValueError, match="unknown teacher type None"):
        build_teacher({"dim": 3})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['size'\] for teacher type 'tiny'; valid: dim"):
        build_teacher({"type": "tiny", "size": 3})
    with pytest.raises(TypeError, match="CallableTeacher"):
        build_teacher(lambda x: x)
    with pytest.raises(ValueError, match="SiglipTeacher needs a path"):
        build_teacher("siglip")


# ------------------------------------------------------------------------------------------ SigLIP

_VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory) -> Path:
    """A tiny random SiglipVisionModel saved as a transformers folder (config.json, model.safetensors)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("siglip")
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**_VISION)).save_pretrained(folder)
    return folder


@pytest.mark.slow  # the first import of transformers takes ~3 s
def test_siglip_teacher_loads_a_folder_and_returns_the_patch_grid(siglip_folder):
    from transformers import SiglipVisionModel

    assert {"config.json", "model.safetensors"} <= {p.name for p in siglip_folder.iterdir()}
    teacher = SiglipTeacher.from_pretrained(siglip_folder)
    assert teacher.dim == 32 and teacher.grid == 4
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    images = torch.rand(3, 3, 32, 32)
    out = teacher(images)
    assert out.shape == (3, 32, 4, 4) and out.dtype == torch.float32
    # by hand: normalise with SigLIP's mean = std = 0.5, run the tower, lay the 16 tokens out in raster order
    reference = SiglipVisionModel.from_pretrained(siglip_folder).eval()
    with torch.no_grad():
        tokens = reference(pixel_values=(images - 0.5) / 0.5).last_hidden_state  # (3, 16, 32), no class token
    assert tokens.shape == (3, 16, 32)
    assert torch.allclose(out, tokens.transpose(1, 2).reshape(3, 32, 4, 4), atol=1e-5)
    # another image size is resized to the model's 32x32 first
    assert teacher(torch.rand(2, 3, 64, 48)).shape == (2, 32, 4, 4)
    assert isinstance(build_teacher({"type": "siglip", "path": str(siglip_folder)}), SiglipTeacher)


@pytest.mark.slow  # saves and loads three tiny models
def test_siglip_teacher_reads_preprocessing_and_full_siglip_checkpoints(siglip_folder, tmp_path):
    import transformers

    folder = tmp_path / "siglip"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((siglip_folder / name).read_bytes())
    preprocessing = {"image_mean": [0.2, 0.3, 0.4], "image_std": [0.5, 0.6, 0.7], "resample": 2}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessing))
    teacher = SiglipTeacher.from_pretrained(folder)
    assert teacher.resample == "bilinear"
    assert torch.allclose(teacher.mean.flatten(), torch.tensor([0.2, 0.3, 0.4]))
    images = torch.rand(2, 3, 32, 32)
    plain = SiglipTeacher.from_pretrained(siglip_folder)
    shifted = (images - teacher.mean) / teacher.std * 0.5 + 0.5  # the same pixels under mean = std = 0.5
    with torch.no_grad():
        expected = plain.model(pixel_values=(shifted - 0.5) / 0.5).last_hidden_state
    assert torch.allclose(teacher(images).flatten(2).transpose(1, 2), expected, atol=1e-4)

    # a full SiglipModel checkpoint (vision and text towers), as the hub's google/siglip-* hold them
    text = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 8, "bos_token_id": 1, "eos_token_id": 2}
    full = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=_VISION))
    full.save_pretrained(tmp_path / "full")
    from_full = SiglipTeacher.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        expected = full.vision_model(pixel_values=(images - 0.5) / 0.5).last_hidden_state
    assert torch.allclose(from_full(images).flatten(2).transpose(1, 2), expected, atol=1e-5)


def test_siglip_teacher_missing_files_give_clear_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingWeightsError, match=r"SigLIP folder .*nowhere does not exist") as err:
        SiglipTeacher.from_pretrained(missing)
    message = str(err.value)
    assert "config.json" in message and "model.safetensors" in message and str(missing) in message
    assert "hf download google/siglip-base-patch16-256" in message
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(MissingWeightsError, match=r"partial lacks model\.safetensors"):
        SiglipTeacher.from_pretrained(tmp_path / "partial")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    (tmp_path / "clip" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a SigLIP config: model_type 'clip_vision_model'"):
        SiglipTeacher.from_pretrained(tmp_path / "clip")


def test_siglip_hub_id_without_download_is_a_missing_weights_error(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # the id is not a local folder here
    with pytest.raises(MissingWeightsError, match="downloading is disabled") as err:
        SiglipTeacher.from_pretrained("mstok-test/not-a-siglip", download=False)
    assert "mstok-test/not-a-siglip" in str(err.value) and "model.safetensors" in str(err.value)


def test_teacher_is_an_abstract_interface():
    with pytest.raises(NotImplementedError):
        Teacher(dim=3)(torch.rand(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------ data parallel

_DDP_SCRIPT = """
import copy, json, sys
import torch, torch.distributed as dist
from mstok.tokenizers.semtok_semantic import ContrastiveLoss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
settings = {"paper": {}, "symmetric_learnable": {"symmetric": True, "learnable_temperature": True, "temperature": 0.3}}
results = {}
for name, options in settings.items():
    torch.manual_seed(0)
    loss = ContrastiveLoss(6, 10, **options)
    single = copy.deepcopy(loss)
    single.gather = False
    generator = torch.Generator().manual_seed(1)
    tokens, teacher = torch.randn(8, 3, 6, generator=generator), torch.randn(8, 10, 4, 4, generator=generator)
    local = slice(rank * 4, (rank + 1) * 4)
    value = loss(tokens[local], teacher[local])
    value.backward()
    value = value.detach()
    rank_loss = value.item()
    dist.all_reduce(value)  # what the trainer logs: the mean over ranks
    grads = [p.grad.clone() for p in loss.parameters()]
    for grad in grads:  # what DDP does: the mean over ranks
        dist.all_reduce(grad)
        grad /= world
    reference = single(tokens, teacher)
    reference.backward()
    results[name] = {
        "ddp": value.item() / world,
        "single": reference.item(),
        "rank_loss": rank_loss,
        "local_only": single(tokens[local], teacher[local]).item(),
        "grad_diff": max((g - p.grad).abs().max().item() for g, p in zip(grads, single.parameters())),
        "grad_size": max(p.grad.abs().max().item() for p in single.parameters()),
        "params": len(grads),
    }
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
dist.destroy_process_group()
"""


@pytest.mark.slow  # two fresh processes importing torch: ~5 s
def test_contrastive_loss_under_two_gloo_ranks_equals_one_process(tmp_path):
    """Each rank's negatives come from both ranks: the mean of the ranks' losses and of their
    gradients equals one process over the global batch of 8."""
    script, out = tmp_path / "ddp.py", tmp_path / "results.json"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    run = subprocess.run([*command, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["paper"]["params"] == 2 and results["symmetric_learnable"]["params"] == 3  # w, b (+ temperature)
    for name, r in results.items():
        assert r["ddp"] == pytest.approx(r["single"], rel=1e-5), name
        # rank 0 scored its samples against both ranks' negatives, not its own alone
        assert abs(r["rank_loss"] - r["local_only"]) > 1e-3, name
        assert r["grad_diff"] <= 1e-5 * r["grad_size"] + 1e-7, name
