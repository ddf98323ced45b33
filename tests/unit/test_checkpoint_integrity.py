"""Checkpoint integrity: the seal, the fall-back to the previous good checkpoint, another world size (logged),
--save_total_limit, and DeepSpeed's pickles read without running code. Files are made by hand here; the
smoke and distributed tests resume real runs after a kill -9."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from engine.errors import UserError
from engine.runtime.checkpoint import (
    DS_CHECKPOINT_DIR,
    MANIFEST,
    _seal,
    checkpoint_problem,
    find_resume_checkpoint,
    prune_checkpoints,
)
from engine.runtime.ds_private import SafeCheckpointEngine


def _fake_checkpoint(out: Path, step: int, world_size: int = 1, roles: tuple[str, ...] = ("actor", "critic"),
                     sealed: bool = True) -> Path:
    """ds_checkpoint/<role>/step<N>/ files, the tag folder with RNG files, a checkpoint-<N>/ folder."""
    folder, tag = out / DS_CHECKPOINT_DIR, f"step{step}"
    for role in roles:
        (folder / role / tag).mkdir(parents=True)
        (folder / role / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * (100 + step))
    (folder / tag).mkdir(parents=True, exist_ok=True)
    for rank in range(world_size):
        (folder / tag / f"rng_rank{rank}.safetensors").write_bytes(b"r" * 10)
    (out / f"checkpoint-{step}").mkdir()
    (out / f"checkpoint-{step}" / "config.json").write_text("{}")
    if sealed:
        _seal(folder, tag, list(roles), world_size)
    return folder / tag


def test_seal_lists_every_file_with_its_size(tmp_path):
    tag = _fake_checkpoint(tmp_path, 4)
    manifest = json.loads((tag / MANIFEST).read_text())
    assert manifest["world_size"] == 1 and manifest["roles"] == ["actor", "critic"]
    assert manifest["files"] == {"actor/step4/mp_rank_00_model_states.pt": 104,
                                 "critic/step4/mp_rank_00_model_states.pt": 104,
                                 "step4/rng_rank0.safetensors": 10}
    assert checkpoint_problem(tmp_path / DS_CHECKPOINT_DIR, "step4") is None


def test_unsealed_truncated_and_missing_files_are_each_named(tmp_path):
    folder = tmp_path / DS_CHECKPOINT_DIR
    _fake_checkpoint(tmp_path, 2, sealed=False)
    assert checkpoint_problem(folder, "step2") == "not sealed (the save was interrupted)"
    tag = _fake_checkpoint(tmp_path, 4)
    model = folder / "critic" / "step4" / "mp_rank_00_model_states.pt"
    model.write_bytes(b"x" * 50)
    assert checkpoint_problem(folder, "step4") == f"{model} is 50 bytes, 104 when saved (truncated?)"
    model.unlink()
    assert checkpoint_problem(folder, "step4") == f"{model} is missing"
    (tag / MANIFEST).write_text('{"files": ')
    assert checkpoint_problem(folder, "step4") == f"{tag / MANIFEST} is damaged"


def test_resume_takes_the_newest_complete_checkpoint_and_warns_about_the_others(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 10)  # newer by number, not by name ("step10" < "step4" as text)
    _fake_checkpoint(tmp_path, 12, sealed=False)
    (tmp_path / DS_CHECKPOINT_DIR / "step10" / "rng_rank0.safetensors").write_bytes(b"r")
    with caplog.at_level("WARNING", logger="engine"):
        assert find_resume_checkpoint(tmp_path, world_size=1) == tmp_path / DS_CHECKPOINT_DIR / "step2"
    assert "skipping checkpoint step12: not sealed" in caplog.text
    assert "skipping checkpoint step10:" in caplog.text and "truncated" in caplog.text


def test_no_complete_checkpoint_and_no_checkpoint_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in .*set --save_interval"):
        find_resume_checkpoint(tmp_path, world_size=1)
    _fake_checkpoint(tmp_path, 3, sealed=False)
    with pytest.raises(UserError, match=r"no complete checkpoint .*step3: not sealed.*run without --resume"):
        find_resume_checkpoint(tmp_path, world_size=1)


def test_other_world_size_is_resumed_elastically_and_logged(tmp_path, caplog):
    """Another rank count is no longer refused (engine.runtime.universal converts the checkpoint when it loads);
    find_resume_checkpoint says so once, naming both counts."""
    _fake_checkpoint(tmp_path, 4, world_size=2)
    with caplog.at_level("INFO", logger="engine"):
        assert find_resume_checkpoint(tmp_path, world_size=4).name == "step4"
    assert "written by 2 ranks, this run has 4: elastic resume" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="engine"):
        assert find_resume_checkpoint(tmp_path, world_size=2).name == "step4"
    assert "elastic" not in caplog.text


def test_save_total_limit_keeps_the_newest_and_drops_interrupted_leftovers(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 5, sealed=False)   # a save killed earlier: garbage once 6 is complete
    _fake_checkpoint(tmp_path, 8, sealed=False)   # newer than every complete one: left alone
    prune_checkpoints(tmp_path, keep=2)
    folder = tmp_path / DS_CHECKPOINT_DIR
    assert sorted(p.name for p in folder.glob("step*")) == ["step4", "step6", "step8"]
    for role in ("actor", "critic"):
        assert sorted(p.name for p in (folder / role).iterdir()) == ["step4", "step6", "step8"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert not list(tmp_path.rglob(".deleting-*"))


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_deepspeed_files_load_without_running_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3}, good)
    engine = SafeCheckpointEngine(inner=object())
    assert torch.equal(engine.load(str(good))["module"]["w"], torch.ones(2))
    evil = tmp_path / "evil.pt"
    torch.save({"module": {}, "payload": _Boom()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(evil))
    assert not (tmp_path / "pwned").exists()
