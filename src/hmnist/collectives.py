"""One training run over several processes: where this process stands among them (`Ranks`),
whether a batch can be shared by them (`shared_batch_size`), data parallelism with batch norm
synchronised over the ranks, and the collectives the train stage uses to agree (rank 0's
validation, the sum of the ranks' losses, every rank's random state).

Every worker draws the same whole batch (the same permutation and the same augmentation
numbers) and keeps its slice of it (`Ranks.shard`), so what an epoch sees does not depend on
the number of processes. `hmnist.distributed` starts the workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from hmnist.errors import UserError

if TYPE_CHECKING:
    from hmnist.config import Params


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the training processes (one process: rank 0 of 1)."""
    rank: int = 0
    world: int = 1
    local: int = 0  # its index on this machine: which of the machine's GPUs it drives

    @property
    def main(self) -> bool:
        """Rank 0 alone logs, saves the checkpoint, the curves and the resume state."""
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch; shares differ by at most one."""
        return batch.tensor_split(self.world)[self.rank] if self.world > 1 else batch


def shared_batch_size(params: Params, train_images: int, processes: int) -> int:
    """The global batch (at most the training set), which each of `processes` needs a share of."""
    batch_size = min(params.model_config.batch_size, train_images)
    if batch_size < processes:
        raise UserError(f"a batch of {batch_size} cannot be shared by {processes} processes: "
                        f"raise models.{params.model}.batch_size or lower train.devices")
    return batch_size


def ranks() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def data_parallel(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """`model` (already on `device`) with synchronised batch norm, wrapped in DDP: the gradients
    are averaged over the ranks as they are computed. Also gives each rank its own dropout and
    drop-path draws (the weights themselves are rank 0's: DDP broadcasts them)."""
    if ranks.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    sync_batchnorm(model, device)
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(torch.initial_seed() + ranks.rank)
    return wrapped


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch, in place: torch's SyncBatchNorm on GPUs, and on the
    CPU (gloo), where SyncBatchNorm refuses to run, `AllReduceBatchNorm`. Same parameters and
    buffers, so the state dict and the checkpoint do not change."""
    cls = nn.SyncBatchNorm if device.type == "cuda" else AllReduceBatchNorm
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
                synced = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                # the same tensors, not copies: the optimizer holds these parameters
                for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    setattr(synced, key, getattr(child, key))
                setattr(parent, name, synced.train(child.training))
    return model


class AllReduceBatchNorm(nn.BatchNorm2d):
    """Training-mode batch norm over every rank's batch, by differentiable all-reduce (so the
    backward pass sums the ranks' contributions too): the statistics, and so the gradients, of
    the whole batch. For CPU processes only; eval mode is plain batch norm."""

    def _check_input_dim(self, x):  # any of 1d, 2d, 3d
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], (1, -1, *[1] * (x.dim() - 2))
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.shape[1]])])
        sums = _AllSum.apply(local)
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = _AllSum.apply((centred * centred).sum(dims)) / n  # two passes: exact where E[x²] - mean² cancels
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), momentum)  # unbiased, as BatchNorm keeps it
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class _AllSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: every rank's loss depends on every rank's input
    through the sum, so the gradient of the sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_sum(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_sum(grad)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. its validation metrics, so all keep the same epoch)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
