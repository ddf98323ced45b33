"""Runs across machines, without the machines: what each node's first rank writes (engine/runtime/nodes.py,
the data cache, the built-in model)."""
from __future__ import annotations

import pytest
import torch

from engine.data.cache import cached_tensors
from engine.errors import UserError
from engine.runtime import nodes
from engine.runtime.distributed import DistInfo

CPU = torch.device("cpu")


def _dist(rank: int, local_rank: int) -> DistInfo:
    return DistInfo(rank=rank, local_rank=local_rank, world_size=2, device=CPU)


def test_built_in_model_is_written_whole_on_a_second_machine(tmp_path, monkeypatch):
    """Local rank 0 of the second machine is global rank 1, where transformers' save_pretrained writes nothing
    once torch.distributed is up: the folder must still hold the weights and config."""
    from engine.models import tiny

    monkeypatch.setenv("RLHF_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    folder = tiny.ensure_tiny_model(7)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}


def test_data_cache_is_built_by_the_first_rank_of_a_machine_that_lacks_it(tmp_path):
    built = []

    def build():
        built.append(1)
        return {"x": torch.arange(3)}, {"k": "v"}

    path = tmp_path / "cache.safetensors"
    with pytest.raises(UserError, match="cannot read the tokenized-data cache"):
        cached_tensors(path, build, _dist(rank=1, local_rank=1))  # not a node's first rank: it only reads
    tensors, meta = cached_tensors(path, build, _dist(rank=1, local_rank=0))
    assert built == [1] and tensors["x"].tolist() == [0, 1, 2] and meta == {"k": "v"}
    cached_tensors(path, build, _dist(rank=1, local_rank=0))  # there now: not built again
    assert built == [1]


def test_node_local_output_turns_on_per_node_writes(monkeypatch):
    config = {"train_batch_size": 8, "checkpoint": {"tag_validation": "Warn"}}
    monkeypatch.setattr(nodes, "_node_local", False)
    assert nodes.ds_checkpoint_config(config) is config
    assert [nodes.writes_node_copy(_dist(r, lr)) for r, lr in ((0, 0), (1, 0), (1, 1))] == [True, False, False]
    monkeypatch.setattr(nodes, "_node_local", True)
    per_node = nodes.ds_checkpoint_config(config)["checkpoint"]
    assert per_node == {"tag_validation": "Warn", "use_node_local_storage": True}
    assert config["checkpoint"] == {"tag_validation": "Warn"}  # the caller's config is not changed
    assert [nodes.writes_node_copy(_dist(r, lr)) for r, lr in ((0, 0), (1, 0), (1, 1))] == [True, True, False]


def test_one_process_is_never_node_local(tmp_path):
    assert nodes.probe_output_dir(tmp_path / "out", DistInfo(0, 0, 1, CPU)) and not nodes.output_is_node_local()
    assert not (tmp_path / "out").exists()
