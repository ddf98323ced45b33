"""What LoRA costs a model's own arithmetic, with no DeepSpeed and no engine around it: the floor under any
engine's LoRA / no-LoRA ratio (issue 18).

    OMP_NUM_THREADS=1 python benchmarks/lora_floor.py --out floor.json
    OMP_NUM_THREADS=1 python benchmarks/lora_floor.py --hidden_size 512 --intermediate_size 1536 --num_heads 8

One process, one thread, the built-in tiny Llama's shape (or a wider one), random weights, bf16. For each
layout it times the two things step 3 does most: greedy generation (`generate`, KV cache, 8 prompts of 24 tokens,
16 new tokens, as benchmarks/lora_speed.sh) and one training step's forward and backward on the 8 x 40 tokens.
Layouts:
- `none`: the model without LoRA;
- `peft`: peft's LoRA layers as peft builds them (rank 8, every Linear but the head);
- `engine`: the same after engine.models.lora.apply_lora (one module per adapted Linear, the lean forward).
Both train what step 3 trains with LoRA (apply_lora): the adapters and all but the adapted Linear weights.
Runs are interleaved (`--rounds`) and each figure is the median of its rounds. Prints and writes JSON, with each
LoRA layout's ratio to `none`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(args: argparse.Namespace, layout: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.config import LoRAArgs
    from engine.models.lora import apply_lora
    from engine.models.tiny import TINY_LLAMA, VOCAB_SIZE

    shape = dict(TINY_LLAMA, vocab_size=VOCAB_SIZE, hidden_size=args.hidden_size,
                 intermediate_size=args.intermediate_size, num_attention_heads=args.num_heads,
                 num_key_value_heads=args.num_heads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    if layout in ("engine", "peft"):  # what trains: the engine's rule (the adapted Linear weights stay frozen)
        model = apply_lora(model, LoRAArgs(lora_dim=args.lora_dim, only_optimize_lora=False),
                           one_module_layers=layout == "engine")
    return model


def time_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    model.eval()
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(**kwargs)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model.generate(**kwargs)
    return (time.perf_counter() - start) / repeats


def time_train(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    model.train()

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--intermediate_size", type=int, default=192)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--lora_dim", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=24)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10, help="Calls timed per round and layout.")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layouts", default="none,peft,engine")
    p.add_argument("--out", default=None, help="Also write the JSON here.")
    args = p.parse_args()

    layouts = args.layouts.split(",")
    models = {layout: build(args, layout) for layout in layouts}
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 384, (args.batch, args.prompt_len), generator=generator)
    full = torch.randint(2, 384, (args.batch, args.prompt_len + args.new_tokens), generator=generator)
    times: dict[str, dict[str, list[float]]] = {layout: {"generate_s": [], "train_s": []} for layout in layouts}
    for _ in range(args.rounds):
        for layout, model in models.items():
            times[layout]["generate_s"].append(time_generate(model, prompt, args.new_tokens, args.repeats))
            times[layout]["train_s"].append(time_train(model, full, args.repeats))
    report = {"shape": {k: getattr(args, k) for k in ("hidden_size", "intermediate_size", "num_heads", "lora_dim")},
              "workload": {k: getattr(args, k) for k in ("batch", "prompt_len", "new_tokens", "repeats", "rounds")},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": "bf16", "layouts": {}}
    for layout in layouts:
        row = {key: statistics.median(values) for key, values in times[layout].items()}
        if "none" in times and layout != "none":
            for key in ("generate_s", "train_s"):
                row[key.replace("_s", "_ratio")] = row[key] / statistics.median(times["none"][key])
        report["layouts"][layout] = row
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
