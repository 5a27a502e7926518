"""The generator trainer: MaskGIT on pre-tokenized shards, on the shared training engine.

``GeneratorTrainer(config).fit()`` trains a :class:`~mstok.generators.MaskGITGenerator` on
the token shards written by ``mstok pretokenize`` (``data.path``). Each step masks a
schedule-distributed fraction of every example's tokens, drops its class label with
probability ``loss.class_dropout`` (so the model also learns the unconditional
distribution that classifier-free guidance needs) and minimises the masked-token loss. The
masking and the label dropout are drawn per sample from its seed (:class:`MaskedTokens`), so
one process and N ranks train identically.
Everything else (DDP, accumulation, autocast, EMA, atomic checkpoints, bit-identical
resume, JSONL/TensorBoard logs) is the :class:`~mstok.training.engine.Engine`'s. With
``tokenizer`` set and ``sample_every > 0``, the EMA generator's samples are decoded into an
image grid under ``<out_dir>/generated/``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from mstok.data.tokens import TokenDataset
from mstok.generators import create_generator, generate_images
from mstok.losses.masked import MaskedTokenLoss, MaskedTokens
from mstok.training.checkpoint import load_tokenizer_folder
from mstok.training.config import GeneratorTrainConfig
from mstok.training.distributed import DistContext
from mstok.training.engine import Engine, MicroBatch
from mstok.training.logger import RunLogger
from mstok.training.stages import load_initial_weights


def data_overrides(dataset: TokenDataset, overrides: dict[str, Any]) -> dict[str, Any]:
    """The generator's K, V and class count from the token data, checked against explicit overrides."""
    fields = dict(overrides)
    for name, value in (("num_tokens", dataset.num_tokens), ("codebook_size", dataset.codebook_size)):
        if name in fields and fields[name] != value:
            raise ValueError(f"model.overrides.{name} = {fields[name]}, but the token data has {name} = {value}")
        fields[name] = value
    if fields.setdefault("num_classes", dataset.num_classes) < dataset.num_classes:
        raise ValueError(
            f"model.overrides.num_classes = {fields['num_classes']}, but the token data has labels up to "
            f"{dataset.num_classes - 1}"
        )
    return fields


class GeneratorTrainer(Engine):
    """Trains a MaskGIT generator according to a :class:`GeneratorTrainConfig`.

    Args:
        config: the run's configuration.
        dataset: optional :class:`TokenDataset` (defaults to the one at ``config.data.path``).
        progress: show a tqdm progress bar (rank 0 only).
        dist: the process's place in a DDP job; read from the torchrun environment by default.
        desc: the progress bar's label.
    """

    config: GeneratorTrainConfig
    postfix_keys = ("loss", "accuracy")

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
        model = create_generator(config.model.preset, **data_overrides(dataset, config.model.overrides))
        if config.model.init_from:
            load_initial_weights(model, config.model.init_from, config.model.init_weights)
        self.loss_fn = MaskedTokenLoss(config.loss.label_smoothing, config.loss.unmasked_weight)
        self.tokenizer = None
        # names of the token data's classes (pretokenize records the image folder's), for the grid labels
        self.class_names = [str(n) for n in getattr(dataset, "index", {}).get("classes", [])]
        if config.tokenizer and config.sample_every:
            self.tokenizer = load_tokenizer_folder(config.tokenizer, config.tokenizer_weights, "tokenizer")[0]
            if isinstance(dataset, TokenDataset):
                dataset.check_matches(self.tokenizer)  # a grid from another tokenizer is noise
            self.tokenizer.to(self.device)
        gen = model.config
        self.setup(
            model, MaskedTokens(dataset, gen.mask_id, config.loss.schedule, config.loss.class_dropout, gen.null_class)
        )

    def start_fields(self) -> dict[str, Any]:
        return {"parameters": sum(p.numel() for p in self.model.parameters())}

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, torch.Tensor]:
        """One optimisation step on masked tokens (masked and label-dropped per sample by
        :class:`MaskedTokens`): predict the originals, masked-token loss.

        The loss is normalised by the total slot weight of the *global* batch (all micro-steps,
        all ranks; one small all-reduce of totals known before the forward), so accumulation and
        DDP give exactly the gradient of one big batch."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        inputs = []
        for stacked, labels in micro_batches:
            masked, mask, tokens = stacked.to(self.device, non_blocking=True).unbind(1)  # 3 x (B, K)
            inputs.append((masked, mask.bool(), tokens, labels.to(self.device, non_blocking=True)))
        local = torch.stack(
            [sum(self.loss_fn.weights(m).sum() for _, m, _, _ in inputs), sum(m.sum() for _, m, _, _ in inputs)]
        ).float()
        # rank mean x world = global total; DDP then averages gradients over ranks
        weight_total, masked_total = (self.dist.all_reduce_mean(local) * self.dist.world_size).unbind()
        per_rank_weight = weight_total / self.dist.world_size
        masked_total = masked_total.clamp_min(1.0)
        sums: dict[str, torch.Tensor] = {}
        for i, (masked, mask, tokens, labels) in enumerate(inputs):
            with self.grad_sync(last=i == len(inputs) - 1):
                with self.autocast():
                    logits = self.train_model(masked, labels)  # (B, K, V)
                s = self.loss_fn.sums(logits, tokens, mask)
                loss = s["weighted"] / per_rank_weight
                self.scaler.scale(loss).backward()
            # each rank logs its share; the logger's mean over ranks restores the global ratio
            share = self.dist.world_size / masked_total
            for key, value in (("loss", loss.detach()), ("masked_ce", s["masked_ce"] * share),
                               ("accuracy", s["correct"] * share)):  # fmt: skip
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
        images, _ = generate_images(self.ema.module, self.tokenizer, labels, self.config.sampling, seed=0)
        # one labelled row per sample: its class id and, when the tokens know them, its class name
        names = [f"{c} {self.class_names[c]}" if c < len(self.class_names) else f"class {c}" for c in labels.tolist()]
        logger.image_grid(self.step, *images[:, None], tag="generated", labels=names)
