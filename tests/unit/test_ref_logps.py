"""The cache of precomputed reference log-probs (engine/data/ref_logps.py): its round trip, its key, and that a
damaged file or a non-zero rank never yields or writes half a cache."""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch
from safetensors import safe_open

from engine.data import ref_logps
from engine.errors import UserError

CHOSEN = torch.tensor([-1.5, -2.25, -0.125])
REJECTED = torch.tensor([-3.0, -0.5, -7.75])


@pytest.fixture(autouse=True)
def rank0(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)


def saved(tmp_path, chosen=CHOSEN, rejected=REJECTED):
    path = ref_logps.cache_path("data", "tok", "ref", tmp_path / "cache")
    ref_logps.save(path, chosen, rejected, {"reference": "output/step1_sft"})
    return path


def test_round_trip_keeps_values_order_and_meta(tmp_path):
    path = saved(tmp_path, CHOSEN.to(torch.bfloat16), REJECTED.double())  # stored as float32 whatever comes in
    got = ref_logps.load(path)
    assert got is not None and sorted(got) == ["chosen", "rejected"]
    assert got["chosen"].dtype == got["rejected"].dtype == torch.float32
    assert torch.equal(got["chosen"], CHOSEN) and torch.equal(got["rejected"], REJECTED)  # all exact in bf16
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["reference"] == "output/step1_sft" and meta["num_rows"] == "3"
    assert ref_logps.load(path, num_rows=3) is not None
    assert ref_logps.load(path, num_rows=4) is None  # another split: recompute
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_key_changes_with_data_tokenizer_and_reference(tmp_path):
    base = ref_logps.cache_path("d", "t", "r", tmp_path)
    assert ref_logps.cache_path("d", "t", "r", str(tmp_path)) == base  # stable
    others = {ref_logps.cache_path("d2", "t", "r", tmp_path), ref_logps.cache_path("d", "t2", "r", tmp_path),
              ref_logps.cache_path("d", "t", "r2", tmp_path)}
    assert len(others) == 3 and base not in others
    assert base.parent == tmp_path and base.suffix == ".safetensors"
    with pytest.raises(ValueError, match="reference"):
        ref_logps.cache_path("d", "t", "", tmp_path)


def test_model_fingerprint_follows_config_and_weights_only(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    first = ref_logps.fingerprint_model_folder(folder)
    assert ref_logps.fingerprint_model_folder(str(folder)) == first
    (folder / "README.md").write_text("notes")  # not part of the model
    assert ref_logps.fingerprint_model_folder(folder) == first
    (folder / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 63)  # same size, other weights
    second = ref_logps.fingerprint_model_folder(folder)
    assert second != first
    (folder / "config.json").write_text(json.dumps({"hidden_size": 16}))
    assert ref_logps.fingerprint_model_folder(folder) not in (first, second)


def test_large_model_folders_are_keyed_by_size_and_mtime_not_read(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    monkeypatch.setattr(ref_logps, "HASH_LIMIT", 16)  # this folder now counts as large
    first = ref_logps.fingerprint_model_folder(folder)
    os.utime(weights, ns=(1, 1))
    assert ref_logps.fingerprint_model_folder(folder) != first


def test_model_fingerprint_bad_input(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        ref_logps.fingerprint_model_folder(tmp_path)
    with pytest.raises(UserError, match="neither a folder nor in the Hugging Face cache"):
        ref_logps.fingerprint_model_folder(str(tmp_path / "missing" / "deeper" / "model"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_a_damaged_file_is_absent_not_half_read(tmp_path, damage):
    path = saved(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-5])
    elif damage == "flip":  # a bit of the last value: only the checksum can tell
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"not a safetensors file at all")
    assert ref_logps.load(path) is None
    assert ref_logps.load(tmp_path / "absent.safetensors") is None


def test_another_format_is_not_taken_for_a_cache(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"chosen": CHOSEN, "rejected": REJECTED}, str(path))  # no header of ours
    assert ref_logps.load(path) is None


def test_save_refuses_mismatched_vectors_and_non_string_meta(tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(ValueError, match="one length"):
        ref_logps.save(path, CHOSEN, REJECTED[:2], {})
    with pytest.raises(TypeError, match="strings"):
        ref_logps.save(path, CHOSEN, REJECTED, {"rows": 3})
    assert not path.exists()


def test_an_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--data_output_path"):
        ref_logps.save(blocker / "sub" / "c.safetensors", CHOSEN, REJECTED, {})


def test_only_rank_0_writes(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    monkeypatch.setenv("RANK", "1")
    ref_logps.save(path, CHOSEN, REJECTED, {})
    assert not path.exists()
    monkeypatch.setenv("RANK", "0")
    ref_logps.save(path, CHOSEN, REJECTED, {})
    assert ref_logps.load(path) is not None


def _rank_main(rank: int, store: str, path: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # Each rank passes its own values: the file must hold rank 0's, written once.
        ref_logps.save(path, CHOSEN + rank, REJECTED + rank, {"rank": str(rank)})
        torch.distributed.barrier()
        got = ref_logps.load(path)
        queue.put((rank, None if got is None else got["chosen"].tolist()))
    finally:
        torch.distributed.destroy_process_group()


def test_concurrent_ranks_all_read_rank_0s_file(tmp_path):
    path = tmp_path / "cache" / "c.safetensors"
    ctx = multiprocessing.get_context("fork")  # no re-import of torch: well under a second
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "store"), str(path), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == {0: CHOSEN.tolist(), 1: CHOSEN.tolist()}
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["rank"] == "0"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
