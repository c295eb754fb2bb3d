"""Starting one training run on several devices: with `train.devices` above 1 the train stage
starts torchrun's engine itself, one worker process per device (NCCL on CUDA, gloo on the
CPU), waits for them and turns a failed worker into one line; `worker` is a process's side of
it. What the workers share is in `hmnist.collectives`; which GPUs they take, `hmnist.gpus`.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from hmnist.collectives import Ranks, ranks
from hmnist.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, first_line
from hmnist.gpus import claim_gpus, visible_gpus

log = logging.getLogger(__name__)

LAUNCHED = "HMNIST_LAUNCHED"  # the launcher's pid, set by `launch` for its workers: they leave error reports to it
PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_PEER_LOST = 3  # a worker whose collective failed because another worker had already gone
# how long a rank waits in a collective for the others: longer than any validation on rank 0,
# short enough that a worker on another machine that hangs does not hold the rest for ever
TIMEOUT = timedelta(minutes=30)


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
        log.info(f"training on GPUs {', '.join(name for name, _ in gpus)} in {processes} processes")
    else:
        log.info(f"training in {processes} CPU processes (gloo)")
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
