"""More than one GPU: one run on several (data-parallel, PyTorch's DDP started by torchrun) and
several runs on one machine (each takes a GPU no other hmnist run holds).

One run: with `train.devices` above 1 the train stage starts torchrun's engine itself, one
worker process per device (NCCL on CUDA, gloo on the CPU), waits for them and turns a failed
worker into one line. Every worker draws the same whole batch (the same permutation and the
same augmentation numbers) and keeps its slice of it (`shard`), so what an epoch sees does
not depend on the number of processes; batch norm is synchronised over the ranks.

Several runs: a lock file per GPU in a machine-wide folder, held with `fcntl.flock`, so the
kernel releases it when the process ends, crash or kill -9 included.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from hmnist.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, first_line

LAUNCHED = "HMNIST_LAUNCHED"  # the launcher's pid, set by `launch` for its workers: they leave error reports to it
PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_PEER_LOST = 3  # a worker whose collective failed because another worker had already gone
# how long a rank waits in a collective for the others: longer than any validation on rank 0,
# short enough that a worker on another machine that hangs does not hold the rest for ever
TIMEOUT = timedelta(minutes=30)


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


def ranks() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


# -- the launcher ----------------------------------------------------------------------------

def process_count(devices: int | str, device: str) -> int:
    """How many worker processes `train.devices` asks for on this machine."""
    if devices == "all":
        if device == "cpu" or not torch.cuda.is_available():
            raise UserError("train.devices is all but no CUDA GPU is visible: give a number of processes "
                            "(on the CPU: train.devices: 2 with train.device: cpu)")
        return torch.cuda.device_count()
    cores = cpu_cores()
    if devices > cores and (device == "cpu" or not torch.cuda.is_available()):
        # each process holds a model, its optimizer and the whole cache: more than the cores
        # only adds memory (64 of them filled 24 GB) and contention, never speed
        raise UserError(f"train.devices is {devices} but this machine has {cores} CPU core(s): "
                        f"on the CPU, use at most one process per core (train.devices: {cores} or less)")
    return int(devices)


def in_worker() -> bool:
    return "LOCAL_RANK" in os.environ  # torchrun sets it in every worker


def launch(module: str, processes: int, device: str, module_args: list[str] | tuple[str, ...] = ()) -> None:
    """Run `python -m module *module_args` in `processes` workers through torchrun's engine on this machine
    and wait for them. A worker that fails ends every other one and becomes one UserError
    naming its rank (or KeyboardInterrupt after Ctrl-C)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if device != "cpu" and torch.cuda.is_available():
        if device.startswith("cuda:"):
            raise UserError(f"train.device is {device} but train.devices is {processes}: "
                            "use cuda or auto to spread a run over several GPUs")
        gpus = claim_gpus(processes, visible_gpus())
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(name for name, _ in gpus)
        print(f"training on GPUs {', '.join(name for name, _ in gpus)} in {processes} processes", file=sys.stderr)
    else:
        print(f"training in {processes} CPU processes (gloo)", file=sys.stderr)
    # torchrun would set 1 and say so: split the cores between the workers instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    os.environ[LAUNCHED] = str(os.getpid())
    if "LOGLEVEL" not in os.environ:  # torchrun's own many-line report of a failure: ours is one line
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    args = parse_args(["--standalone", f"--nproc-per-node={processes}", "--monitor-interval=0.1",
                       "-m", module, *module_args])
    try:
        run(args)
    except SignalException as e:
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise UserError(f"stopped by {e.sigval.name}") from None
    except ChildFailedError as e:
        print(file=sys.stderr)  # rank 0's progress bar may have stopped mid-line: the report gets its own
        raise failure_report(e.failures) from None


def cpu_cores() -> int:
    """The cores this process may run on (taskset and cgroup cpusets included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def die_with_launcher(launcher: int) -> None:
    """End this worker when its launcher ends, however that happens: a launcher killed by
    SIGKILL or the out-of-memory killer cannot stop its workers, which would train on as
    orphans. On Linux the kernel sends SIGKILL (prctl PR_SET_PDEATHSIG); elsewhere a thread
    watches the parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == launcher:
                time.sleep(1)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, daemon=True, name="die-with-launcher").start()
    if os.getppid() != launcher:  # it was gone before the kernel was told
        os.kill(os.getpid(), signal.SIGKILL)


def failure_report(failures: dict[int, Any]) -> BaseException:
    """The one failure that explains the others: a worker that lost its peers is a consequence."""
    consequence = (EXIT_PEER_LOST, -signal.SIGTERM)  # SIGTERM: torchrun ending the others
    rank, failure = min(failures.items(), key=lambda item: (item[1].exitcode in consequence, item[1].timestamp, item[0]))
    message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
    if failure.exitcode == EXIT_INTERRUPTED:
        return KeyboardInterrupt()
    if message.startswith("UserError: "):
        return UserError(message.removeprefix("UserError: "))
    if failure.exitcode == EXIT_PEER_LOST:
        return UserError(f"training process rank {rank} lost its connection to the others: {first_line(Exception(message))}")
    if failure.exitcode < 0:
        return UserError(f"training process rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}")
    return UserError(f"training process rank {rank} (pid {failure.pid}) failed with exit code {failure.exitcode}: "
                     f"{first_line(Exception(message))} (its traceback is above)")


@contextlib.contextmanager
def worker(device: str) -> Iterator[Ranks]:
    """A training process: joins the process group when torchrun started it (NCCL on CUDA,
    gloo on the CPU) and leaves it at the end. Under `launch`, errors go to the launcher,
    which reports the first one once, instead of every rank printing its own."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        yield Ranks()
        return
    if os.environ.get(LAUNCHED, "").isdigit():
        die_with_launcher(int(os.environ[LAUNCHED]))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    interrupted = False

    def on_interrupt(signum, frame):
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield ranks()
    except BaseException as e:
        if interrupted or isinstance(e, KeyboardInterrupt):
            sys.exit(EXIT_INTERRUPTED)  # whatever a collective raised once Ctrl-C ended the others
        if not os.environ.get(LAUNCHED) or isinstance(e, SystemExit):
            raise
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        ErrorHandler().record_exception(e)  # the launcher reads it back from torchrun's error file
        if isinstance(e, UserError):
            sys.exit(EXIT_USER_ERROR)
        if _peer_lost(e):
            sys.exit(EXIT_PEER_LOST)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# What gloo's TCP transport says when the other end of a pair went away; NCCL's lost peers
# and every timeout come as torch.distributed.DistError.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def _peer_lost(e: BaseException) -> bool:
    """A collective that failed because another rank is gone (gloo raises a plain RuntimeError).
    Any other error naming gloo or NCCL (a wrong dtype, an invalid argument) is a bug: it keeps
    its traceback."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(s in str(e) for s in PEER_GONE))


# -- one run over several processes --------------------------------------------------------

def device(setting: str, ranks: Ranks, resolved: torch.device) -> torch.device:
    """The device of this process: its own GPU among several; else a GPU that no other hmnist
    run on the machine holds (several visible, `auto` or `cuda`); `cuda:K` is K."""
    if resolved.type != "cuda":
        return resolved
    if ranks.world > 1:
        return torch.device("cuda", ranks.local)
    if setting in ("auto", "cuda") and torch.cuda.device_count() > 1:
        (name, _), = claim_gpus(1, visible_gpus())
        index = visible_gpus().index(name)
        print(f"using GPU {name} (cuda:{index}); other hmnist runs on this machine take other GPUs", file=sys.stderr)
        return torch.device("cuda", index)
    return resolved


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


# -- several runs on one machine -------------------------------------------------------------

_held: list[IO] = []  # the locks of this process: open until it ends


def lock_dir() -> Path:
    return Path(os.environ.get("HMNIST_LOCK_DIR") or Path(tempfile.gettempdir()) / "hmnist-gpu-locks")


def visible_gpus() -> list[str]:
    """The GPUs this process sees, by the names CUDA_VISIBLE_DEVICES gives them (else 0..N-1),
    so that two runs shown different subsets still lock the same physical GPU under one name."""
    names = [n.strip() for n in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if n.strip()]
    count = torch.cuda.device_count()
    return names[:count] if names else [str(i) for i in range(count)]


def claim_gpus(count: int, gpus: list[str], poll: float = 5.0) -> list[tuple[str, IO]]:
    """Lock `count` of `gpus` that no other process holds, and keep them until this process
    ends. While too few are free, waits (saying so once): with more runs than GPUs, the rest
    queue instead of sharing a GPU, running out of memory and changing their results."""
    if count > len(gpus):
        raise UserError(f"train.devices is {count} but only {len(gpus)} GPU(s) are visible")
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        folder.chmod(0o1777)  # machine-wide, like /tmp: another user's runs must see these locks too
    said = False
    while True:
        held = []
        for name in gpus:
            file = open(folder / f"gpu-{name}.lock", "a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                continue
            file.truncate(0)
            file.write(f"{os.getpid()}\n")  # who holds it, for a curious user
            file.flush()
            held.append((name, file))
            if len(held) == count:
                _held.extend(f for _, f in held)
                return held
        for _, file in held:
            file.close()  # too few: hold none while waiting, or two waiting runs could block each other
        if not said:
            print(f"all GPUs are in use by other hmnist runs (locks in {folder}); waiting for {count} to come free",
                  file=sys.stderr)
            said = True
        time.sleep(poll)
