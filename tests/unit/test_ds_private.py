"""engine/runtime/ds_private.py against the installed DeepSpeed: real 1-rank ZeRO engines on CPU (gloo) where
CPU can show the behaviour, the names on DeepSpeed's own classes where it cannot (fp16 ZeRO-3, MixZ++), and
fakes for the --align_overflow decisions. An upgrade that renames or changes one of them fails here.

The real engines run in one subprocess (`probe` below, this file run as a script), so no process group
outlives it in the test process; its findings come back as JSON.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.runtime import ds_private

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# every function records the version it was verified on, and it is the installed one
# ----------------------------------------------------------------------------------------------
def test_every_function_names_the_version_it_was_verified_on():
    import deepspeed

    assert deepspeed.__version__ == ds_private.VERIFIED_ON, (
        f"DeepSpeed {deepspeed.__version__} is installed, ds_private was verified on {ds_private.VERIFIED_ON}: "
        "run these tests, re-check each function and update VERIFIED_ON and the docstrings")
    public = [f for name, f in vars(ds_private).items()
              if not name.startswith("_") and callable(f) and getattr(f, "__module__", "") == ds_private.__name__]
    assert len(public) >= 14
    for f in public:
        assert "0.19.8" in (f.__doc__ or ""), f"{f.__name__} does not say which DeepSpeed it was verified on"


# ----------------------------------------------------------------------------------------------
# the op-build hook (engine/runtime/op_builds.py)
# ----------------------------------------------------------------------------------------------
def test_every_jit_build_passes_the_ops_name_to_torchs_loader_as_its_folder():
    from deepspeed.ops.op_builder.builder import OpBuilder

    jit_load = getattr(OpBuilder.jit_load, "engine_original", OpBuilder.jit_load)
    assert "load(name=self.name," in inspect.getsource(jit_load)  # $TORCH_EXTENSIONS_DIR/<name>/lock
    assert "self.jit_load(" in inspect.getsource(OpBuilder.load)


def test_hook_op_builds_calls_before_ahead_of_the_build_once(monkeypatch):
    from deepspeed.ops.op_builder.builder import OpBuilder

    calls = []
    monkeypatch.setattr(OpBuilder, "jit_load", lambda self, verbose=True: calls.append(("build", self.name)))
    before = lambda name: calls.append(("before", name))  # noqa: E731
    ds_private.hook_op_builds(before)
    ds_private.hook_op_builds(before)  # idempotent: not wrapped twice
    OpBuilder.jit_load(SimpleNamespace(name="cpu_adam"))
    assert calls == [("before", "cpu_adam"), ("build", "cpu_adam")]


# ----------------------------------------------------------------------------------------------
# names on DeepSpeed's classes (what CPU cannot run)
# ----------------------------------------------------------------------------------------------
def test_the_zero_optimizers_have_the_private_methods_we_call():
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        source = inspect.getsource(cls)  # stage 3 wraps its methods (nvtx), hiding their signatures
        assert "def has_overflow(self, partition_gradients" in source
        assert isinstance(inspect.getattr_static(cls, "loss_scale"), property)
        # `step` asks `self.has_overflow` (through check_overflow), which `skipped_step` shadows.
        assert "self.has_overflow(" in inspect.getsource(cls._check_overflow)
    assert callable(DeepSpeedZeroOptimizer_Stage3.quantize_nontrainable_params)
    assert "self.checkpoint_engine.load(" in inspect.getsource(DeepSpeedEngine)
    ds_private.deepspeed_safe_globals()  # the private module paths of the types import


def test_universal_loading_switches_the_setting_the_engine_reads_when_it_loads(monkeypatch):
    """`load_universal_checkpoint()` reads `_config.load_universal_checkpoint` at call time (set only in the
    block), and the converter and universal loaders call `torch.load` through the module attribute, which
    `safe_torch_load` replaces with a weights_only load."""
    from deepspeed.checkpoint import ds_to_universal, universal_checkpoint
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import stage3

    assert "self._config.load_universal_checkpoint" in inspect.getsource(DeepSpeedEngine.load_universal_checkpoint)
    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=False))
    with ds_private.universal_loading(engine):
        assert DeepSpeedEngine.load_universal_checkpoint(engine) is True
        assert torch.load is not ds_private.torch.serialization.load
    assert DeepSpeedEngine.load_universal_checkpoint(engine) is False
    for module in (ds_to_universal, universal_checkpoint, stage3):
        assert "torch.load(" in inspect.getsource(module), module.__name__
    seen = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k["weights_only"]))
    with ds_private.safe_torch_load():
        torch.load("x", weights_only=False)
    assert seen == [True]


# ----------------------------------------------------------------------------------------------
# --align_overflow on fakes: which engine is made to skip
# ----------------------------------------------------------------------------------------------
class FakeOptimizer:
    """A ZeRO optimizer as `step_together` sees it: `step` consults `has_overflow` like DeepSpeed's."""

    def __init__(self, overflow: bool):
        self.overflow, self.partition_gradients, self.asked_with, self.updates = overflow, False, [], 0

    def has_overflow(self, partition_gradients: bool = True) -> bool:
        self.asked_with.append(partition_gradients)
        return self.overflow

    def step(self) -> None:
        if not self.has_overflow(self.partition_gradients):
            self.updates += 1


def fake_engine(overflow: bool) -> SimpleNamespace:
    optimizer = FakeOptimizer(overflow)
    return SimpleNamespace(optimizer=optimizer, step=optimizer.step)


@pytest.mark.parametrize("actor_over, critic_over", [(False, False), (True, False), (False, True), (True, True)])
def test_step_together_skips_both_when_either_overflowed(actor_over, critic_over):
    actor, critic = fake_engine(actor_over), fake_engine(critic_over)
    assert ds_private.step_together(actor, critic) == (actor_over, critic_over)
    both = not (actor_over or critic_over)
    assert (actor.optimizer.updates, critic.optimizer.updates) == (int(both), int(both))
    assert actor.optimizer.asked_with[0] is False  # the optimizer's own partition_gradients is passed
    # the shadow is gone afterwards: the next step is the optimizer's own decision again
    actor.optimizer.overflow = critic.optimizer.overflow = False
    actor.step()
    critic.step()
    assert (actor.optimizer.updates, critic.optimizer.updates) == (int(both) + 1, int(both) + 1)


def test_skipped_step_restores_an_instance_attribute_too():
    optimizer = SimpleNamespace(has_overflow=lambda *a: False)
    own = optimizer.has_overflow
    with ds_private.skipped_step(SimpleNamespace(optimizer=optimizer)):
        assert optimizer.has_overflow(True) is True
    assert optimizer.has_overflow is own


def test_the_trainer_steps_through_step_together(monkeypatch):
    from engine.ppo import trainer

    calls = []
    monkeypatch.setattr(trainer, "step_together", lambda a, c: calls.append((a, c)) or (True, False))
    roles = SimpleNamespace(actor="actor", critic="critic")
    trainer.PPOTrainer._aligned_steps(SimpleNamespace(roles=roles))
    assert calls == [("actor", "critic")]


def test_plain_parameters_read_as_themselves():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    assert ds_private.full_numel(p) == 6 and ds_private.full_shape(p) == (3, 2)
    assert ds_private.partition(p) is None and ds_private.persistent(p) is False
    assert ds_private.inner_optimizer(SimpleNamespace(optimizer=None)) is None


def test_shadow_step_wraps_and_undoes():
    obj = FakeOptimizer(False)
    seen = []
    undo = ds_private.shadow_step(obj, lambda step: lambda: seen.append("wrapped") or step())
    obj.step()
    assert seen == ["wrapped"] and obj.updates == 1
    undo()
    obj.step()
    assert seen == ["wrapped"] and obj.updates == 2 and "step" not in vars(obj)


# ----------------------------------------------------------------------------------------------
# real ZeRO engines on CPU
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_zero3_parameter_attributes(real):
    z3 = real["zero3"]
    assert z3["numel_while_partitioned"] == 0  # why the full count must come from ds_numel
    assert z3["full_numel"] == z3["true_numel"] and z3["full_shape"] == [64, 32]
    assert z3["partition_numel"] == z3["true_numel"]  # one rank holds the whole partition
    assert z3["persistent_small"] is True and z3["persistent_big"] is False


def test_gathered_scratch_drops_in_place_changes(real):
    assert real["zero3"]["scratch_change_dropped"] is True


def test_gathered_scratch_leaves_resident_parameters_resident(real):
    z3 = real["zero3"]
    assert z3["small_resident_before_a_forward"] is False and z3["small_resident_after_a_forward"] is True
    assert z3["small_resident_after_scratch"] is True  # DeepSpeed's own exit would have released it
    assert z3["big_resident_after_scratch"] is False


def test_persistent_parameters_are_gathered_in_one_call_after_a_step(real):
    gather = real["persistent_gather"]
    assert gather["covered"] == 3  # the first Linear's bias, the second's weight and bias
    assert gather["coalesced_calls"] == 1 and gather["status_after_step"] == ["AVAILABLE"] * 3
    assert gather["equal_to_torch_adamw"] is True  # the updated values, not the stale ones (lr 0.1)
    assert gather["stale_would_differ"] is True


def test_skipped_step_makes_a_real_zero2_engine_skip(real):
    z2 = real["zero2"]
    assert z2["changed_by_a_normal_step"] is True
    assert z2["changed_by_a_skipped_step"] is False and z2["skipped_steps"] == 1
    assert z2["has_overflow"] is False and z2["has_overflow_after_inf"] is True


def test_loss_scale_and_inner_optimizer_of_a_real_engine(real):
    z2 = real["zero2"]
    assert z2["loss_scale"] == 1.0 and z2["inner_optimizer"] == "AdamW"
    assert z2["inner_steps_seen_by_shadow"] == 1 and z2["engine_steps_seen_by_shadow"] == 1


def test_safe_checkpoint_loading_reads_a_real_checkpoint(real):
    z2 = real["zero2"]
    assert z2["safe_loads"] > 0 and z2["resumed_equal"] is True and z2["proxy_removed"] is True


# ----------------------------------------------------------------------------------------------
# the probe (runs in the subprocess)
# ----------------------------------------------------------------------------------------------
def _engine(stage: int, model: torch.nn.Module, bf16_overflow_check: bool = False):
    from engine.runtime.ds_config import train_ds_config
    from engine.runtime.engines import deepspeed_initialize

    config = train_ds_config(zero_stage=stage, offload=False, dtype="bf16" if bf16_overflow_check else "fp32",
                             micro_batch_size=1, gradient_accumulation_steps=1, world_size=1)
    if bf16_overflow_check:
        config["bf16"]["check_grad_overflow"] = True  # so a ZeRO-2 step consults has_overflow on CPU
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 100
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return deepspeed_initialize(model, optimizer, None, config)


def _backward(engine, inf: bool = False) -> None:
    x = torch.ones(2, 32, dtype=next(engine.module.parameters()).dtype)
    loss = engine(x).float().sum() * (float("inf") if inf else 1.0)
    engine.backward(loss)


def _probe_zero3() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(64, 4))
    engine = _engine(3, model)
    big, small = engine.module[0].weight, engine.module[1].bias
    out = {"numel_while_partitioned": big.numel(), "full_numel": ds_private.full_numel(big), "true_numel": 64 * 32,
           "full_shape": list(ds_private.full_shape(big)), "partition_numel": ds_private.partition(big).numel(),
           "persistent_small": ds_private.persistent(small), "persistent_big": ds_private.persistent(big)}
    with ds_private.gathered_scratch([big]):
        before = big.data.clone()
        big.data.add_(1.0)
    with ds_private.gathered_scratch([big]):
        out["scratch_change_dropped"] = bool(torch.equal(big.data, before))
    out["small_resident_before_a_forward"] = ds_private.resident(small)
    with torch.no_grad():  # the first forward records ZeRO-3's trace; from the second the persistent bias stays
        engine(torch.ones(2, 32))
        engine(torch.ones(2, 32))
    out["small_resident_after_a_forward"] = ds_private.resident(small)
    with ds_private.gathered_scratch([big, small]):
        pass
    out["small_resident_after_scratch"] = ds_private.resident(small)
    out["big_resident_after_scratch"] = ds_private.resident(big)
    return out


def _probe_persistent_gather() -> dict:
    """One ZeRO-3 step (1 rank, fp32) of a model with three persistent parameters, against torch's AdamW."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 1))
    twin = copy.deepcopy(model)
    engine = _engine(3, model)
    persistent = [p for p in engine.module.parameters() if ds_private.persistent(p)]
    first = engine.optimizer.persistent_parameters[0]
    calls = []
    coalesced = first.all_gather_coalesced
    first.all_gather_coalesced = lambda params, *a, **k: calls.append(len(params)) or coalesced(params, *a, **k)
    _backward(engine)
    engine.step()
    out = {"covered": len(persistent) if "coalesce_persistent_gather" in first.all_gather.__qualname__ else 0,
           "coalesced_calls": len(calls), "status_after_step": [p.ds_status.name for p in persistent]}
    before = [p.detach().clone() for p in twin.parameters() if p.numel() <= 100]
    optimizer = torch.optim.AdamW(twin.parameters(), lr=0.1)
    twin(torch.ones(2, 32)).float().sum().backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)  # train_ds_config's default gradient_clipping
    optimizer.step()
    expected = [p for p in twin.parameters() if p.numel() <= 100]
    out["equal_to_torch_adamw"] = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(persistent, expected))
    out["stale_would_differ"] = not any(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, expected))
    return out


def _probe_zero2(folder: Path) -> dict:
    torch.manual_seed(0)
    engine = _engine(2, torch.nn.Linear(32, 4), bf16_overflow_check=True)
    weight = lambda: engine.module.weight.detach().float().clone()  # noqa: E731
    counts = {"inner": 0, "engine": 0}

    def counting(key):
        return lambda step: lambda *a, **k: counts.__setitem__(key, counts[key] + 1) or step(*a, **k)

    undo = [ds_private.shadow_step(ds_private.inner_optimizer(engine), counting("inner")),
            ds_private.shadow_step(engine, counting("engine"))]
    out = {"loss_scale": ds_private.loss_scale(engine),
           "inner_optimizer": type(ds_private.inner_optimizer(engine)).__name__}
    start = weight()
    _backward(engine)
    out["has_overflow"] = ds_private.has_overflow(engine)
    engine.step()
    out["changed_by_a_normal_step"] = not torch.equal(weight(), start)
    for u in undo:
        u()
    out["inner_steps_seen_by_shadow"], out["engine_steps_seen_by_shadow"] = counts["inner"], counts["engine"]
    middle = weight()
    _backward(engine)
    with ds_private.skipped_step(engine):
        engine.step()
    out["changed_by_a_skipped_step"] = not torch.equal(weight(), middle)
    out["skipped_steps"] = engine.skipped_steps
    _backward(engine, inf=True)
    out["has_overflow_after_inf"] = ds_private.has_overflow(engine)
    engine.step()  # skipped by DeepSpeed itself

    engine.save_checkpoint(str(folder), tag="t")
    saved = weight()
    with torch.no_grad():
        engine.module.weight.add_(1.0)
    real_load = type(engine.checkpoint_engine).load
    loads = []
    type(engine.checkpoint_engine).load = lambda self, *a, **k: loads.append(1) or real_load(self, *a, **k)
    safe_loads = []
    real_safe = ds_private.SafeCheckpointEngine.load
    ds_private.SafeCheckpointEngine.load = lambda self, *a, **k: safe_loads.append(1) or real_safe(self, *a, **k)
    with ds_private.safe_checkpoint_loading(engine):
        engine.load_checkpoint(str(folder), tag="t")
    out["safe_loads"], out["unsafe_loads"] = len(safe_loads), len(loads)
    out["resumed_equal"] = bool(torch.equal(weight(), saved))
    out["proxy_removed"] = not isinstance(engine.checkpoint_engine, ds_private.SafeCheckpointEngine)
    return out


def probe() -> None:
    import tempfile

    from engine.runtime.distributed import init_distributed

    init_distributed(0)
    with tempfile.TemporaryDirectory() as folder:
        result = {"zero3": _probe_zero3(), "persistent_gather": _probe_persistent_gather(),
                  "zero2": _probe_zero2(Path(folder))}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    probe()
