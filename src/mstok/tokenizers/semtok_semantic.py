"""SemTok's semantic alignment constraint (section 3.1, eq. 2): distillation and contrastive terms.

Part of the SemTok model (it owns the learned projections ``w_x`` and ``w_z``), so it lives with
the tokenizer; :mod:`mstok.losses.semantic` re-exports it.

Both terms align the encoder to a frozen teacher's feature grid ``x_sig`` (B, D_t, h_t, w_t)
(:mod:`mstok.losses.teachers`, SigLIP in the paper), one per encoder branch:

* :class:`DistillationLoss`, on the 2D image branch: a linear projection ``w_x`` of the branch's
  outputs x (B, h*w, D) regresses the teacher's features resized to the latent grid (h, w):
  ``L_distill = ||x_sig - w_x(x)||^2``, taken as the mean squared error over tokens and channels
  (a sum over channels would scale the term with the teacher's width);
* :class:`ContrastiveLoss`, on the 1D token branch: ``u = P(x_sig) / ||P(x_sig)||`` with P the mean
  over the grid, ``v = w_z(Q(z)) / ||w_z(Q(z))||`` with Q(z) the quantized tokens (B, K, C) (the
  paper uses them "to compensate for quantization losses") pooled by their mean over K, and
  ``L_contra = -mean_i log(exp(t v_i.u_i) / sum_j exp(t v_i.u_j))``: for each sample's tokens, the
  teacher features of the same image against those of the others. Eq. 2 prints the sum of
  those log-probabilities without the minus sign that makes it a loss; the mean over the batch
  keeps the term's scale independent of the batch size. The sum runs over v only, so the loss is
  one-directional (``symmetric=True`` adds the u -> v direction, as CLIP does).
* :class:`SemanticLoss`: ``distill_weight * L_distill + contrastive_weight * L_contra``
  (``L_sem = L_contra + L_distill`` in eq. 2: both weights 1); a zero weight switches a term off
  and leaves its projection unbuilt, the four rows of Table 4's ablation.

The paper's t multiplies the cosine similarities and is not among the weights it says are
learned (``w_x``, ``w_z``): a fixed ``temperature`` = 1 / t is the default, 0.07 as CLIP starts
from; ``learnable_temperature`` learns log(1 / temperature) instead, capped at 100 as CLIP caps it.

Data parallel: every rank's loss covers its own samples (like any per-sample loss, the trainer
averages the ranks' values and DDP averages their gradients), but the negatives ``u_j`` (and
``v_j`` when symmetric) come from the whole global batch, gathered from every rank. A gathered
tensor that carries gradients is gathered by :class:`_GatherRows`, whose backward sums the
gradients every rank computed for each row back to the rank that owns it, so the averaged
gradients equal those of one process over the global batch. Every rank must pass the same
batch size (the mstok sampler gives every rank equal micro-batches).

Glossary: B batch, K latent tokens, C code dim, D encoder width, D_t teacher width, P patches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mstok.layers.embeddings import set_init_table
from mstok.layers.init import init_weights

RESIZE_MODES = ("auto", "area", "bilinear")
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on a learned 1 / temperature: beyond it training turns unstable


def _check_dim(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_tensor(name: str, x: Any, dims: tuple[int, ...], shape: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() not in dims:
        raise ValueError(f"{name} must be a float tensor of shape {shape}, got {x.dtype} of shape {tuple(x.shape)}")
    return x


def _check_teacher(teacher_features: Any, teacher_dim: int, batch: int | None = None) -> torch.Tensor:
    x = _check_tensor("teacher_features", teacher_features, (4,), "(B, D_t, h, w)")
    if x.shape[1] != teacher_dim or (batch is not None and x.shape[0] != batch):
        expected = f"(B={batch}, D_t={teacher_dim}, h, w)" if batch is not None else f"(B, D_t={teacher_dim}, h, w)"
        raise ValueError(f"teacher_features must have shape {expected}, got {tuple(x.shape)}")
    return x


def resize_grid(features: torch.Tensor, grid: tuple[int, int], mode: str = "auto") -> torch.Tensor:
    """Teacher features (B, D_t, h_t, w_t) resized to ``grid`` = (h, w), in float32.

    ``"area"`` averages the teacher cells each latent cell covers (adaptive average pooling:
    windows overlap when the ratio is not an integer), the right summary when a latent token
    stands for a larger region than a teacher patch; ``"bilinear"`` (``align_corners=False``)
    interpolates, the right choice when the teacher's grid is the coarser one, where area would
    repeat cells. ``"auto"`` takes area when the grid shrinks (or stays) on both sides, else
    bilinear. Equal grids are returned unchanged.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(map(repr, RESIZE_MODES))}, got {mode!r}")
    features = features.float()
    if tuple(features.shape[2:]) == tuple(grid):
        return features
    if mode == "auto":
        mode = "area" if grid[0] <= features.shape[2] and grid[1] <= features.shape[3] else "bilinear"
    if mode == "area":
        return F.interpolate(features, size=grid, mode="area")
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


class DistillationLoss(nn.Module):
    """``L_distill = mean((resize(x_sig) - w_x(x))^2)``, the 2D branch's term of eq. 2.

    Args:
        dim: D, the width of the encoder's 2D-branch outputs.
        teacher_dim: D_t, the teacher's feature width.
        resize: how the teacher grid reaches the latent grid (:func:`resize_grid`).
    """

    def __init__(self, dim: int, teacher_dim: int, resize: str = "auto") -> None:
        super().__init__()
        _check_dim("dim", dim)
        _check_dim("teacher_dim", teacher_dim)
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(map(repr, RESIZE_MODES))}, got {resize!r}")
        self.dim, self.teacher_dim, self.resize = dim, teacher_dim, resize
        self.proj = nn.Linear(dim, teacher_dim)  # w_x
        init_weights(self.proj)

    def forward(
        self, features: torch.Tensor, teacher_features: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The 0-d float32 loss.

        Args:
            features: (B, P, D) the 2D branch's outputs, raster order over the latent grid.
            teacher_features: (B, D_t, h_t, w_t) the teacher's features of the same images.
            grid: (h, w) with h * w = P; ``None`` for a square grid.
        """
        features = _check_tensor("features", features, (3,), "(B, P, D)")
        batch, patches, width = features.shape
        if width != self.dim:
            raise ValueError(f"features must have shape (B, P, D={self.dim}), got {tuple(features.shape)}")
        teacher_features = _check_teacher(teacher_features, self.teacher_dim, batch)
        if grid is None:
            side = math.isqrt(patches)
            if side * side != patches:
                raise ValueError(f"features hold P={patches} tokens, not a square grid: pass grid=(h, w)")
            grid = (side, side)
        if len(grid) != 2 or grid[0] * grid[1] != patches:
            raise ValueError(f"grid {tuple(grid)} does not hold the P={patches} tokens of features")
        target = resize_grid(teacher_features, (int(grid[0]), int(grid[1])), self.resize)
        target = rearrange(target, "b d h w -> b (h w) d")  # (B, P, D_t), raster order like features
        return F.mse_loss(self.proj(features).float(), target)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, teacher_dim={self.teacher_dim}, resize={self.resize!r}"


class _GatherRows(torch.autograd.Function):
    """Every rank's (B, F) rows concatenated in rank order (W*B, F), differentiable.

    The backward sums, over ranks, the gradient each rank's loss sent to every row, and hands
    each rank the part for its own rows: the gradient of the sum of all ranks' losses.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.count = dist.get_rank(), rows.shape[0]
        out = rows.new_empty((dist.get_world_size() * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_into_tensor(out, rows.contiguous())
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.count : (ctx.rank + 1) * ctx.count]


def _world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """All ranks' (B, F) rows as (W*B, F) in rank order; gradients reach the local rows when
    ``rows`` requires them (:class:`_GatherRows`). Without a process group, ``rows`` itself."""
    _, world = _world()
    if world == 1:
        return rows
    if rows.requires_grad:
        return _GatherRows.apply(rows)
    out = rows.new_empty((world * rows.shape[0], *rows.shape[1:]))
    dist.all_gather_into_tensor(out, rows.contiguous())
    return out


class ContrastiveLoss(nn.Module):
    """InfoNCE between pooled quantized tokens and pooled teacher features, the 1D branch's term of eq. 2.

    Args:
        code_dim: C, the width of the quantized tokens.
        teacher_dim: D_t, the teacher's feature width.
        temperature: 1 / t of eq. 2 (the initial value when learnable); logits are cosines / temperature.
        learnable_temperature: learn log(1 / temperature) (capped at 100) instead of fixing it.
        symmetric: add the teacher -> tokens direction and average the two (CLIP's loss);
            ``False`` is eq. 2, tokens -> teacher only.
        gather: under ``torch.distributed``, take the negatives from every rank's samples.
    """

    def __init__(
        self,
        code_dim: int,
        teacher_dim: int,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        symmetric: bool = False,
        gather: bool = True,
    ) -> None:
        super().__init__()
        _check_dim("code_dim", code_dim)
        _check_dim("teacher_dim", teacher_dim)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if learnable_temperature and 1 / temperature > MAX_LOGIT_SCALE:
            raise ValueError(
                f"a learnable temperature starts at or above 1/{MAX_LOGIT_SCALE:g} (its cap), got {temperature}"
            )
        self.code_dim, self.teacher_dim = code_dim, teacher_dim
        self.learnable_temperature, self.symmetric, self.gather = learnable_temperature, symmetric, gather
        self.proj = nn.Linear(code_dim, teacher_dim)  # w_z
        log_scale = torch.tensor(math.log(1 / temperature))
        if learnable_temperature:
            self.log_scale = nn.Parameter(torch.empty(()))
            # its start, for init_weights here and in any model that holds this loss (its rule would zero it)
            set_init_table(self, "log_scale", log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        init_weights(self)

    @property
    def temperature(self) -> torch.Tensor:
        """The current temperature (0-d, detached), 1 / t."""
        return 1 / self._scale().detach()

    def _scale(self) -> torch.Tensor:
        return self.log_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)

    def embeddings(self, tokens: torch.Tensor, teacher_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, u), the unit vectors (B, D_t) of the pooled, projected tokens and the pooled teacher features.

        Args:
            tokens: (B, K, C) quantized tokens Q(z).
            teacher_features: (B, D_t, h, w) the teacher's features, or (B, D_t) already pooled.
        """
        tokens = _check_tensor("tokens", tokens, (3,), "(B, K, C)")
        if tokens.shape[2] != self.code_dim:
            raise ValueError(f"tokens must have shape (B, K, C={self.code_dim}), got {tuple(tokens.shape)}")
        teacher_features = _check_tensor("teacher_features", teacher_features, (2, 4), "(B, D_t, h, w) or (B, D_t)")
        if teacher_features.shape[:2] != (tokens.shape[0], self.teacher_dim):
            raise ValueError(
                f"teacher_features must have shape (B={tokens.shape[0]}, D_t={self.teacher_dim}, ...), "
                f"got {tuple(teacher_features.shape)}"
            )
        pooled = teacher_features.float()
        if pooled.dim() == 4:
            pooled = pooled.mean(dim=(2, 3))  # P(x_sig), (B, D_t)
        v = self.proj(tokens.mean(dim=1)).float()  # w_z of the mean over K, (B, D_t)
        return F.normalize(v, dim=-1), F.normalize(pooled, dim=-1)

    def forward(self, tokens: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """The 0-d float32 loss over this rank's samples, negatives from the global batch.

        Args:
            tokens: (B, K, C) quantized tokens Q(z).
            teacher_features: (B, D_t, h, w) the teacher's features, or (B, D_t) already pooled.
        """
        v, u = self.embeddings(tokens, teacher_features)
        rank, world = _world() if self.gather else (0, 1)
        # sample i of this rank sits at row rank * B + i of the gathered batch
        labels = torch.arange(v.shape[0], device=v.device) + rank * v.shape[0]
        scale = self._scale()
        all_u = gather_rows(u) if world > 1 else u  # (W*B, D_t)
        loss = F.cross_entropy(scale * v @ all_u.T, labels)  # logits (B, W*B)
        if self.symmetric:
            all_v = gather_rows(v) if world > 1 else v
            loss = (loss + F.cross_entropy(scale * u @ all_v.T, labels)) / 2
        return loss

    def extra_repr(self) -> str:
        return (
            f"code_dim={self.code_dim}, teacher_dim={self.teacher_dim}, temperature={self.temperature.item():.4g}, "
            f"learnable_temperature={self.learnable_temperature}, symmetric={self.symmetric}, gather={self.gather}"
        )


class SemanticLoss(nn.Module):
    """``distill_weight * L_distill + contrastive_weight * L_contra`` (eq. 2 with both weights 1).

    A weight of 0 switches its term off: its module (and projection) is not built, and its
    input may be left out. The caller runs the teacher (a :class:`~mstok.losses.teachers.Teacher`)
    once per batch and passes its features; the projections here are trainable and, under
    data parallelism, need their gradients averaged over ranks like any other parameters.

    Args:
        dim: D, the width of the encoder's 2D-branch outputs (for the distillation term).
        code_dim: C, the width of the quantized tokens (for the contrastive term).
        teacher_dim: D_t, the teacher's feature width.
        distill_weight, contrastive_weight: the terms' weights, >= 0.
        resize: :class:`DistillationLoss`'s grid resizing.
        temperature, learnable_temperature, symmetric, gather: :class:`ContrastiveLoss`'s settings.
    """

    def __init__(
        self,
        dim: int,
        code_dim: int,
        teacher_dim: int,
        distill_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        resize: str = "auto",
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        symmetric: bool = False,
        gather: bool = True,
    ) -> None:
        super().__init__()
        for name, weight in (("distill_weight", distill_weight), ("contrastive_weight", contrastive_weight)):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}")
            if weight < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {weight}")
        self.distill_weight, self.contrastive_weight = float(distill_weight), float(contrastive_weight)
        self.distill = DistillationLoss(dim, teacher_dim, resize) if distill_weight > 0 else None
        self.contrastive = (
            ContrastiveLoss(code_dim, teacher_dim, temperature, learnable_temperature, symmetric, gather)
            if contrastive_weight > 0
            else None
        )

    @property
    def enabled(self) -> bool:
        """Whether any term is on (else the teacher need not run at all)."""
        return self.distill is not None or self.contrastive is not None

    def forward(
        self,
        teacher_features: torch.Tensor | None,
        features: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its terms (detached 0-d tensors, as :class:`~mstok.losses.TokenizerLoss` returns them).

        Args:
            teacher_features: (B, D_t, h_t, w_t) the teacher's features of the images.
            features: (B, P, D) the encoder's 2D-branch outputs (needed by the distillation term).
            tokens: (B, K, C) the quantized tokens Q(z) (needed by the contrastive term).
            grid: (h, w) of ``features``' latent grid; ``None`` for a square one.
        """
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float32)
        if self.enabled:
            if teacher_features is None:
                raise ValueError("the semantic loss has a term on but got no teacher_features")
            total = total.to(teacher_features.device)
        if self.distill is not None:
            if features is None:
                raise ValueError("distill_weight > 0 needs features, the encoder's 2D-branch outputs (B, P, D)")
            terms["distill"] = self.distill(features, teacher_features, grid)
            total = total + self.distill_weight * terms["distill"]
        if self.contrastive is not None:
            if tokens is None:
                raise ValueError("contrastive_weight > 0 needs tokens, the quantized latent tokens (B, K, C)")
            terms["contrastive"] = self.contrastive(tokens, teacher_features)
            total = total + self.contrastive_weight * terms["contrastive"]
            if self.contrastive.learnable_temperature:
                terms["temperature"] = self.contrastive.temperature
        return total, {k: v.detach() for k, v in terms.items()}
