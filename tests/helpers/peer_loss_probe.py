"""Two ranks of a real gloo process group, with the peer watchdog and `run_main`, and nothing else: after one
all_reduce rank 1 kills itself, and rank 0 either waits for it in a second all_reduce (`collective`: the
collective breaks first) or sleeps through its death (`sleep`: the watchdog sees it first).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=P python -m tests.helpers.peer_loss_probe MODE PEER_TIMEOUT

(tests/distributed/test_peer_loss_order.py starts both ranks).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch

from engine.runtime.distributed import init_distributed
from engine.runtime.entry import run_main


def main(argv: list[str] | None) -> None:
    mode, peer_timeout = argv if argv is not None else sys.argv[1:]
    dist = init_distributed(0, peer_timeout=float(peer_timeout), startup_timeout=120)
    tensor = torch.ones(1)
    torch.distributed.all_reduce(tensor)  # both ranks are up and watched
    if dist.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "sleep":
        time.sleep(3 * float(peer_timeout))
    torch.distributed.all_reduce(tensor)


if __name__ == "__main__":
    run_main(main)
