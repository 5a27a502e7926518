"""Process-group plumbing for data-parallel training under ``torchrun``.

A run started by ``torchrun --nproc_per_node=N`` finds ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in its environment; :meth:`DistContext.from_env` joins the process group
(NCCL on GPU, gloo on CPU) and picks the rank's device. Without those variables it is a
single process and every collective below is a no-op, so the trainer has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mstok.device import resolve_device  # also this module's name for it (it lived here)


@dataclass
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (an immutable default)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and progress bars."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto", what: str = "device") -> DistContext:
        """Join the process group when launched by torchrun, else describe a single process.

        Args:
            device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``; under
                torchrun a CUDA run uses ``cuda:LOCAL_RANK``.
            what: the setting ``device`` came from, named in errors (:func:`resolve_device`).
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        requested = resolve_device(device, what)
        kind = requested.type
        if kind == "cuda":
            index = local_rank if world_size > 1 else (requested.index or 0)
            torch.cuda.set_device(index)
            resolved = torch.device("cuda", index)
        else:
            resolved = torch.device(kind)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
        return cls(rank, world_size, local_rank, resolved)

    # ----------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of ``tensor`` over ranks (a new tensor; the input is untouched)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def all_gather_cat(self, tensor: torch.Tensor, same_size: bool = False) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along dim 0, in rank order.

        Ranks may hold different numbers of rows; they are padded to the largest for the
        collective and trimmed afterwards. ``same_size=True`` promises equal shapes and skips
        the size exchange (and its wait for the device).
        """
        if not self.enabled:
            return tensor
        tensor = tensor.contiguous()
        if same_size:
            out = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
            dist.all_gather_into_tensor(out, tensor)
            return out
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(s.item())] for part, s in zip(parts, sizes, strict=True)])

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over ranks in one collective (for modules that
        are not wrapped in DistributedDataParallel, like the discriminator)."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def broadcast_object(self, value: object) -> object:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        """Leave the process group (call once at the end of a run)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
