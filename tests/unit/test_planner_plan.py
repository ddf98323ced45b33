"""The planner's activation, KV-cache and phase arithmetic (hand-worked), its search and its CLI."""
from __future__ import annotations

import dataclasses
import json
import shlex

import pytest

from engine.config import Step3Config
from engine.errors import UserError
from engine.flags import parse_config
from engine.planner.__main__ import main as planner_main
from engine.planner.activations import kv_cache_bytes, layer_saved_bytes, logits_bytes, training_activation_bytes
from engine.planner.plan import GiB, Hardware, Knobs, Workload, predict, role_states, search
from engine.planner.shapes import ModelShape, load_config, model_shape_of
from engine.planner.step3 import knobs_from_step3

# h 8, kv 8, I 16, 2 layers, vocab 10; 4 Linear targets of (8, 8) for LoRA arithmetic.
TOY = ModelShape(params=1000, largest_layer_params=80, lora_targets=((8, 8),) * 4, num_layers=2, hidden_size=8,
                 vocab_size=10, kv_width=8, intermediate_size=16, gated_mlp=True, rms_norm=True)


@pytest.fixture(scope="module")
def llama7b() -> tuple[ModelShape, ModelShape]:
    config = load_config("llama-2-7b")
    return model_shape_of(config), model_shape_of(config, sequence_classification=True)


def test_kv_cache_of_llama_2_7b(llama7b):
    # 2 (k, v) x 32 layers x 4096 wide x 512 positions x 2 bytes = 256 MiB per sequence
    assert kv_cache_bytes(llama7b[0], "bf16", 1, 512) == 2 * 32 * 4096 * 512 * 2 == GiB / 4


def test_layer_saved_bytes_by_hand():
    # bf16 RMSNorm: fp32 input (4h) + normalised (2h) = 48, twice; attention (4h + 2kv) x 2 = 96;
    # gated MLP (h + 4I) x 2 = 144.
    assert layer_saved_bytes(TOY, "bf16") == 2 * 48 + 96 + 144
    # fp32: the norm's fp32 input is the input itself: 2 x 4h = 64 per norm
    assert layer_saved_bytes(TOY, "fp32") == 2 * 64 + 192 + 288
    plain = dataclasses.replace(TOY, gated_mlp=False, rms_norm=False)  # OPT-like: LayerNorm, fc1 -> act -> fc2
    assert layer_saved_bytes(plain, "bf16") == 2 * 16 + 96 + (8 + 32) * 2


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    full = training_activation_bytes(TOY, "bf16", 3, 5, gradient_checkpointing=False)
    ckpt = training_activation_bytes(TOY, "bf16", 3, 5, gradient_checkpointing=True)
    # without: 2 layers saved; with: 2 layer inputs (2h bytes each) and one layer saved
    assert full - ckpt == 3 * 5 * (2 * layer_saved_bytes(TOY, "bf16") - (2 * 2 * 8 + layer_saved_bytes(TOY, "bf16")))


def test_logits_bytes_by_phase():
    assert logits_bytes(TOY, "bf16", 2, 3, "score") == 2 * 3 * 10 * (2 + 8)
    assert logits_bytes(TOY, "fp32", 2, 3, "train") == 2 * 3 * 10 * (4 + 16)
    assert logits_bytes(TOY, "bf16", 2, 3, "generate") == 2 * 10 * 16  # last position only
    with pytest.raises(ValueError):
        logits_bytes(TOY, "bf16", 1, 1, "eval")


def test_chunked_logits_bytes_are_one_chunk():
    # chunks of 2 positions of 3: the score and train terms for 2 tokens; generate is one position anyway
    assert logits_bytes(TOY, "bf16", 2, 3, "score", chunk_size=2) == 2 * 2 * 10 * (2 + 8)
    assert logits_bytes(TOY, "fp32", 2, 3, "train", chunk_size=2) == 2 * 2 * 10 * (4 + 16)
    assert logits_bytes(TOY, "bf16", 2, 3, "generate", chunk_size=2) == 2 * 10 * 16
    # a chunk longer than the sequence holds the whole sequence; automatic (None) on a 10-token vocabulary
    # fits every position in 128 MiB
    assert logits_bytes(TOY, "bf16", 2, 3, "score", chunk_size=5) == logits_bytes(TOY, "bf16", 2, 3, "score")
    assert logits_bytes(TOY, "fp32", 2, 3, "train", chunk_size=None) == 2 * 3 * 10 * (4 + 16)
    # a 128k vocabulary, 8 rows of 1024 tokens: automatic chunks of 128 MiB / (4 * 8 * 131072) = 32 positions
    big = dataclasses.replace(TOY, vocab_size=131072)
    assert logits_bytes(big, "bf16", 8, 1024, "train", chunk_size=None) == 8 * 32 * 131072 * (2 + 16)


def _phases(work: Workload, **knobs) -> dict[str, float]:
    return predict(work, Knobs(**knobs)).peak_gb()


def test_phase_invariants(llama7b):
    actor, critic = llama7b
    work = Workload(actor, critic, 256, 256)
    base = _phases(work, actor_lora_dim=8, critic_lora_dim=8, only_optimize_lora=True)
    # gradients exist in the training phases only
    pred = predict(work, Knobs())
    assert not any(k.endswith("gradients") for k in pred.phases["generate"])
    assert any(k.endswith("gradients") for k in pred.phases["actor_train"])
    # a longer answer grows the generation peak by the KV cache of the extra positions, at least
    longer = _phases(dataclasses.replace(work, max_answer_seq_len=512), actor_lora_dim=8, critic_lora_dim=8,
                     only_optimize_lora=True)
    assert longer["generate"] - base["generate"] >= kv_cache_bytes(actor, "bf16", 16, 256) / GiB
    # a 4-bit reference lowers every phase by the same amount, 3.5 to 4x less than bf16's parameter bytes
    q = _phases(work, actor_lora_dim=8, critic_lora_dim=8, only_optimize_lora=True, reference_quantization="4bit")
    drops = {p: base[p] - q[p] for p in base}
    assert max(drops.values()) - min(drops.values()) < 1e-9
    assert 2 * actor.params * (1 - 1 / 3.5) / GiB > drops["generate"] > 2 * actor.params * (1 - 1 / 4) / GiB * 0.9
    # the hybrid mode at ZeRO-3 on 8 ranks gathers 7/8 of the actor, in the generation phase only
    work8 = dataclasses.replace(work, world_size=8)
    off = _phases(work8, actor_zero_stage=3, critic_zero_stage=3)
    on = _phases(work8, actor_zero_stage=3, critic_zero_stage=3, enable_hybrid_engine=True)
    assert on["generate"] - off["generate"] == pytest.approx(2 * actor.params * 7 / 8 / GiB)
    assert on["actor_train"] == off["actor_train"]


@pytest.mark.parametrize("gpus, memory, expect", [(1, 80, "lora"), (8, 80, "zero3"), (1, 24, "offload_or_quant")])
def test_search_7b(llama7b, gpus, memory, expect):
    work = Workload(*llama7b, 256, 256, gpus)
    hw = Hardware(gpus, memory, 256 * gpus)
    best, _ = search(work, hw, Knobs(), {})
    assert best is not None and best.fits(hw)
    k = best.knobs
    assert max(best.prediction.peak_gb().values()) <= 0.9 * memory
    if expect == "lora":  # full fine-tuning of two 7B models needs 16 bytes/param x 13B: offload or LoRA
        assert k.actor_lora_dim > 0 and not k.offload
    elif expect == "zero3":
        assert k.actor_zero_stage == 3 and k.actor_lora_dim == 0 and not k.offload
    else:
        assert k.offload or k.reference_quantization != "none" or k.actor_quantization != "none"


def test_search_keeps_fixed_flags_and_reports_the_gap(llama7b):
    work = Workload(*llama7b, 256, 256, 1)
    best, _ = search(work, Hardware(1, 80, 256), Knobs(), {"actor_zero_stage": 2, "critic_zero_stage": 2})
    assert (best.knobs.actor_zero_stage, best.knobs.critic_zero_stage) == (2, 2)
    best, closest = search(work, Hardware(1, 8, 64), Knobs(), {"offload": False})
    assert best is None and not closest.knobs.offload
    assert max(closest.prediction.peak_gb().values()) > 8 * 0.9


def test_cli_json_and_flags_that_step3_accepts(capsys):
    planner_main(["--actor_model", "llama-2-7b", "--critic_model", "llama-2-7b", "--num_gpus", "1",
                  "--gpu_memory_gb", "80", "--max_prompt_seq_len", "256", "--max_answer_seq_len", "256", "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert answer["fits"] is True
    assert set(answer["peak_gb"]) == {"generate", "experience", "actor_train", "critic_train"}
    assert max(answer["peak_gb"].values()) <= 72
    # the flags parse and validate as step-3 flags, and mean what the planner planned
    cfg = parse_config(Step3Config, shlex.split(answer["flags"]))
    again = predict(Workload(*[model_shape_of(load_config("llama-2-7b"), sequence_classification=s)
                               for s in (False, True)], 256, 256), knobs_from_step3(cfg))
    assert again.peak_gb() == pytest.approx(answer["peak_gb"], abs=0.01)


def test_cli_when_nothing_fits(capsys):
    with pytest.raises(SystemExit) as exit_:
        planner_main(["--actor_model", "opt-66b", "--num_gpus", "1", "--gpu_memory_gb", "24", "--offload", "false"])
    assert exit_.value.code == 1
    text = capsys.readouterr().out
    assert "does not fit: needs" in text and "GiB more per GPU" in text and "add GPUs" in text


def test_cli_bad_input():
    with pytest.raises(UserError, match="neither a shipped model config"):
        planner_main(["--actor_model", "llama-9b"])
    with pytest.raises(UserError, match="do not go together"):
        planner_main(["--actor_model", "opt-1.3b", "--actor_quantization", "4bit"])


def test_auto_fit_keeps_set_flags_and_fills_the_rest():
    from engine.planner.step3 import auto_fit

    config = load_config("llama-2-7b")
    cfg = parse_config(Step3Config, ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c",
                                     "--max_prompt_seq_len", "256", "--max_answer_seq_len", "256",
                                     "--actor_zero_stage", "2", "--per_device_generation_batch_size", "12",
                                     "--per_device_training_batch_size", "4"])
    fitted, message = auto_fit(cfg, Hardware(1, 80, 256), config, config)
    assert fitted.ds.actor_zero_stage == 2                       # set by the user: kept
    assert fitted.lora.actor_lora_dim > 0                        # two 7B models train fully only with offload
    gen, train = fitted.train.per_device_generation_batch_size, fitted.train.per_device_training_batch_size
    assert gen <= 12 and train <= 4 and gen % train == 0        # upper bounds; micro-batches divide a batch
    assert "--auto_fit chose" in message
    with pytest.raises(UserError, match="nothing fits 1 x 8 GiB.*GiB more per GPU"):
        auto_fit(cfg, Hardware(1, 8, 64), config, config)


@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_auto_fit_keeps_explicit_flags_equal_to_their_defaults(tmp_path, where):
    """A flag the user gave is kept even when its value is the default: 2 x 48 GiB for two 7B models
    makes the planner pick ZeRO-3 and gradient checkpointing for the actor unless told otherwise."""
    from engine.planner.step3 import auto_fit

    config = load_config("llama-2-7b")
    common = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--max_prompt_seq_len", "256",
              "--max_answer_seq_len", "256", "--per_device_generation_batch_size", "12",
              "--per_device_training_batch_size", "4", "--logprob_chunk_size", "0"]  # full logits: the tight case
    free, _ = auto_fit(parse_config(Step3Config, common), Hardware(2, 48, 256), config, config)
    assert free.ds.actor_zero_stage == 3 and free.ds.actor_gradient_checkpointing  # what the planner would choose
    if where == "yaml":
        path = tmp_path / "step3.yaml"
        path.write_text("ds:\n  actor_zero_stage: 0\n  actor_gradient_checkpointing: false\n")
        explicit = ["--config", str(path)]
    else:
        explicit = ["--actor_zero_stage", "0", "--no-actor_gradient_checkpointing"]
    cfg = parse_config(Step3Config, common + explicit)
    assert {"actor_zero_stage", "actor_gradient_checkpointing"} <= cfg.given
    assert (cfg.ds.actor_zero_stage, cfg.ds.actor_gradient_checkpointing) == (0, False)  # the defaults
    fitted, message = auto_fit(cfg, Hardware(2, 48, 256), config, config)
    assert (fitted.ds.actor_zero_stage, fitted.ds.actor_gradient_checkpointing) == (0, False)  # kept
    assert fitted.ds.critic_zero_stage == 3 and "--actor_zero_stage" not in message  # the rest is still chosen
def test_the_planner_names_the_roles_as_the_engine_does(llama7b):
    from dataclasses import fields

    from engine.models.roles import ROLE_NAMES, Roles

    states = role_states(Workload(*llama7b, 256, 256, 1), Knobs(enable_ema=True))
    assert tuple(r for r in states if r != "workspace") == ROLE_NAMES  # + ZeRO's buffers shared by the roles
    assert set(ROLE_NAMES) <= {f.name for f in fields(Roles)}
