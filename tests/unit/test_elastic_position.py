"""Elastic resume's data position: the samples of an epoch's global order that all ranks consumed, dealt out
again to any number of ranks (engine/runtime/run.py), and the step count and learning-rate schedule that follow.
The real resume (DeepSpeed's universal conversion) is tests/distributed/test_elastic_resume.py."""
from __future__ import annotations

import json

import pytest
import torch

from engine.runtime.checkpoint import DS_CHECKPOINT_DIR, MANIFEST, _seal, elastic_seed, resume_position
from engine.runtime.distributed import DistInfo
from engine.runtime.run import ResumableSampler, Schedule, epoch_windows, make_loader, windows_left
from engine.runtime.universal import UNIVERSAL_DIR, UNIVERSAL_MANIFEST, is_sharded, remove_universal, universal_problem

CPU = torch.device("cpu")


def _samplers(n: int, world: int, consumed: int = 0, shuffle: bool = True, epoch: int = 0) -> list[list[int]]:
    """Each rank's indices of epoch `epoch` from ResumableSampler, after `consumed` samples of all ranks."""
    out = []
    for rank in range(world):
        sampler = ResumableSampler(list(range(n)), DistInfo(rank, rank, world, CPU), shuffle=shuffle, seed=7)
        sampler.set_epoch(epoch)
        sampler.consumed = consumed
        out.append(list(sampler))
        assert len(sampler) == len(out[-1])
    return out


def _torch_sampler(n: int, world: int, shuffle: bool = True, epoch: int = 0) -> list[list[int]]:
    out = []
    for rank in range(world):
        sampler = torch.utils.data.DistributedSampler(list(range(n)), num_replicas=world, rank=rank,
                                                      shuffle=shuffle, seed=7)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("n", [12, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_a_fresh_epoch_is_exactly_torchs_distributed_sampler(n, world, shuffle):
    for epoch in (0, 1):  # padding included: 13 samples on 4 ranks pad 3 from the epoch's start
        assert _samplers(n, world, shuffle=shuffle, epoch=epoch) == _torch_sampler(n, world, shuffle, epoch)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_same_world_size_resume_continues_each_ranks_own_stream(world):
    """k samples taken per rank = k * world consumed: each rank's rest is DistributedSampler's list from k on,
    so resuming on the ranks that saved is bit-identical to never stopping."""
    full = _torch_sampler(13, world)
    for k in range(len(full[0]) + 1):
        assert _samplers(13, world, consumed=k * world) == [rank[k:] for rank in full]


@pytest.mark.parametrize("new_world", [1, 3, 4])
@pytest.mark.parametrize("taken", [0, 2, 3])
def test_another_world_size_takes_the_rest_of_the_epoch_once(new_world, taken):
    """2 ranks take `taken` samples each; a run on `new_world` ranks takes the rest: together every sample of the
    epoch once, plus only the padding that makes the rest divide among the new ranks (from the epoch's start)."""
    n = 16
    before = [rank[:taken] for rank in _torch_sampler(n, 2)]
    consumed = 2 * taken
    after = _samplers(n, new_world, consumed=consumed)
    seen = [i for rank in before for i in rank] + [i for rank in after for i in rank]
    padding = -(n - consumed) % new_world
    assert sorted(set(seen)) == list(range(n)) and len(seen) == n + padding
    # the consumed samples are the first `consumed` of the global order, in both runs' view
    order = ResumableSampler(list(range(n)), DistInfo(0, 0, 1, CPU), shuffle=True, seed=7).epoch_order()
    assert sorted(i for rank in before for i in rank) == sorted(order[:consumed])
    assert len({len(rank) for rank in after}) == 1  # every rank the same count: no rank waits in a collective


def _loader(n: int, world: int, rank: int = 0, batch: int = 2):
    return make_loader(list(range(n)), batch, DistInfo(rank, rank, world, CPU), True, 7, lambda rows: rows)


def test_epoch_windows_yield_the_global_position_after_each_window():
    """20 samples, batch 2, accumulation 2 on 2 ranks: 8 global samples per window; from 8 consumed, 1 window
    (the epoch's 20 leave 12: 6 per rank, 3 micro-batches, 1 full window) ending at 16."""
    windows = list(epoch_windows(_loader(20, 2), 0, 8, 2))
    assert [consumed for consumed, _ in windows] == [16]
    assert [len(window) for _, window in windows] == [2]
    assert windows_left(_loader(20, 2), 0, 0, 2) == 2 and windows_left(_loader(20, 4), 0, 8, 1) == 2


def test_every_sample_once_across_an_elastic_resume():
    """Steps on 2 ranks, then the rest of the epoch on 4 and on 1: the samples drawn are the epoch, once each."""
    n, batch = 48, 2
    first = [window for rank in range(2) for _, window in list(epoch_windows(_loader(n, 2, rank), 0, 0, 1))[:3]]
    consumed = 3 * batch * 2  # 3 steps of one micro-batch of 2 on 2 ranks
    for new_world in (1, 4):
        rest = [w for rank in range(new_world) for _, w in epoch_windows(_loader(n, new_world, rank), 0, consumed, 1)]
        seen = [i for window in first + rest for micro in window for i in micro]
        assert sorted(seen) == list(range(n)), new_world


def test_schedule_of_a_resumed_run():
    """Batch 2, accumulation 2, an 80-sample epoch, 2 epochs. 2 ranks: 40 per rank, 20 micro-batches, 10 steps
    per epoch. Resumed after 3 steps (3 x 2 x 2 x 2 = 24 samples consumed) on the same 2 ranks: unchanged. On 4
    ranks: 56 left, 14 per rank, 7 micro-batches, 3 steps (the 7th micro-batch fills no step and is left out, as
    a run drops an epoch's tail), then 5 steps in the second epoch (20 per rank): 3 + 3 + 5."""
    two = Schedule.of(len(_loader(80, 2)), 2, 2)
    assert (two.steps_per_epoch, two.total_steps) == (10, 20)
    at = {"epoch": 0, "step_in_epoch": 3, "samples_in_epoch": 24, "global_step": 3}
    assert two.resumed(at, _loader(80, 2), 2, 2) == two
    four = Schedule.of(len(_loader(80, 4)), 2, 2)
    assert four.resumed(at, _loader(80, 4), 2, 2).total_steps == 3 + 7 // 2 + 5
    assert four.resumed(None, _loader(80, 4), 2, 2) == four


def test_elastic_seed_depends_on_seed_and_step_only():
    assert elastic_seed(1234, 6) == elastic_seed(1234, 6)
    assert len({elastic_seed(1234, 6), elastic_seed(1234, 7), elastic_seed(1, 6)}) == 3


def test_manifest_holds_the_position_and_excludes_the_universal_copy(tmp_path):
    folder, tag = tmp_path / DS_CHECKPOINT_DIR, "step4"
    (folder / "actor" / tag / UNIVERSAL_DIR / "zero").mkdir(parents=True)
    (folder / "actor" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o")
    (folder / "actor" / tag / UNIVERSAL_DIR / "zero" / "fp32.pt").write_bytes(b"u")
    (folder / tag).mkdir()
    (folder / tag / UNIVERSAL_MANIFEST).write_text("{}")
    position = {"epoch": 0, "step_in_epoch": 4, "samples_in_epoch": 64, "global_step": 4}
    _seal(folder, tag, ["actor"], 2, position)
    manifest = json.loads((folder / tag / MANIFEST).read_text())
    assert list(manifest["files"]) == [f"actor/{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert resume_position(tmp_path) == position
    assert is_sharded(folder / "actor" / tag)
    assert universal_problem(folder, tag) == f"{folder / tag / UNIVERSAL_MANIFEST} is damaged"
    remove_universal(folder, tag, ["actor"])
    assert universal_problem(folder, tag) == "not converted"
    assert not (folder / "actor" / tag / UNIVERSAL_DIR).exists()
    assert (folder / "actor" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists()
