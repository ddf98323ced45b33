"""DeepSpeed-Chat's own step 3 on CPU, timed per PPO step; and its inputs, made from our benchmark's models.

    python benchmarks/dschat_shim.py prepare OUT_DIR DSCHAT_APP    # DSCHAT_APP: .../applications/DeepSpeed-Chat
    DSCHAT_APP=... DSCHAT_TIMING_OUT=t.json deepspeed --num_gpus 2 benchmarks/dschat_shim.py MAIN_PY_FLAGS...

`prepare` writes, from the random-weight tiny Llama folders that benchmarks/rlhf_step.py uses (same shape,
dtype and seed, built by engine.bench.random_models if missing): OUT_DIR/models/actor (a link to our actor
folder), OUT_DIR/models/critic (our critic as a DeepSpeed-Chat step-2 folder: `rwtransformer.*` +
`v_head.weight` in pytorch_model.bin, the causal LM's config, the tokenizer), and DeepSpeed-Chat's
`local/jsonfile` data (DSCHAT_APP/data/{train,eval}.json) from our bundled prompts. The folders are named
without "llama", so DeepSpeed-Chat loads the tokenizer with AutoTokenizer (its LlamaTokenizer branch does not
read our tokenizer.json under transformers 5).

Otherwise this runs DSCHAT_APP/training/step3_rlhf_finetuning/main.py unchanged (runpy), after these runtime
shims (DeepSpeed-Chat's files are not edited):
  - FusedAdam (a CUDA-only op) -> torch.optim.AdamW, the class our step 3 takes on CPU without --offload.
  - The critic / reward model is cast to its ZeRO-3 parameters' dtype after creation: `v_head` is made outside
    zero.Init in fp32, and DeepSpeed 0.19 no longer casts a ZeRO-Init model's other parameters (older
    releases called module.bfloat16()), so ZeRO-3's flat buffer would mix dtypes (assert in defragment).
Timing wraps DeepSpeedPPOTrainer: generate (`_generate_sequence`), experience (the rest of
`generate_experience`: actor, reference, reward and critic forwards), train (`train_rlhf`); a step ends at
main.py's `print_throughput_step3` call. Rank 0 writes DSCHAT_TIMING_OUT: per step those seconds, their sum
(e2e_s, the figure our benchmark reports), DeepSpeed-Chat's own e2e (generate + train, no experience) and
the mean generated answer length (non-pad tokens).
"""
from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED, DTYPE, ROWS = 1234, "bf16", 512  # rlhf_step.py's default seed; 512 prompts > 26 steps x 8 x 2 ranks


def prepare(out: Path, app: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from engine.bench.random_models import embedded_tokenizer, ensure_random_model, load_shape
    from engine.data.sort_task import ASSET_DIR
    from engine.models.convert_dschat import BASE_PREFIX, HEAD_KEY, WEIGHTS
    from engine.models.reward_model import HEAD
    from engine.runtime.atomic import cache_root

    config = load_shape("tiny")
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    ours = {role: ensure_random_model(config, role, DTYPE, SEED, cache_root() / "bench_models")
            for role in ("actor", "critic")}
    actor = models / "actor"
    if actor.is_symlink():
        actor.unlink()
    actor.symlink_to(ours["actor"], target_is_directory=True)

    critic = models / "critic"
    shutil.rmtree(critic, ignore_errors=True)
    critic.mkdir()
    state = load_file(ours["critic"] / "model.safetensors")
    dschat = {BASE_PREFIX + k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    dschat[HEAD_KEY] = state[f"{HEAD}.weight"]
    # DeepSpeed-Chat resizes every model's vocabulary to a multiple of 8 before loading (its step 2 saved that
    # shape too); the extra rows never occur in the input.
    embed_key = f"{BASE_PREFIX}embed_tokens.weight"
    dschat[embed_key] = torch.nn.functional.pad(dschat[embed_key], (0, 0, 0, -len(dschat[embed_key]) % 8))
    torch.save(dschat, critic / WEIGHTS)
    cfg = json.loads((ours["critic"] / "config.json").read_text())
    for key in ("id2label", "label2id"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (critic / "config.json").write_text(json.dumps(cfg, indent=2))
    embedded_tokenizer().save_pretrained(str(critic))

    lines = (ASSET_DIR / "train.jsonl").read_text().splitlines()
    data = app / "data"
    data.mkdir(exist_ok=True)
    (data / "train.json").write_text("\n".join(lines[:ROWS]) + "\n")
    (data / "eval.json").write_text("\n".join(lines[ROWS:ROWS + 16]) + "\n")
    shutil.rmtree(out / "dschat_data_cache", ignore_errors=True)


def install_shims() -> None:
    import torch
    from deepspeed.ops import adam

    adam.FusedAdam = torch.optim.AdamW  # before dschat.rlhf.rlhf_engine imports it
    from dschat.rlhf import rlhf_engine

    create_critic_model = rlhf_engine.create_critic_model

    def critic_in_run_dtype(*args, **kwargs):
        model = create_critic_model(*args, **kwargs)
        return model.to(next(model.rwtransformer.parameters()).dtype)

    rlhf_engine.create_critic_model = critic_in_run_dtype


def install_timing(steps: list[dict]) -> None:
    """Append one dict per PPO step to `steps` (see the module docstring)."""
    from dschat.rlhf.ppo_trainer import DeepSpeedPPOTrainer
    from dschat.utils import perf

    current: dict = {"generate_s": 0.0, "experience_s": 0.0, "train_s": 0.0}
    trainer = DeepSpeedPPOTrainer
    generate_sequence, generate_experience = trainer._generate_sequence, trainer.generate_experience
    train_rlhf, print_step = trainer.train_rlhf, perf.print_throughput_step3

    def timed_generate(self, prompts, mask, step):
        start = time.perf_counter()
        seq = generate_sequence(self, prompts, mask, step)
        current["generate_s"] += time.perf_counter() - start
        if seq is not None:
            answers = seq[:, prompts.shape[1]:] != self.tokenizer.pad_token_id
            current["answer_len"] = answers.sum(-1).float().mean().item()
        return seq

    def timed_experience(self, prompts, mask, step):
        start, before = time.perf_counter(), current["generate_s"]
        out = generate_experience(self, prompts, mask, step)
        current["experience_s"] += time.perf_counter() - start - (current["generate_s"] - before)
        return out

    def timed_train(self, inputs):
        start = time.perf_counter()
        out = train_rlhf(self, inputs)
        current["train_s"] += time.perf_counter() - start
        return out

    def end_of_step(actor, critic, args, e2e_time, gen_time, train_time, rank=0):
        print_step(actor, critic, args, e2e_time, gen_time, train_time, rank)
        e2e = current["generate_s"] + current["experience_s"] + current["train_s"]
        steps.append(dict(current, e2e_s=e2e, dschat_e2e_s=e2e_time))
        current.update(generate_s=0.0, experience_s=0.0, train_s=0.0)

    trainer._generate_sequence = timed_generate
    trainer.generate_experience = timed_experience
    trainer.train_rlhf = timed_train
    perf.print_throughput_step3 = end_of_step  # before main.py's `from dschat.utils.perf import ...`


def run(app: Path, timing_out: Path) -> None:
    import torch

    sys.path.insert(0, str(app))
    install_shims()
    steps: list[dict] = []
    install_timing(steps)
    main = app / "training" / "step3_rlhf_finetuning" / "main.py"
    sys.argv = [str(main), *sys.argv[1:]]
    runpy.run_path(str(main), run_name="__main__")
    if torch.distributed.get_rank() == 0:
        timing_out.write_text(json.dumps({"argv": sys.argv[1:], "steps": steps}, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"]:
        prepare(Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve())
    else:
        run(Path(os.environ["DSCHAT_APP"]), Path(os.environ["DSCHAT_TIMING_OUT"]))
