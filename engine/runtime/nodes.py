"""Shared or node-local output folders, for runs across several machines.

On a cluster, --output_dir is either one shared folder (NFS, Lustre) or the same path on each machine's own
disk (local NVMe). Which one is found out once at start-up (`probe_output_dir`): rank 0 writes a probe file and
every rank looks for it. On node-local disks every node keeps its own copy of what its ranks need to resume:
DeepSpeed's per-node model states (its `checkpoint.use_node_local_storage`), each rank's ZeRO shards and RNG
state, and a manifest of its own sealed by the node's local rank 0 (`writes_node_copy`). The data cache is built
by each node's local rank 0 where it is missing (engine/data/cache.py).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from engine.runtime.distributed import DistInfo, all_reduce_sum, barrier

logger = logging.getLogger("engine")

_node_local = False  # this run's --output_dir is node-local (set by probe_output_dir)


def probe_output_dir(out: Path, dist: DistInfo) -> bool:
    """Whether every rank sees the same folder `out` (a collective: call it on every rank). The probe goes in
    `out`'s nearest existing folder (the same disk), so nothing is created before the inputs are checked.
    Remembers the answer for `writes_node_copy` and `ds_checkpoint_config`."""
    global _node_local
    if dist.world_size == 1:
        _node_local = False
        return True
    where = out.absolute()
    while not where.is_dir() and where != where.parent:
        where = where.parent
    token = int(all_reduce_sum([float(random.SystemRandom().randrange(1 << 40)) if dist.is_main else 0.0],
                               dist.device)[0])
    probe = where / f".rlhf-shared-probe-{token}"
    if dist.is_main:
        probe.touch()
    barrier()
    seen = all_reduce_sum([float(probe.exists())], dist.device)[0]
    barrier()
    if dist.is_main:
        probe.unlink(missing_ok=True)
    _node_local = seen < dist.world_size
    if _node_local:
        logger.info("--output_dir %s is not shared by every rank (%d of %d see rank 0's files): each node keeps "
                    "its own checkpoints there", out, int(seen), dist.world_size)
    return not _node_local


def output_is_node_local() -> bool:
    return _node_local


def writes_node_copy(dist: DistInfo) -> bool:
    """Whether this rank writes the files one rank writes for all: rank 0, and on node-local output folders
    each node's local rank 0 too (its node's copy)."""
    return dist.is_main or (_node_local and dist.local_rank == 0)


def ds_checkpoint_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """`ds_config` with DeepSpeed's node-local checkpoint storage turned on where --output_dir is node-local
    (then each node's local rank 0 writes the model states its ranks load); unchanged otherwise."""
    if not _node_local:
        return ds_config
    checkpoint = dict(ds_config.get("checkpoint", {}), use_node_local_storage=True)
    return dict(ds_config, checkpoint=checkpoint)
