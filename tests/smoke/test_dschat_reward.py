"""A DeepSpeed-Chat step-2 folder (`rwtransformer.*` + `v_head.weight` in one pytorch_model.bin over the causal
LM's config) scores as DeepSpeed-Chat's `RewardModel.forward_value` does, whether step 3 converts it on load or
`python -m engine.models.convert_dschat` converts it first; and it drives step 3."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ModelArgs
from engine.errors import UserError
from engine.models import convert_dschat
from engine.models.load import load_tokenizer
from engine.models.reward_model import load_reward_model, reward_model_folder
from tests.conftest import ROOT, offline_env, read_metrics

pytestmark = pytest.mark.smoke

PROMPT_LEN = 4


def dschat_reward_folder(folder: Path) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """(folder, base transformer, v_head) of a random tiny Llama reward model saved as DeepSpeed-Chat saves one:
    the `AutoModel` under `rwtransformer.`, `v_head` Linear(hidden, 1, bias=False), the causal LM's config."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from engine.models.tiny import TINY_LLAMA, TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"], **TINY_LLAMA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        base = LlamaModel(config).eval()
        v_head = torch.nn.Linear(config.hidden_size, 1, bias=False)
        torch.nn.init.normal_(v_head.weight, std=1.0)  # scores far from 0, so a wrong token or head shows
    state = {f"rwtransformer.{k}": v for k, v in base.state_dict().items()} | {"v_head.weight": v_head.weight.data}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    config.to_json_file(str(folder / "config.json"))  # DeepSpeed-Chat writes the config as it is, not save_pretrained
    tok.save_pretrained(str(folder))
    return folder, base, v_head


def forward_value_scores(base, v_head, ids: torch.Tensor, mask: torch.Tensor, pad_id: int,
                         prompt_length: int) -> torch.Tensor:
    """DeepSpeed-Chat's `RewardModel.forward_value(..., prompt_length)['chosen_end_scores']`, re-implemented from its
    rule: values = v_head(last hidden states); per row, the first pad at or after `prompt_length` ends the answer
    and the score is the value just before it (the last position when the row has no pad there)."""
    with torch.no_grad():
        values = v_head(base(input_ids=ids, attention_mask=mask).last_hidden_state).squeeze(-1)
    out = []
    for row, value in zip(ids, values):
        pads = (row[prompt_length:] == pad_id).nonzero()
        end = pads[0].item() + prompt_length if len(pads) else row.numel()
        out.append(value[end - 1])
    return torch.stack(out)


def step2_end_scores(base, v_head, ids: torch.Tensor, mask: torch.Tensor, pad_id: int,
                     num_padding_at_beginning: int) -> torch.Tensor:
    """DeepSpeed-Chat's step-2 end score (`RewardModel.forward`'s chosen_end_scores): the value before the
    (`num_padding_at_beginning`)-th pad of the row (counting from 0; the row's length when there are fewer)."""
    with torch.no_grad():
        values = v_head(base(input_ids=ids, attention_mask=mask).last_hidden_state).squeeze(-1)
    out = []
    for row, value in zip(ids, values):
        pads = (row == pad_id).nonzero()
        end = pads[num_padding_at_beginning].item() if len(pads) > num_padding_at_beginning else row.numel()
        out.append(value[end - 1])
    return torch.stack(out)


def batch(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt (PROMPT_LEN tokens, no left padding: DeepSpeed-Chat passes no position ids) + answers of 3 lengths,
    right-padded."""
    pad = tok.pad_token_id
    prompt = tok("[3, 1, 2]", add_special_tokens=False).input_ids[:PROMPT_LEN]
    answers = [tok(a, add_special_tokens=False).input_ids for a in (" [1, 2, 3]", " [1]", " [2, 1, 3, 3, 1]")]
    width = PROMPT_LEN + max(map(len, answers))
    ids = torch.tensor([prompt + a + [pad] * (width - PROMPT_LEN - len(a)) for a in answers])
    return ids, (ids != pad).long()


def our_scores(folder: str, tok, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model = load_reward_model(folder, ModelArgs(), tok, "fp32", None, False).eval()
    with torch.no_grad():
        return model.scores(ids, mask)


@pytest.fixture
def dschat(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_CACHE", str(tmp_path / "cache"))
    return dschat_reward_folder(tmp_path / "dschat_step2")


def test_load_time_conversion_scores_as_deepspeed_chat(dschat):
    folder, base, v_head = dschat
    tok = load_tokenizer(str(folder))
    ids, mask = batch(tok)
    theirs = forward_value_scores(base, v_head, ids, mask, tok.pad_token_id, PROMPT_LEN)
    # Llama has no BOS-equals-pad quirk: DeepSpeed-Chat's llama2 step-2 scripts pass --num_padding_at_beginning 0.
    torch.testing.assert_close(step2_end_scores(base, v_head, ids, mask, tok.pad_token_id, 0), theirs)
    loaded = reward_model_folder(str(folder), "critic_model_name_or_path", False)
    assert loaded != str(folder) and convert_dschat.is_dschat_reward_folder(folder)
    torch.testing.assert_close(our_scores(loaded, tok, ids, mask), theirs, rtol=1e-5, atol=1e-5)
    assert reward_model_folder(str(folder), "critic_model_name_or_path", False) == loaded  # converted once
    # The evaluation scripts (step2_reward/rw_eval.py, step3_rlhf/evaluate.py) read it too.
    from engine.models.inference import load_reward_for_inference
    from engine.models.reward_model import RewardModel

    model, _ = load_reward_for_inference(str(folder))
    with torch.no_grad():
        torch.testing.assert_close(RewardModel(model).scores(ids, mask), theirs, rtol=1e-5, atol=1e-5)


def test_convert_command_scores_as_deepspeed_chat(dschat, tmp_path, engine_cache):
    folder, base, v_head = dschat
    out = tmp_path / "ours"
    proc = subprocess.run([sys.executable, "-m", "engine.models.convert_dschat", str(folder), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=offline_env(engine_cache))
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = load_tokenizer(str(out))
    ids, mask = batch(tok)
    theirs = forward_value_scores(base, v_head, ids, mask, tok.pad_token_id, PROMPT_LEN)
    torch.testing.assert_close(our_scores(str(out), tok, ids, mask), theirs, rtol=1e-5, atol=1e-5)
    assert reward_model_folder(str(out), "critic_model_name_or_path", False) == str(out)  # ours: used as it is


def test_a_folder_in_neither_format_is_refused_naming_both(dschat, engine_cache):
    from tests.conftest import tiny_model_folder

    with pytest.raises(UserError, match="is not a reward model.*DeepSpeed-Chat step-2 folder.*rwtransformer"):
        reward_model_folder(str(tiny_model_folder(engine_cache)), "critic_model_name_or_path", False)
    folder, _, _ = dschat
    proc = subprocess.run([sys.executable, "-m", "engine.models.convert_dschat", str(tiny_model_folder(engine_cache)),
                           str(folder.parent / "x")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=offline_env(engine_cache))
    assert proc.returncode == 2 and "is not a DeepSpeed-Chat step-2 folder" in proc.stderr
    assert "Traceback" not in proc.stderr and not (folder.parent / "x").exists()


def test_a_dschat_reward_folder_drives_step_3_with_evaluation_off(dschat, run_step, engine_cache, tmp_path):
    """(One run for both, to spare the CPU: --eval_prompts 0 is DeepSpeed-Chat's step 3, which never evaluates.)"""
    from tests.conftest import tiny_model_folder

    folder, _, _ = dschat
    out = tmp_path / "step3"
    proc = run_step("step3_rlhf/main.py", [
        "--actor_model_name_or_path", str(tiny_model_folder(engine_cache)), "--critic_model_name_or_path",
        str(folder), "--output_dir", str(out), "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8",
        "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2", "--num_warmup_steps", "0",
        "--dtype", "fp32", "--test_stop_step", "2", "--eval_prompts", "0"])
    assert "is a DeepSpeed-Chat step-2 folder" in proc.stderr + proc.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "rollout/score_mean" in r] == [1, 2]
    assert all(abs(r["rollout/score_mean"]) > 0 for r in rows if "rollout/score_mean" in r)
    assert not [k for r in rows for k in r if k.startswith("eval/")]
    assert "no evaluation: --eval_prompts 0" in proc.stderr + proc.stdout and (out / "actor" / "config.json").is_file()


def test_a_dschat_folder_missing_weights_is_refused_and_nothing_is_cached(dschat, tmp_path):
    folder, _, _ = dschat
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["rwtransformer.norm.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"lacks weights the LlamaForSequenceClassification needs \(model.norm.weight"):
        reward_model_folder(str(folder), "critic_model_name_or_path", False)
    assert not list((tmp_path / "cache").glob("dschat-reward-*"))


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_other_families_convert_to_the_same_scores(family, tmp_path):
    """OPT (DeepSpeed-Chat's own family: its v_head reads word_embed_proj_dim) and GPT-2 (base prefix
    'transformer', not 'model')."""
    from transformers import AutoModel, AutoModelForSequenceClassification, GPT2Config, OPTConfig

    from engine.models.reward_model import RewardModel

    config = {"opt": OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                               word_embed_proj_dim=16, pad_token_id=1, architectures=["OPTForCausalLM"]),
              "gpt2": GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, pad_token_id=0,
                                 architectures=["GPT2LMHeadModel"])}[family]
    torch.manual_seed(3)
    base = AutoModel.from_config(config).eval()
    v_head = torch.nn.Linear(getattr(config, "word_embed_proj_dim", 32), 1, bias=False)
    src, dst = tmp_path / "dschat", tmp_path / "ours"
    src.mkdir(), dst.mkdir()
    torch.save({f"rwtransformer.{k}": v for k, v in base.state_dict().items()} | {"v_head.weight": v_head.weight.data},
               src / "pytorch_model.bin")
    config.to_json_file(str(src / "config.json"))
    convert_dschat.write_converted(src, dst)
    pad = config.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 11, pad, pad]])  # prompt of 3, answers of 3 and 1
    mask = (ids != pad).long()
    model = AutoModelForSequenceClassification.from_pretrained(str(dst)).eval()
    with torch.no_grad():
        ours = RewardModel(model).scores(ids, mask)
    torch.testing.assert_close(ours, forward_value_scores(base, v_head, ids, mask, pad, 3), rtol=1e-5, atol=1e-5)
