"""Generation under ZeRO-3: naive (per-layer fetch for every token) vs the hybrid mode (gather once).

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 benchmarks/generation_bench.py --out bench.json

(On a CPU, give each rank one thread: two ranks with two threads each on two cores slow both modes
down unevenly.)

ZeRO-3 is set up so the model does not stay resident between steps (stage3_max_reuse_distance 0,
no persistence), standing in for a model too large to keep whole. Both modes generate greedily from
the same prompts with the same (LoRA-trained) actor; the tokens must match. Prints and writes JSON:
wall time, generated tokens, all-gather calls and bytes per generated token for each mode, and
`speedup` and `allgather_bytes_ratio` (naive over hybrid). `--compare_lora_layout` adds `lora_layout`: naive
generation with each adapted Linear one module (engine.models.lora's layout), routed as step 3 generates, against
peft's own module tree (one fetch per peft sub-module) through peft's own generate (before issue 18), with the
base trained and with LoRA alone (--only_optimize_lora): same tokens, largest log-prob difference, all-gather
calls and time.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as tdist

from engine.config import DeepSpeedArgs, LoRAArgs, ModelArgs, TrainArgs
from engine.data.sort_task import generate as synthetic_rows
from engine.models.hybrid import generation_mode
from engine.models.load import load_causal_lm, load_tokenizer, resolve_model_path
from engine.models.lora import apply_lora, optimizer_param_groups
from engine.ppo.trainer import generate_sequences
from engine.runtime.distributed import init_distributed, setup_logging
from engine.runtime.engines import build_ds_config, deepspeed_initialize, make_optimizer


class GatherCounter:
    """Counts all-gather calls and the bytes they return, at DeepSpeed's communication backend (every
    ZeRO-3 fetch goes through it; call counts do not depend on the machine's speed)."""

    NAMES = ("all_gather_into_tensor", "all_gather", "all_gather_base")

    def __init__(self) -> None:
        self.calls, self.bytes = 0, 0

    @contextmanager
    def counting(self) -> Iterator[GatherCounter]:
        from deepspeed.comm import comm as ds_comm

        backend = ds_comm.cdb
        originals = {n: getattr(backend, n) for n in self.NAMES if hasattr(backend, n)}

        def wrap(fn):
            def counted(*args, **kwargs):
                out = kwargs.get("output_tensor", kwargs.get("tensor_list", args[0] if args else None))
                tensors = out if isinstance(out, (list, tuple)) else [out]
                self.calls += 1
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
                return fn(*args, **kwargs)
            return counted

        for name, fn in originals.items():
            setattr(backend, name, wrap(fn))
        try:
            yield self
        finally:
            for name in originals:
                delattr(backend, name)  # back to the class's method


def build_actor(args: argparse.Namespace, dist, only_lora: bool = True, one_module_layers: bool = True):
    """The LoRA actor under ZeRO-3 (`only_lora`: --only_optimize_lora); `one_module_layers=False` keeps peft's
    module tree (one fetch per peft sub-module, as before issue 18) to compare the two."""
    torch.manual_seed(args.seed)  # the same LoRA initialisation for every actor built
    model_args = ModelArgs(model_name_or_path=args.model_name_or_path)
    path = resolve_model_path(model_args, args.seed, dist, role="benchmarked")
    tok = load_tokenizer(path, model_args)
    tok.padding_side = "left"
    ds = DeepSpeedArgs(zero_stage=3, dtype=args.dtype)
    train = TrainArgs(per_device_train_batch_size=args.batch_size)
    ds_config = build_ds_config(ds, train, dist.world_size)
    # Nothing stays resident: every forward re-gathers what it uses (a model larger than the reuse window).
    ds_config["zero_optimization"].update(stage3_max_reuse_distance=0, stage3_param_persistence_threshold=0,
                                          stage3_max_live_parameters=0, stage3_prefetch_bucket_size=0)
    model = load_causal_lm(path, model_args, tok, args.dtype, ds_config, gradient_checkpointing=False)
    model = apply_lora(model, LoRAArgs(lora_dim=args.lora_dim, only_optimize_lora=only_lora), one_module_layers)
    groups = optimizer_param_groups(model, 0.0, 1e-2)
    engine = deepspeed_initialize(model, make_optimizer(groups, 1e-2, (0.9, 0.95), False), None, ds_config)
    return engine, tok


def lora_steps(engine, tok, n: int, device) -> None:
    """A few LoRA updates so the fused weights differ from the base ones."""
    batch = tok([r.prompt + r.chosen for r in synthetic_rows(4, seed=1)], return_tensors="pt", padding=True)
    for _ in range(n):
        out = engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                     labels=batch["input_ids"].to(device))
        engine.backward(out.loss)
        engine.step()


def naive_generate(engine, enc, gen, routed: bool = False) -> torch.Tensor:
    """Generation through ZeRO-3's hooks (every rank steps until all finish); `routed`: as step 3 does it
    (`engine.ppo.trainer.generate_sequences`: a peft actor's forwards go through its wrapper)."""
    if routed:
        with torch.no_grad():
            return generate_sequences(engine, 3, enc["input_ids"], enc["attention_mask"], gen, hybrid=False)
    engine.module.eval()
    with torch.no_grad():
        out = engine.module.generate(**enc, use_cache=True, synced_gpus=True, **gen)
    engine.module.train()
    return out


def sequence_logprobs(engine, sequences: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, L-1) log-probability of each next token, computed through ZeRO-3's hooks."""
    engine.module.eval()
    with torch.no_grad():
        logits = engine(input_ids=sequences, attention_mask=(sequences != pad_id).long()).logits.float()
    engine.module.train()
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)


def compare_lora_layouts(args, dist, tok, enc, gen, only_lora: bool) -> dict:
    """Issue 18's fixes pinned: the same actor built with one module per adapted Linear (engine.models.lora)
    generating as step 3 does (forwards through the peft wrapper), and with peft's module tree (peft's forward,
    one fetch per sub-module) generating through peft directly, trained the same way, gives the same greedy
    tokens and log-probs; and how many all-gathers each needs."""
    runs = {}
    for name, one_module in (("one_module", True), ("peft_tree", False)):
        engine, _ = build_actor(args, dist, only_lora=only_lora, one_module_layers=one_module)
        lora_steps(engine, tok, 3, dist.device)
        counter = GatherCounter()
        with counter.counting():
            tokens, seconds = timed(functools.partial(naive_generate, engine, enc, gen, routed=one_module))
        runs[name] = {"tokens": tokens, "logprobs": sequence_logprobs(engine, tokens, tok.pad_token_id),
                      "wall_s": seconds, "allgather_calls": counter.calls}
    a, b = runs["one_module"], runs["peft_tree"]
    same = torch.tensor([float(torch.equal(a["tokens"], b["tokens"]))])
    diff = torch.tensor([(a["logprobs"] - b["logprobs"]).abs().max().item() if bool(same) else float("inf")])
    tdist.all_reduce(same, op=tdist.ReduceOp.MIN)
    tdist.all_reduce(diff, op=tdist.ReduceOp.MAX)
    return {"same_tokens": bool(same.item()), "max_logprob_diff": diff.item(),
            **{f"{k}_{n}": runs[n][k] for n in runs for k in ("wall_s", "allgather_calls")}}


def timed(fn):
    tdist.barrier()
    start = time.perf_counter()
    result = fn()
    tdist.barrier()
    return result, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="Default: the built-in tiny model.")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--lora_dim", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None, help="Also write the JSON here.")
    p.add_argument("--compare_lora_layout", action="store_true", help="Also build the actor with one module per "
                   "adapted Linear and with peft's module tree, base trained and LoRA alone, and compare their "
                   "greedy tokens, log-probs and all-gathers ('lora_layout').")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()

    dist = init_distributed(args.seed)
    setup_logging(dist.is_main)
    engine, tok = build_actor(args, dist)
    lora_steps(engine, tok, 3, dist.device)
    prompts = [r.prompt for r in synthetic_rows(args.batch_size, seed=100 + dist.rank)]
    enc = {k: v.to(dist.device) for k, v in tok(prompts, return_tensors="pt", padding=True).items()}
    gen = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id)

    def naive():
        return naive_generate(engine, enc, gen)

    def hybrid():
        with generation_mode(engine, zero_stage=3) as model:
            return model.generate(**enc, **gen)

    report = {}
    outputs = {}
    for name, fn in (("naive", naive), ("hybrid", hybrid)):
        counter = GatherCounter()
        with counter.counting():
            outputs[name], seconds = timed(fn)
        new_tokens = (outputs[name].shape[1] - enc["input_ids"].shape[1]) * outputs[name].shape[0]
        report[name] = {"wall_s": seconds, "generated_tokens": new_tokens, "allgather_calls": counter.calls,
                        "allgather_bytes": counter.bytes,
                        "allgather_calls_per_token": counter.calls / new_tokens,
                        "allgather_bytes_per_token": counter.bytes / new_tokens}
    same = torch.equal(outputs["naive"], outputs["hybrid"])
    same_all = torch.tensor([float(same)])
    tdist.all_reduce(same_all, op=tdist.ReduceOp.MIN)
    report |= {"speedup": report["naive"]["wall_s"] / report["hybrid"]["wall_s"],
               "allgather_bytes_ratio": report["naive"]["allgather_bytes_per_token"]
               / max(report["hybrid"]["allgather_bytes_per_token"], 1e-9),
               "same_tokens": bool(same_all.item()), "world_size": dist.world_size,
               "batch_size_per_rank": args.batch_size, "max_new_tokens": args.max_new_tokens,
               "dtype": args.dtype, "lora_dim": args.lora_dim}
    if args.compare_lora_layout:
        report["lora_layout"] = {key: compare_lora_layouts(args, dist, tok, enc, gen, only_lora)
                                 for key, only_lora in (("base_trains", False), ("lora_only", True))}
    if dist.is_main:
        text = json.dumps(report, indent=2)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
