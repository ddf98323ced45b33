"""Process-group set-up for `deepspeed`, `torchrun` and plain `python` (a world of one).

DeepSpeed picks the backend from its accelerator: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.errors import UserError
from engine.observe import startup
from engine.runtime import network, op_builds, startup_guard, watchdog

logger = logging.getLogger("engine")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port nothing listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_rendezvous_port() -> None:
    """Refuse a MASTER_PORT another process listens on, before the rendezvous: rank 0 hosts the rendezvous
    store there, and a busy port otherwise ends the run after tens of seconds with a long EADDRINUSE
    traceback (two jobs on one machine with the launcher's default port 29500). Under torchrun the agent
    hosts the store itself (TORCHELASTIC_USE_AGENT_STORE), so the port is in use by design."""
    if os.environ.get("RANK") != "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return
    port = int(os.environ.get("MASTER_PORT", "0") or 0)
    if port <= 0:
        return
    with socket.socket() as s:
        # SO_REUSEADDR, as the store sets it: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            other = free_port()
            raise UserError(f"port {port} (MASTER_PORT, the rendezvous port) is in use on this machine, probably by "
                            f"another job; pick a free one: deepspeed --master_port {other} ..., torchrun "
                            f"--master_port {other} ..., or MASTER_PORT={other}") from None


def gpu_wanted() -> bool:
    """Run on CUDA: there is a GPU and DeepSpeed is not told to use the CPU (DS_ACCELERATOR=cpu, which
    e2e_rlhf.py's cpu deployment sets because the launcher exposes the GPUs to every rank anyway)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") in ("", "cuda")


def init_distributed(seed: int, peer_timeout: float = 0.0, startup_timeout: float = 0.0) -> DistInfo:
    """Join (or create) the process group and seed every RNG the same way on every rank.

    peer_timeout > 0 with more than one rank starts the peer watchdog (engine/runtime/watchdog.py): if a rank
    dies or fails, the others stop within that many seconds, naming it; `run_main` stops it at the end.
    0 (the default, for callers without a --peer_timeout flag): no watchdog.
    startup_timeout > 0: joining the process group and starting the watchdog must take at most that many
    seconds (engine/runtime/startup_guard.py); 0: torch's own timeouts only."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # What DeepSpeed picks on a machine without a GPU, said up front: it then skips its warning
        # "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it".
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "RANK" not in os.environ:  # plain `python main.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not torch.distributed.is_initialized():
        network.check_master()  # an unusable MASTER_ADDR, or gloo left on loopback: said before the rendezvous
        check_rendezvous_port()  # before DeepSpeed's import and op build: a busy port fails in seconds
        network.check_world_size()  # across machines: a node started with another WORLD_SIZE is named at once
    op_builds.install()  # before DeepSpeed loads an op, here or later (cpu_adam with --offload)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    with startup_guard.guard(startup_timeout if multi else 0.0) as guard:
        info = _join(seed)
        network.release_world_size_store()
        if peer_timeout > 0 and info.world_size > 1:
            if guard is not None:
                guard.what = "starting the peer watchdog"
            watchdog.start(info.rank, info.world_size, peer_timeout, info.device)
    return info


def _join(seed: int) -> DistInfo:
    """The process group (joined unless it is up already), this rank's device, every RNG seeded."""
    if not torch.distributed.is_initialized():
        import deepspeed

        with startup.part("distributed"):
            deepspeed.init_distributed(verbose=False)
            release_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if gpu_wanted():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    set_seed(seed)
    return DistInfo(rank=torch.distributed.get_rank(), local_rank=local_rank,
                    world_size=torch.distributed.get_world_size(), device=device)


def shm_buffer_path(rank: int, env: dict[str, str] | os._Environ = os.environ) -> Path:
    """The shared-memory file of DeepSpeed's CPU all-reduce for `rank` (its ops/csrc/cpu/comm/shm.cpp names it
    by user, MASTER_ADDR, MASTER_PORT and rank; POSIX shared memory lives under /dev/shm on Linux)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                               f"{env.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer() -> None:
    """Unlink this rank's shared-memory all-reduce buffer once every rank has mapped every buffer.

    On the CPU under the deepspeed launcher (all ranks on one machine, LOCAL_SIZE set), DeepSpeed's process
    group gives each rank a 66 MB buffer in /dev/shm, which the other ranks open by name, and never unlinks it:
    measured with DeepSpeed 0.19.8, every 2-rank launch left 132 MB of RAM behind, a test run of the
    distributed tier about 20 GB, until the machine ran out of memory. Once all ranks have passed the barrier
    after the set-up, the name is no longer needed; the mappings stay valid until each process exits, and the
    memory is freed then, whether it exits cleanly or is killed."""
    from deepspeed.comm import comm

    world = torch.distributed.get_world_size()
    # DeepSpeed's own test for the buffer (shm_interface.cpp), the same on every rank: its shared-memory op is
    # loaded (CPU) and the launcher put every rank on this machine. Not under torchrun (no LOCAL_SIZE) or on GPU.
    if getattr(comm.cdb, "shm_comm_op", None) is None or os.environ.get("LOCAL_SIZE") != str(world):
        return
    if world > 1:
        torch.distributed.barrier()  # every rank is past its set-up, which opens the others' buffers
    shm_buffer_path(torch.distributed.get_rank()).unlink(missing_ok=True)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """The element-wise maximum of `values` over all ranks (the values themselves on one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


# Set (to anything but 0) to see DeepSpeed's INFO lines in a step and the launcher's lines in e2e_rlhf.py's console.
VERBOSE_ENV = "RLHF_ENGINE_VERBOSE"


def verbose_wanted(flag: bool = False) -> bool:
    """--verbose, or RLHF_ENGINE_VERBOSE set (the form that reaches a step through a launch script)."""
    return flag or os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


class TqdmLogHandler(logging.StreamHandler):
    """A console handler that writes through `tqdm.write`: it clears the progress bar, prints the line and
    redraws the bar, so a log line never lands glued to the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's contract: a failing handler reports and never raises
            self.handleError(record)


def setup_logging(is_main: bool, verbose: bool = False) -> None:
    """Rank 0 logs at INFO; the other ranks only warnings and errors. DeepSpeed's own INFO lines only when
    `verbose_wanted(verbose)`; its warnings and errors always."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=[TqdmLogHandler()],
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
    # Deprecation notices from transformers/torch internals, once per rank, bury the training log.
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("torch.distributed", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed's logger has its own stdout handler with its own level: both must change.
    ds_level = logging.INFO if verbose_wanted(verbose) and is_main else logging.WARNING
    for name in ("DeepSpeed", "deepspeed"):
        ds_logger = logging.getLogger(name)
        ds_logger.setLevel(ds_level)
        for handler in ds_logger.handlers:
            handler.setLevel(ds_level)
