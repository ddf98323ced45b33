"""LoRA targets, trainable parameters and optimizer groups (engine.models.lora); fusing LoRA for a save and
publishing a Hugging Face folder atomically (engine.runtime.atomic). Tiny in-process models, CPU."""
from __future__ import annotations

import os
from pathlib import Path

# Heavy imports paid once at collection rather than inside the first test that needs them:
# peft (~2 s, used by apply_lora) and deepspeed (~0.5 s, imported by save_pretrained).
import deepspeed  # noqa: F401
import peft  # noqa: F401
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import engine.runtime.atomic as atomic
import engine.runtime.checkpoint as checkpoint
from engine.config import LoRAArgs
from engine.errors import UserError
from engine.models.lora import (
    apply_lora,
    forwards_through_wrapper,
    is_lora_param,
    lora_target_modules,
    optimizer_param_groups,
)
from engine.runtime.atomic import publish_folder
from engine.runtime.checkpoint import _merged_model

LAYERS = 2
LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
OPT_LINEARS = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
               "fc1", "fc2"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64, tie_word_embeddings=False)).eval()


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=64,
        max_position_embeddings=64, word_embed_proj_dim=32)).eval()


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------
def test_auto_targets_every_decoder_linear_of_llama_but_not_the_head():
    targets = lora_target_modules(tiny_llama(), "auto")
    assert targets == [f"model.layers.{i}.{n}" for i in range(LAYERS) for n in LLAMA_LINEARS]
    assert "model.layers.0.self_attn.q_proj" in targets
    assert not any("lm_head" in t for t in targets)


def test_auto_targets_every_decoder_linear_of_opt_but_not_the_head():
    targets = lora_target_modules(tiny_opt(), "auto")
    assert targets == [f"model.decoder.layers.{i}.{n}" for i in range(LAYERS) for n in OPT_LINEARS]


def test_dschat_default_fragment_works_on_opt():
    model = tiny_opt()
    assert lora_target_modules(model, "decoder.layers.") == lora_target_modules(model, "auto")


def test_fragment_selects_by_substring():
    assert lora_target_modules(tiny_llama(), "q_proj") == [f"model.layers.{i}.self_attn.q_proj"
                                                           for i in range(LAYERS)]


def test_fragment_matching_nothing_suggests_layers():
    with pytest.raises(UserError) as exc:
        lora_target_modules(tiny_llama(), "decoder.layers.")
    msg = str(exc.value)
    assert "'decoder.layers.'" in msg and "'layers.'" in msg and "LlamaForCausalLM" in msg


def test_lm_head_fragment_matches_nothing():
    # The output head never gets LoRA, even when asked by name.
    with pytest.raises(UserError, match="'lm_head'"):
        lora_target_modules(tiny_llama(), "lm_head")


# ----------------------------------------------------------------------------------------------
# Trainable parameters and optimizer groups
# ----------------------------------------------------------------------------------------------
N_LLAMA_LORA = LAYERS * len(LLAMA_LINEARS) * 2   # lora_A + lora_B per target = 28
N_LLAMA_NORM = LAYERS * 2 + 1                    # input/post-attention norms + final norm = 5
N_LLAMA_DECAY = 1 + LAYERS * len(LLAMA_LINEARS) + 1  # embeddings + Linear weights + lm_head = 16


def test_only_optimize_lora_leaves_only_lora_trainable():
    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4, only_optimize_lora=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(trainable) == N_LLAMA_LORA and all(is_lora_param(n) for n in trainable)
    assert len(frozen) == N_LLAMA_NORM + N_LLAMA_DECAY and not any(is_lora_param(n) for n in frozen)


def test_without_only_optimize_lora_all_but_the_adapted_weights_train():
    # DeepSpeed-Chat's LoRA layer freezes the weight it wraps whatever --only_optimize_lora says; the flag only
    # decides whether the rest (embeddings, norms, head, Linear layers without LoRA) trains beside the adapters.
    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4, only_optimize_lora=False))
    params = dict(model.named_parameters())
    assert len(params) == N_LLAMA_LORA + N_LLAMA_NORM + N_LLAMA_DECAY  # 28 + 5 + 16 = 49
    frozen = sorted(n for n, p in params.items() if not p.requires_grad)
    assert len(frozen) == LAYERS * len(LLAMA_LINEARS) and all(n.endswith(".base_layer.weight") for n in frozen)
    assert "base_model.model.model.embed_tokens.weight" not in frozen
    assert "base_model.model.lm_head.weight" not in frozen and "base_model.model.model.norm.weight" not in frozen
    # With a name fragment, the Linear layers left without LoRA train whole.
    partial = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4, lora_module_name="q_proj"))
    frozen = {n for n, p in partial.named_parameters() if not p.requires_grad}
    assert frozen == {f"base_model.model.model.layers.{i}.self_attn.q_proj.base_layer.weight" for i in range(LAYERS)}


def test_lora_rank_and_scale_follow_the_flags():
    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4, lora_scaling=2.0))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (4, 32) and q.lora_B["default"].weight.shape == (32, 4)
    assert q.scaling["default"] == 0.5  # lora_scaling / lora_dim = 2 / 4 (DeepSpeed-Chat's convention)


@pytest.mark.parametrize("only_lora", [False, True])
def test_every_lora_layer_is_one_module_holding_its_three_weights(only_lora):
    # ZeRO-3 then fetches base, lora_A and lora_B of an adapted Linear with one all-gather (issue 18), whatever
    # else trains, and no module is a ZeRO-3 leaf (a leaf's backward hook costs a call per forward).
    from deepspeed.utils import z3_leaf_module

    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4, only_optimize_lora=only_lora))
    layers = {name: m for name, m in model.named_modules() if name.endswith(tuple(LLAMA_LINEARS))}
    assert len(layers) == LAYERS * len(LLAMA_LINEARS)  # 2 x 7 = 14
    for layer in layers.values():
        assert list(layer.children()) == []
        assert [n for n, _ in layer.named_parameters()] == [
            "base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"]
        assert layer.lora_A["default"].weight is layer._parameters["lora_A.default.weight"]  # one Parameter
        assert layer.get_base_layer().weight is layer._parameters["base_layer.weight"]
    assert not any(z3_leaf_module(m) for m in model.modules())


@pytest.mark.parametrize("only_lora", [False, True])
def test_lean_peft_layers_keep_outputs_gradients_and_state(only_lora):
    # DeepSpeed walks every module at each forward (per decoded token): an adapted Linear is 1 module, not
    # peft's 11 (empty embedding/DoRA containers and the Identity dropout are out of the tree, the base and
    # adapter weights are the layer's own), and runs a shorter forward; nothing else changes: same state dict
    # (keys and order), bit-equal outputs and gradients.
    import engine.models.lora as lora_mod

    args = LoRAArgs(lora_dim=4, only_optimize_lora=only_lora)
    lean = apply_lora(tiny_llama(), args)
    plain = apply_lora(tiny_llama(), args, one_module_layers=False)
    q_lean, q_plain = (m.base_model.model.model.layers[0].self_attn.q_proj for m in (lean, plain))
    assert (len(list(q_lean.modules())), len(list(q_plain.modules()))) == (1, 11)
    assert type(q_lean).forward is lora_mod._lean_forward and type(q_plain).forward is not lora_mod._lean_forward
    assert len(list(lean.modules())) == len(list(plain.modules())) - 10 * LAYERS * len(LLAMA_LINEARS)
    assert isinstance(q_lean.lora_dropout["default"], torch.nn.Identity)  # still there for peft's forward
    with torch.no_grad():  # a non-zero lora_B, so the adapters take part
        for model in (lean, plain):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p))
    state_lean, state_plain = lean.state_dict(), plain.state_dict()
    assert list(state_lean) == list(state_plain)
    assert all(torch.equal(state_lean[k], state_plain[k]) for k in state_lean)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    losses = [m.train()(input_ids=ids, labels=ids).loss for m in (lean, plain)]
    assert torch.equal(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (lean, plain)]
    assert list(grads[0]) == list(grads[1]) and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    with torch.no_grad():
        adapted = lean(input_ids=ids).logits
        with lean.disable_adapter(), plain.disable_adapter():  # peft's own forward, lean layers or not
            base = lean(input_ids=ids).logits
            assert torch.equal(base, plain(input_ids=ids).logits) and not torch.equal(base, adapted)


@pytest.mark.parametrize("assign", [False, True])
def test_one_module_lora_layers_load_a_strict_state_dict_into_the_weights_they_use(assign):
    # DeepSpeed's checkpoint load is a strict load_state_dict; torch's own check would call the layer's
    # `base_layer.weight` unexpected (no child named base_layer). With assign=True torch replaces the Parameter
    # objects: the layer and peft's modules must still hold the same ones.
    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4, only_optimize_lora=False))
    state = {k: torch.full_like(v, 0.25) for k, v in model.state_dict().items()}
    result = model.load_state_dict(state, strict=True, assign=assign)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.get_base_layer().weight is q._parameters["base_layer.weight"]
    assert q.lora_B["default"].weight is q._parameters["lora_B.default.weight"]
    assert all(torch.all(p == 0.25) for p in model.parameters())
    assert list(model.state_dict()) == list(state)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in state.items() if "q_proj.lora_A" not in k}, strict=True)


def test_one_module_lora_layers_keep_one_parameter_through_a_dtype_change():
    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4)).to(torch.float64)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight is q._parameters["lora_A.default.weight"]
    assert q.lora_A["default"].weight.dtype == q.get_base_layer().weight.dtype == torch.float64
    ids = torch.tensor([[5, 6, 7]])
    assert model(input_ids=ids).logits.dtype == torch.float64


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_generate_through_the_wrapper_calls_it_once_per_forward_and_keeps_the_tokens():
    # ZeRO-3 starts a parameter-trace step in a hook on the engine's root (the peft wrapper); peft's generate
    # bypasses it. In the block every forward of generate enters the wrapper once (1 prefill + 5 decode steps),
    # the wrapper's call of the inner model runs it once (no loop), and the answer is the same.
    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4, only_optimize_lora=False)).eval()
    inner = model.get_base_model()
    outer_calls, inner_calls = _count_calls(model), _count_calls(inner)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                  do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(**kwargs)
        assert (outer_calls[0], inner_calls[0]) == (0, 6)
        with forwards_through_wrapper(model):
            routed = model.generate(**kwargs)
    assert (outer_calls[0], inner_calls[0]) == (6, 12)
    assert torch.equal(plain, routed)
    assert type(inner) is LlamaForCausalLM and "_engine_routing" not in vars(inner)  # restored


def test_generate_through_the_wrapper_restores_the_model_after_an_error():
    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4))
    with pytest.raises(RuntimeError, match="boom"), forwards_through_wrapper(model):
        raise RuntimeError("boom")
    assert type(model.get_base_model()) is LlamaForCausalLM


def test_generate_through_the_wrapper_is_a_no_op_without_peft():
    model = tiny_llama()
    with forwards_through_wrapper(model):
        assert type(model) is LlamaForCausalLM


def _group_of(groups: list[dict], param: torch.nn.Parameter) -> dict:
    hits = [g for g in groups if any(p is param for p in g["params"])]
    assert len(hits) == 1
    return hits[0]


def test_param_groups_with_lora():
    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4))
    groups = optimizer_param_groups(model, weight_decay=0.1, lora_learning_rate=5e-4)
    # The adapted Linear weights stay frozen (DeepSpeed-Chat's rule): decay keeps embeddings and head.
    assert [len(g["params"]) for g in groups] == [N_LLAMA_DECAY - LAYERS * len(LLAMA_LINEARS), N_LLAMA_LORA,
                                                  N_LLAMA_NORM]
    decay, lora, no_decay = groups
    assert decay["weight_decay"] == 0.1 and "lr" not in decay
    assert lora["weight_decay"] == 0.1 and lora["lr"] == 5e-4
    assert no_decay["weight_decay"] == 0.0 and "lr" not in no_decay
    params = dict(model.named_parameters())
    pre = "base_model.model."
    assert _group_of(groups, params[pre + "model.norm.weight"]) is no_decay
    assert _group_of(groups, params[pre + "model.layers.1.input_layernorm.weight"]) is no_decay
    frozen = params[pre + "model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert not any(p is frozen for g in groups for p in g["params"])
    assert _group_of(groups, params[pre + "model.layers.0.self_attn.q_proj.lora_A.default.weight"]) is lora
    assert _group_of(groups, params[pre + "lm_head.weight"]) is decay


def test_param_groups_put_biases_and_layernorms_out_of_decay():
    model = tiny_opt()
    groups = optimizer_param_groups(model, weight_decay=0.1, lora_learning_rate=5e-4)
    # OPT, 2 layers: decay = 2 embeddings + 2 x 6 Linear weights = 14;
    # no decay = final LayerNorm (w, b) + 2 x (6 Linear biases + 2 LayerNorms x (w, b)) = 2 + 2 x 10 = 22
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(14, 0.1), (22, 0.0)]
    params = dict(model.named_parameters())
    no_decay = groups[1]
    for name in ("model.decoder.layers.0.fc1.bias", "model.decoder.layers.1.self_attn_layer_norm.weight",
                 "model.decoder.final_layer_norm.bias"):
        assert _group_of(groups, params[name]) is no_decay, name


def test_param_groups_keep_the_biases_of_one_module_lora_layers_out_of_decay():
    # An adapted Linear holds its base bias as its own `base_layer.bias` (apply_lora): still not decayed.
    model = apply_lora(tiny_opt(), LoRAArgs(lora_dim=4, only_optimize_lora=False))
    decay, lora, no_decay = optimizer_param_groups(model, weight_decay=0.1, lora_learning_rate=5e-4)
    # 14 / 22 without LoRA; the 12 adapted Linear weights (2 layers x 6) stay frozen, and 2 x 6 x 2 adapter
    # weights train
    assert (len(decay["params"]), len(lora["params"]), len(no_decay["params"])) == (2, 24, 22)
    params = dict(model.named_parameters())
    assert _group_of([decay, lora, no_decay], params[
        "base_model.model.model.decoder.layers.0.fc1.base_layer.bias"]) is no_decay


def test_param_groups_skip_frozen_parameters():
    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4, only_optimize_lora=True))
    groups = optimizer_param_groups(model, weight_decay=0.0, lora_learning_rate=1e-4)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-4 and len(groups[0]["params"]) == N_LLAMA_LORA


# ----------------------------------------------------------------------------------------------
# Fusing LoRA for a save
# ----------------------------------------------------------------------------------------------
def _lora_model_with_nonzero_b(make, lora_scaling: float = 1.0):
    model = apply_lora(make(), LoRAArgs(lora_dim=4, lora_scaling=lora_scaling))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would make any merge look right
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.mark.filterwarnings("ignore:Input and output embeddings")  # OPT: see the xfail below
@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_merged_model_saves_the_same_function(make, tmp_path):
    peft_model = _lora_model_with_nonzero_b(make)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        plain = make()(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapters do change the output

    # The engine's path: gather (a CPU copy of every tensor), then merge that copy.
    state = checkpoint.gather_state_dict(peft_model, zero_stage=0, is_main=True)
    merged = _merged_model(peft_model, state)
    assert type(merged) is type(make())
    assert not any("lora" in k for k in merged.state_dict())
    merged.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The training model is left as it was: adapters in place, same output.
    assert any(is_lora_param(n) for n, _ in peft_model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_merged_weight_is_base_plus_scaled_b_times_a():
    peft_model = _lora_model_with_nonzero_b(tiny_llama, lora_scaling=2.0)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    base = q.base_layer.weight.detach().clone()
    a, b = q.lora_A["default"].weight.detach(), q.lora_B["default"].weight.detach()
    merged = _merged_model(peft_model, checkpoint.gather_state_dict(peft_model, 0, True))
    # W' = W + (lora_scaling / lora_dim) * B @ A = W + (2 / 4) * B @ A
    torch.testing.assert_close(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                               base + 0.5 * (b @ a))


def test_merging_a_plain_model_copies_it():
    model = tiny_llama()
    merged = _merged_model(model, model.state_dict())
    assert merged is not model
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, atol=0, rtol=0)


def test_merging_a_plain_opt_keeps_its_tied_embeddings():
    model = tiny_opt()
    merged = _merged_model(model, checkpoint.gather_state_dict(model, 0, True))
    assert merged.config.tie_word_embeddings is True
    assert merged.lm_head.weight is merged.model.decoder.embed_tokens.weight


@pytest.mark.filterwarnings("ignore:Input and output embeddings")
def test_merging_lora_on_opt_keeps_its_tied_embeddings():
    peft_model = _lora_model_with_nonzero_b(tiny_opt)
    merged = _merged_model(peft_model, checkpoint.gather_state_dict(peft_model, 0, True))
    assert merged.config.tie_word_embeddings is True
    assert merged.lm_head.weight is merged.model.decoder.embed_tokens.weight
    assert peft_model.config.tie_word_embeddings is True  # the training model's config is untouched


def test_merged_llama_runs_forward():
    peft_model = _lora_model_with_nonzero_b(tiny_llama)
    merged = _merged_model(peft_model, checkpoint.gather_state_dict(peft_model, 0, True)).eval()
    ids = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Publishing a folder
# ----------------------------------------------------------------------------------------------
def _staging(tmp_path: Path) -> Path:
    staging = tmp_path / ".out.staging-x"
    staging.mkdir()
    (staging / "config.json").write_text('{"new": true}')
    (staging / "model.safetensors").write_text("new weights")
    (staging / "tokenizer.json").write_text("new tokenizer")
    return staging


def _existing_target(tmp_path: Path) -> Path:
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text('{"old": true}')
    (target / "model.safetensors").write_text("old weights")
    (target / "metrics.jsonl").write_text('{"step": 1}\n')
    return target


def test_publish_to_a_new_target_renames(tmp_path):
    staging = _staging(tmp_path)
    target = tmp_path / "out"
    publish_folder(staging, target)
    assert not staging.exists()
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (target / "config.json").read_text() == '{"new": true}'


def test_publish_into_an_existing_folder_keeps_other_files_and_writes_config_last(tmp_path, monkeypatch):
    staging, target = _staging(tmp_path), _existing_target(tmp_path)
    moved: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", recording_replace)
    publish_folder(staging, target)
    assert moved[-1] == "config.json" and sorted(moved) == ["config.json", "model.safetensors",
                                                            "tokenizer.json"]
    assert (target / "config.json").read_text() == '{"new": true}'
    assert (target / "model.safetensors").read_text() == "new weights"
    assert (target / "tokenizer.json").read_text() == "new tokenizer"
    assert (target / "metrics.jsonl").read_text() == '{"step": 1}\n'  # a file of the run, kept
    assert not staging.exists()


def test_interrupted_publish_leaves_no_config_json(tmp_path, monkeypatch):
    staging, target = _staging(tmp_path), _existing_target(tmp_path)
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        publish_folder(staging, target)
    # New weights in, tokenizer not yet: the folder must not load as a model.
    assert (target / "model.safetensors").read_text() == "new weights"
    assert not (target / "config.json").exists()
    assert (target / "metrics.jsonl").exists()


def test_the_benchmarks_no_arithmetic_diagnostic_keeps_the_structure_and_drops_the_math(monkeypatch):
    # benchmarks/rlhf_step.py --no_lora_arithmetic: a one-module layer returns its base output, and its adapters
    # still get (zero) gradients, so DeepSpeed's hooks and the optimizer group see them as in a real run.
    import importlib.util

    from peft.tuners.lora.layer import Linear

    import engine.models.lora as lora_mod
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("rlhf_step_bench", ROOT / "benchmarks" / "rlhf_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lean_class = lora_mod._lean_class(Linear)
    monkeypatch.setattr(lean_class, "forward", lean_class.forward)  # restored after the test
    model = apply_lora(tiny_llama(), LoRAArgs(lora_dim=4, only_optimize_lora=False))
    with torch.no_grad():  # a non-zero lora_B: the real layer's output differs from its base's
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    bench.drop_lora_arithmetic()
    assert torch.equal(model(input_ids=ids).logits.detach(), base) and not torch.equal(base, adapted)
    model(input_ids=ids, labels=ids).loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora_grads) == 2 * LAYERS * len(LLAMA_LINEARS)
    assert all(g is not None and not g.any() for g in lora_grads)
    norm_grad = model.base_model.model.model.layers[0].input_layernorm.weight.grad
    assert norm_grad is not None and norm_grad.any()  # the rest of the model still learns
