"""The generator trainer: any generator family on pre-tokenized shards, on the shared engine.

``GeneratorTrainer(config).fit()`` trains the generator preset ``model.preset`` on the token
shards written by ``mstok pretokenize`` (``data.path``): a MaskGIT generator on token ids,
a DiT on the continuous latents of a VAE tokenizer, BitMAR on the ids of a BSQ tokenizer. The family's *objective*
(:class:`GeneratorObjective`) is all the trainer knows of it: MaskGIT's masks a
schedule-distributed fraction of every example's tokens and minimises the masked-token loss
(:class:`~mstok.losses.masked.MaskedTokenObjective`); the DiT's noises the latents, normalised
per channel by the data's statistics, and regresses the noise or velocity of the ``[diffusion]``
objective (:class:`~mstok.losses.diffusion.DiffusionObjective`; DDPM epsilon prediction by
default, the DiT/HieraTok testbed's); BitMAR's masks 70-100% of the tokens of a BSQ tokenizer
and predicts their bits (:class:`~mstok.losses.bitwise.BitwiseObjective`, ``[bit_loss]``). All
drop class labels for classifier-free guidance, and draw every corruption per sample from its
seed, so one process and N ranks train identically and a resume is bit-identical.

K, V (ids) or C (latents) and the class count come from the data; a DiT also records the
latents' per-channel mean and std (``latent_mean``/``latent_std``, std floored at
:data:`MIN_LATENT_STD`; explicit ``model.overrides`` of both replace them) and the diffusion
objective in its config, so sampling maps its samples back to the tokenizer's scale with the
same process. Everything else (DDP, accumulation, autocast, EMA, atomic checkpoints,
bit-identical resume, JSONL/TensorBoard logs) is the :class:`~mstok.training.engine.Engine`'s.
With ``tokenizer`` set and ``sample_every > 0``, the EMA generator's samples (the family's
sampling settings: ``sampling``, ``dit_sampling`` or ``bit_sampling``) are decoded into an image grid under
``<out_dir>/generated/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from mstok.data.tokens import TokenDataset
from mstok.generators import generate_images
from mstok.generators.dit_sampling import latent_scale
from mstok.generators.registry import FAMILIES, GeneratorFamily, TokenSpace, generator_config, preset_family
from mstok.losses.bitwise import BitwiseObjective
from mstok.losses.diffusion import DiffusionObjective
from mstok.losses.masked import MaskedTokenObjective
from mstok.persistence import load_tokenizer_folder
from mstok.training.config import GeneratorTrainConfig
from mstok.training.distributed import DistContext
from mstok.training.engine import Engine, MicroBatch
from mstok.training.logger import RunLogger
from mstok.training.stages import load_initial_weights

MIN_LATENT_STD = 1e-6  # a constant latent channel would otherwise be divided by zero


class GeneratorObjective(Protocol):
    """What the trainer calls of a family's objective (one per family, built by :data:`TRAINING`).

    ``inputs`` wraps the token data into per-sample training items ``(stacked, label)`` whose
    randomness comes from the sample's seed alone. Each step, per micro-batch: ``prepare`` moves a
    collated batch to the device; ``totals`` gives the counts the loss and the logged terms are
    normalised by, known before the forward (the trainer all-reduces them once per step);
    ``forward`` runs the model (under autocast); ``loss`` turns its output into the micro-batch's
    part of the global loss and logged terms, given this rank's share (global total / world size)
    of each total. ``postfix_keys`` are the terms shown on the progress bar.
    """

    postfix_keys: tuple[str, ...]

    def inputs(self, tokens: Dataset) -> Dataset: ...

    def prepare(self, stacked: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Any: ...

    def totals(self, batch: Any) -> torch.Tensor: ...

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def loss(
        self, output: torch.Tensor, batch: Any, share: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def _masked_objective(model: nn.Module, config: GeneratorTrainConfig) -> MaskedTokenObjective:
    loss, gen = config.loss, model.config
    return MaskedTokenObjective(
        gen.mask_id, gen.null_class, loss.schedule, loss.class_dropout, loss.label_smoothing, loss.unmasked_weight
    )


def _bitwise_objective(model: nn.Module, config: GeneratorTrainConfig) -> BitwiseObjective:
    loss, gen = config.bit_loss, model.config
    return BitwiseObjective(
        gen.num_bits, gen.group_bits, gen.null_class, loss.min_mask_ratio, loss.max_mask_ratio,
        loss.class_dropout, loss.label_smoothing,
    )  # fmt: skip


def _diffusion_objective(model: nn.Module, config: GeneratorTrainConfig) -> DiffusionObjective:
    gen = model.config
    return DiffusionObjective(config.diffusion, *latent_scale(gen), gen.class_dropout, gen.null_class)


def _dit_fields(config: GeneratorTrainConfig, dataset: Dataset, overrides: dict[str, Any]) -> dict[str, Any]:
    """A DiT's diffusion objective (from ``[diffusion]``) and latent statistics (from the data)."""
    if "diffusion" in overrides:
        raise ValueError("model.overrides.diffusion: a DiT's objective is set in the [diffusion] section")
    fields: dict[str, Any] = {"diffusion": config.diffusion.to_dict()}
    if "latent_mean" not in overrides and "latent_std" not in overrides:
        fields["latent_mean"] = tuple(dataset.latent_mean.tolist())
        fields["latent_std"] = tuple(dataset.latent_std.clamp_min(MIN_LATENT_STD).tolist())
    return fields


@dataclass(frozen=True)
class FamilyTraining:
    """How the trainer trains one family: its objective, the model config fields the run and
    the data set beyond K, V or C and the classes, and the settings of its sample grids."""

    objective: Callable[[nn.Module, GeneratorTrainConfig], GeneratorObjective]
    run_fields: Callable[[GeneratorTrainConfig, Dataset, dict[str, Any]], dict[str, Any]]
    sampling: Callable[[GeneratorTrainConfig], Any]


TRAINING: dict[str, FamilyTraining] = {
    "maskgit": FamilyTraining(_masked_objective, lambda config, data, overrides: {}, lambda c: c.sampling),
    "dit": FamilyTraining(_diffusion_objective, _dit_fields, lambda c: c.dit_sampling),
    "bitmar": FamilyTraining(_bitwise_objective, lambda config, data, overrides: {}, lambda c: c.bit_sampling),
}


def data_tokens(dataset: Dataset) -> TokenSpace:
    """The tokens a dataset holds: ids (``codebook_size``) or latents (``continuous``, ``token_dim``)."""
    if getattr(dataset, "continuous", False):
        return TokenSpace(True, dataset.num_tokens, dataset.token_dim)
    return TokenSpace(False, dataset.num_tokens, dataset.codebook_size)


def check_family_fits(family: GeneratorFamily, preset: str, dataset: Dataset) -> None:
    """ValueError when the preset's family models another kind of token than the data holds
    (ragged ids: MaskGIT only, the family with an end token)."""
    if getattr(dataset, "ragged", False) and family.name != "maskgit":
        presets = ", ".join(FAMILIES["maskgit"].presets)
        raise ValueError(
            f"model.preset {preset!r} is a {family.title} generator, but the token data is ragged (one length per "
            f"image, pretokenize --target-psnr): only MaskGIT learns lengths (its end token); train one of {presets}"
        )
    held = data_tokens(dataset)
    if family.continuous == held.continuous:
        return
    fits = [f for f in FAMILIES.values() if f.continuous == held.continuous]
    kind = "continuous latents" if family.continuous else "token ids"
    presets = ", ".join(name for f in fits for name in f.presets)
    raise ValueError(
        f"model.preset {preset!r} is a {family.title} generator, which models {kind}, but the token data holds "
        f"{held}: train a {' or '.join(f.title for f in fits)} preset ({presets}) on it"
    )


def data_overrides(dataset: Dataset, overrides: dict[str, Any], family: GeneratorFamily) -> dict[str, Any]:
    """The generator's K, V or C and class count from the token data, checked against explicit overrides."""
    fields, held = dict(overrides), data_tokens(dataset)
    sizes = [("num_tokens", held.num_tokens), (family.size_field, held.size)]
    if family.name == "maskgit":  # ragged data needs the end token, fixed-length data has no end to learn
        sizes.append(("end_token", bool(getattr(dataset, "ragged", False))))
    for name, value in sizes:
        if name in fields and fields[name] != value:
            raise ValueError(f"model.overrides.{name} = {fields[name]}, but the token data has {name} = {value}")
        fields[name] = value
    if fields.setdefault("num_classes", dataset.num_classes) < dataset.num_classes:
        raise ValueError(
            f"model.overrides.num_classes = {fields['num_classes']}, but the token data has labels up to "
            f"{dataset.num_classes - 1}"
        )
    return fields


def generator_model_config(config: GeneratorTrainConfig, dataset: Dataset) -> Any:
    """The model config a run of ``config`` on ``dataset`` trains: the preset ``model.preset``, its K, V or C
    and class count from the data (checked against explicit overrides), the family's run fields (a DiT's
    objective and latent statistics), then ``model.overrides``. Cheap (no model is built): a finished run's
    saved config can be checked against what its train config means today (a preset edited since)."""
    family = preset_family(config.model.preset)
    check_family_fits(family, config.model.preset, dataset)
    fields = data_overrides(dataset, config.model.overrides, family)
    fields.update(TRAINING[family.name].run_fields(config, dataset, config.model.overrides))
    return generator_config(config.model.preset, **fields)


class GeneratorTrainer(Engine):
    """Trains a generator of any family according to a :class:`GeneratorTrainConfig`.

    Args:
        config: the run's configuration.
        dataset: optional token dataset (defaults to the :class:`TokenDataset` at ``config.data.path``).
        progress: show a tqdm progress bar (rank 0 only).
        dist: the process's place in a DDP job; read from the torchrun environment by default.
        desc: the progress bar's label.
    """

    config: GeneratorTrainConfig

    def __init__(
        self,
        config: GeneratorTrainConfig,
        dataset: Dataset | None = None,
        progress: bool = True,
        dist: DistContext | None = None,
        desc: str = "train",
    ) -> None:
        super().__init__(config, progress, dist, desc)
        if dataset is None:
            if not config.data.path:
                raise ValueError("data.path is empty: point it at a folder written by `mstok pretokenize`")
            dataset = TokenDataset(config.data.path)
        family = preset_family(config.model.preset)
        self.training = TRAINING[family.name]
        model = family.build(generator_model_config(config, dataset))
        if config.model.init_from:
            load_initial_weights(model, config.model.init_from, config.model.init_weights)
        self.objective = self.training.objective(model, config)
        self.postfix_keys = self.objective.postfix_keys
        self.tokenizer = None
        # names of the token data's classes (pretokenize records the image folder's), for the grid labels
        self.class_names = [str(n) for n in getattr(dataset, "index", {}).get("classes", [])]
        if config.tokenizer and config.sample_every:
            self.tokenizer = load_tokenizer_folder(config.tokenizer, config.tokenizer_weights, "tokenizer")[0]
            if isinstance(dataset, TokenDataset):
                dataset.check_matches(self.tokenizer)  # a grid from another tokenizer is noise
            self.tokenizer.to(self.device)
        self.setup(model, self.objective.inputs(dataset))

    def start_fields(self) -> dict[str, Any]:
        return {"parameters": sum(p.numel() for p in self.model.parameters())}

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, torch.Tensor]:
        """One optimisation step of the family's objective on its per-sample corrupted inputs.

        The loss is normalised by totals of the *global* batch (all micro-steps, all ranks; one
        small all-reduce of totals known before the forward), so accumulation and DDP give
        exactly the gradient of one big batch."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        objective = self.objective
        batches = [objective.prepare(stacked, labels, self.device) for stacked, labels in micro_batches]
        local = torch.stack([objective.totals(batch) for batch in batches]).sum(0)
        # the rank mean of the totals is this rank's share of the global ones; DDP then averages
        # gradients over ranks, which restores the global normalisation
        share = self.dist.all_reduce_mean(local)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            with self.grad_sync(last=i == len(batches) - 1):
                with self.autocast():
                    output = objective.forward(self.train_model, batch)
                loss, terms = objective.loss(output, batch, share)
                self.scaler.scale(loss).backward()
            # each rank logs its share; the logger's mean over ranks restores the global ratio
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value
        sums["grad_norm"] = self.optimizer_step()
        return sums

    @torch.no_grad()
    def write_samples(self, logger: RunLogger) -> None:
        """Decode EMA samples of classes 0..N-1 (cycled) with a fixed seed into a grid."""
        if self.tokenizer is None or not self.dist.is_main:
            return
        gen = self.ema.module.config
        labels = torch.arange(self.config.num_samples) % gen.num_classes
        settings = self.training.sampling(self.config)
        images, _ = generate_images(self.ema.module, self.tokenizer, labels, settings, seed=0)
        # one labelled row per sample: its class id and, when the tokens know them, its class name
        names = [f"{c} {self.class_names[c]}" if c < len(self.class_names) else f"class {c}" for c in labels.tolist()]
        logger.image_grid(self.step, *images[:, None], tag="generated", labels=names)
