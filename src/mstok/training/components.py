"""What a training config asks for, built and checked before the first step.

Each builder turns one section of :class:`TrainConfig` into objects and fails early with
a message naming the config key when something is missing (weights files, a proxy
tokenizer, a head that cannot produce what the losses need).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mstok.data import IndexSubset, RandomResizedCropFlip, center_crop_transform, open_image_dataset
from mstok.losses import TokenizerLoss
from mstok.losses.gan import AdversarialLoss
from mstok.losses.perceptual import LPIPS
from mstok.losses.teachers import build_teacher
from mstok.persistence import load_official_vqgan, load_tokenizer
from mstok.storage.locate import find_model_folder
from mstok.storage.weights import MissingWeightsError
from mstok.training.config import TrainConfig

PROXY_FAMILY = "maskgit_vqgan"


def load_proxy(path: str | Path, weights: str = "model.safetensors") -> nn.Module:
    """The frozen proxy tokenizer: an mstok MaskGIT-VQGAN folder, a run or checkpoint folder
    of one (newest checkpoint), or an official ``maskgit-vqgan-imagenet-f16-256.bin``."""
    path = Path(path)
    if path.is_file():
        proxy = load_official_vqgan(path)
    elif path.exists():
        proxy = load_tokenizer(find_model_folder(path, "proxy.checkpoint"), weights=weights)
    else:
        raise FileNotFoundError(f"proxy.checkpoint: {path} does not exist (train one with `mstok train-proxy`)")
    if getattr(proxy.config, "family", "") != PROXY_FAMILY:
        raise ValueError(f"proxy.checkpoint: {path} is a {proxy.config.family!r} tokenizer, not a MaskGIT-VQGAN")
    return proxy.eval().requires_grad_(False)


def build_loss(config: TrainConfig, device: torch.device) -> tuple[TokenizerLoss, nn.Module | None]:
    """The objective, and the adversarial module (with the discriminator) when the GAN is on."""
    w = config.loss
    perceptual = None
    if w.perceptual_weight > 0:
        p = config.perceptual
        try:
            perceptual = LPIPS.from_pretrained(
                p.vgg_weights or None, p.lpips_weights or None, cache=p.cache or None, download=p.download
            )
        except MissingWeightsError as err:
            raise MissingWeightsError(
                f"loss.perceptual_weight = {w.perceptual_weight} needs the LPIPS weights: {err}\n"
                "Set perceptual.vgg_weights / perceptual.lpips_weights to local files, or set "
                "loss.perceptual_weight = 0."
            ) from err
        perceptual = perceptual.to(device)
    adversarial = None
    if w.gan_weight > 0:
        d = config.discriminator
        adversarial = AdversarialLoss(
            base_channels=d.base_channels, num_layers=d.num_layers, lecam_weight=w.lecam_weight
        ).to(device)
    teacher = None
    if w.distill_weight > 0 or w.contrastive_weight > 0:
        try:
            teacher = build_teacher(config.teacher.spec)
        except MissingWeightsError as err:
            raise MissingWeightsError(
                f"loss.distill_weight / loss.contrastive_weight need the semantic teacher (teacher.spec = "
                f"{config.teacher.spec!r}): {err}\nPoint teacher.spec at local weights, or set both weights to 0."
            ) from err
        except (ValueError, TypeError) as err:
            raise ValueError(f"teacher.spec: {err}") from err
        teacher = teacher.to(device)
    loss = TokenizerLoss(
        l1_weight=w.l1_weight,
        mse_weight=w.mse_weight,
        perceptual_weight=w.perceptual_weight,
        quantizer_weight=w.quantizer_weight,
        proxy_ce_weight=w.proxy_ce_weight,
        label_smoothing=w.label_smoothing,
        gan_weight=w.gan_weight,
        multiscale_weight=w.multiscale_weight,
        perceptual=perceptual,
        adversarial=adversarial,
        flow_weight=w.flow_weight,
        distill_weight=w.distill_weight,
        contrastive_weight=w.contrastive_weight,
        teacher=teacher,
        entropy_boost=w.entropy_boost,
        entropy_boost_steps=w.entropy_boost_steps,
    )
    return loss, adversarial


def check_model_fits_loss(model: nn.Module, loss: TokenizerLoss, proxy: nn.Module | None) -> None:
    """Refuse configs whose losses need outputs the model or the proxy cannot give."""
    head = getattr(model.config, "head", "pixels")
    has_pixels = head == "pixels" or getattr(model, "pixel_decoder", None) is not None
    if loss.needs_pixels and not has_pixels:
        raise ValueError(
            "the config has pixel losses (l1/mse/perceptual/gan weights) but the model predicts proxy codes "
            "without a pixel decoder: set those weights to 0 (stage 1) or stage.pixel_decoder_from_proxy = true"
        )
    check_flow_and_semantics(model, loss)
    if loss.needs_scales and getattr(model.config, "scales", None) is None:
        raise ValueError(
            f"loss.multiscale_weight = {loss.multiscale_weight} needs a multi-scale tokenizer (family 'hieratok', "
            f"whose decoder reconstructs every scale), but the model is a {model.config.family!r} tokenizer: "
            "set loss.multiscale_weight = 0"
        )
    scales = getattr(model.config, "scales", ())
    if len(scales) > 1 and model.config.attention == "scale_independent" and not loss.needs_scales:
        raise ValueError(
            "attention = 'scale_independent' keeps the coarser scales apart from the full-resolution image, so "
            "without loss.multiscale_weight > 0 they reach no loss at all: set it (the paper uses 1) or "
            "model.overrides.attention = 'scale_causal'"
        )
    if loss.needs_proxy_codes:
        if head != "proxy_codes":
            raise ValueError("loss.proxy_ce_weight > 0 needs model.overrides.head = 'proxy_codes'")
        if proxy is None:
            raise ValueError("loss.proxy_ce_weight > 0 needs a proxy tokenizer: set proxy.checkpoint")
        if model.config.proxy_codebook_size != proxy.config.codebook_size:
            raise ValueError(
                f"the model predicts {model.config.proxy_codebook_size} proxy codes but the proxy has "
                f"{proxy.config.codebook_size}: set model.overrides.proxy_codebook_size"
            )


def check_flow_and_semantics(model: nn.Module, loss: TokenizerLoss) -> None:
    """The flow and semantic terms against a model (SemTok): a flow decoder yields velocities,
    not pixels; every semantic term needs the model's projection, and every trainable
    projection a term (an untrained parameter stalls data-parallel training)."""
    mode = getattr(model.config, "decoder_mode", None)
    if mode == "flow" and loss.needs_pixels:
        raise ValueError(
            "the model's decoder is a flow (decoder_mode = 'flow', SemTok stage I): it predicts velocities, not "
            "pixels: set loss.l1_weight, mse_weight, perceptual_weight and gan_weight to 0 (and loss.flow_weight > 0), "
            "or set model.overrides.decoder_mode = 'refine' for stage II"
        )
    if loss.needs_flow and mode != "flow":
        raise ValueError(
            f"loss.flow_weight = {loss.flow_weight} needs a flow-matching decoder (family 'semtok' with decoder_mode = "
            "'flow'); this model has none: set loss.flow_weight = 0"
        )
    if mode == "flow" and not loss.needs_flow and any(p.requires_grad for p in model.decoder.parameters()):
        raise ValueError("the stage trains a flow decoder but loss.flow_weight = 0: set it (the paper: 1)")
    have = tuple(getattr(model, "semantic_terms", ()))
    for term in loss.semantic_terms:
        if term not in have:
            raise ValueError(
                f"loss.{term}_weight > 0 needs the model's {term} projection: a SemTok with "
                f"model.overrides.teacher_dim = the teacher's width and {term!r} in semantic_terms; "
                f"this model has {list(have) or 'none'}"
            )
    for term in have:
        trained = any(p.requires_grad for n, p in model.named_parameters() if n.startswith(f"semantic.{term}."))
        if trained and term not in loss.semantic_terms:
            raise ValueError(
                f"the stage trains the model's {term} projection but loss.{term}_weight = 0, so it would get no "
                f"gradient: set the weight, leave 'semantic' out of stage.train, or drop {term!r} from semantic_terms"
            )
    teacher_dim = getattr(model.config, "teacher_dim", 0)
    if loss.semantic_terms and loss.teacher.dim != teacher_dim:
        raise ValueError(
            f"the teacher (teacher.spec) has width {loss.teacher.dim} but the model's projections expect "
            f"teacher_dim = {teacher_dim}: set model.overrides.teacher_dim = {loss.teacher.dim} or pick another teacher"
        )


def build_dataset(config: TrainConfig, image_size: int) -> Dataset:
    """The training images at ``config.data.path`` (folder or shards) with the training augmentation."""
    if not config.data.path:
        raise ValueError("no training data: set data.path in the config or pass --set data.path=DIR")
    return open_image_dataset(
        config.data.path,
        RandomResizedCropFlip(image_size, tuple(config.data.crop_scale), flip=config.data.flip),
        config.data.max_pixels,
    )


def _center_cropped(dataset: Dataset, indices: Iterable[int], count: int, image_size: int) -> torch.Tensor | None:
    """Up to ``count`` readable images at ``indices`` of ``dataset``, resized and center-cropped,
    or None. The dataset's file index is shared, not rebuilt: a shallow copy only swaps its
    ``transform``."""
    dataset = copy.copy(dataset)
    dataset.transform = center_crop_transform(image_size)
    images = []
    for index in indices:
        item = dataset[(int(index), 0)]
        if item is not None:
            images.append(item[0])
        if len(images) == count:
            break
    return torch.stack(images) if images else None


def fixed_batch(dataset: Dataset, count: int, image_size: int) -> torch.Tensor | None:
    """``count`` evenly spaced readable images of ``dataset``, resized and center-cropped (the same
    every time), or None."""
    return _center_cropped(dataset, range(0, len(dataset), max(1, len(dataset) // count)), count, image_size)


def held_out_indices(num_items: int, count: int) -> np.ndarray:
    """``count`` evenly spaced indices of ``num_items`` items: a function of the two numbers
    alone, so every DDP rank and every resume of a run holds out the same images."""
    if count >= num_items:
        raise ValueError(
            f"val_images = {count} would hold out all {num_items} training images: lower it or set data.val_path"
        )
    return np.arange(count, dtype=np.int64) * num_items // count


def build_validation(
    config: TrainConfig, dataset: Dataset | None, image_size: int
) -> tuple[Dataset | None, torch.Tensor | None]:
    """The held-out batch for ``val_every``, and the training set without it.

    ``val_images`` evenly spaced images of ``data.val_path`` when it is set (the training set is
    then used whole); else of ``dataset`` (the one read from ``data.path``), whose other images
    become the training set. Returns ``(training set, held-out images (N, 3, S, S))``, where the
    training set is ``dataset`` itself with ``data.val_path``, and ``(None, None)`` when neither
    source exists. The held-out indices depend only on the folder's size and ``val_images``, so
    every rank and every resume trains on the same images.
    """
    count = config.val_images
    if config.data.val_path:
        val_set = open_image_dataset(config.data.val_path, center_crop_transform(image_size), config.data.max_pixels)
        images = fixed_batch(val_set, count, image_size)
        if images is None:
            raise ValueError(f"data.val_path: no readable image in {config.data.val_path}")
        return dataset, images
    if dataset is None:
        return None, None
    held = held_out_indices(len(dataset), count)
    images = _center_cropped(dataset, held, count, image_size)
    if images is None:
        raise ValueError(f"none of the {count} images held out of data.path for validation is readable")
    return IndexSubset(dataset, np.setdiff1d(np.arange(len(dataset)), held)), images
