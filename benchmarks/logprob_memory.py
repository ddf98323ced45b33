"""Peak memory of log-probs against vocabulary size: full logits (--logprob_chunk_size 0) against chunks
(the automatic default), for step 1's loss, the PPO actor loss (log-probs and entropy, forward and backward)
and experience log-probs (no grad).

    OMP_NUM_THREADS=1 python benchmarks/logprob_memory.py --out docs/bench/logprob_memory.json

Each measurement runs in a fresh process on a 1-layer Llama (hidden 64) in fp32 on the CPU: the figure is
the process's peak RSS (ru_maxrss) minus its RSS just before the measured call, so model, data and imports
are left out and what remains is the transient memory of the call, dominated by the vocabulary-wide tensors.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

VOCABS = (32768, 131072, 151936)  # Llama-2 (32k), Llama-3 (128k), Qwen2 (152k)
MODES = ("sft", "ppo", "experience")
CHUNKS = ("0", "auto")
MiB = 2 ** 20


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(vocab: int, mode: str, chunk: str, batch: int, tokens: int) -> dict:
    """Run one call in this process; returns its peak extra RSS in MiB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.models.lm_head import lm_loss, token_logprobs
    from engine.models.load import position_ids
    from engine.rl.chunked import resolve_chunk_size
    from engine.rl.ppo import policy_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    seqs = torch.randint(0, vocab, (batch, tokens))
    mask = torch.ones_like(seqs)
    size = None if chunk == "auto" else int(chunk)
    before = current_rss()
    if mode == "sft":
        loss, _ = lm_loss(model, {"input_ids": seqs, "attention_mask": mask, "labels": seqs}, size, fp32=True)
        loss.backward()
    elif mode == "ppo":
        logprobs, entropy = token_logprobs(model, seqs, mask, position_ids(mask), size, with_entropy=True)
        action_mask = torch.ones_like(logprobs)
        loss, _ = policy_loss(logprobs, logprobs.detach(), torch.ones_like(logprobs), action_mask, cliprange=0.2)
        (loss - 0.01 * entropy.mean()).backward()
    else:
        with torch.no_grad():
            token_logprobs(model, seqs, mask, position_ids(mask), size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"vocab": vocab, "mode": mode, "chunk": chunk,
            "chunk_positions": resolve_chunk_size(size, batch, vocab) or tokens,
            "peak_extra_mib": round(max(peak - before, 0) / MiB, 1)}


def run_child(vocab: int, mode: str, chunk: str, batch: int, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(vocab), mode, chunk, "--batch", str(batch), "--tokens", str(tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| vocabulary | phase | full logits (MiB) | chunked (MiB) | chunk (positions) | ratio |",
             "|---|---|---|---|---|---|"]
    for vocab in VOCABS:
        for mode in MODES:
            full = next(r for r in rows if (r["vocab"], r["mode"], r["chunk"]) == (vocab, mode, "0"))
            auto = next(r for r in rows if (r["vocab"], r["mode"], r["chunk"]) == (vocab, mode, "auto"))
            ratio = full["peak_extra_mib"] / max(auto["peak_extra_mib"], 0.1)
            lines.append(f"| {vocab} | {mode} | {full['peak_extra_mib']:.0f} | {auto['peak_extra_mib']:.0f} | "
                         f"{auto['chunk_positions']} | {ratio:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("VOCAB", "MODE", "CHUNK"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2, help="Sequences per call.")
    parser.add_argument("--tokens", type=int, default=512, help="Tokens per sequence.")
    parser.add_argument("--out", type=Path, default=None, help="Write the JSON here.")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1], args.child[2], args.batch, args.tokens)))
        return
    import torch
    import transformers

    rows = [run_child(v, m, c, args.batch, args.tokens) for v in VOCABS for m in MODES for c in CHUNKS]
    result = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__},
              "machine": platform.machine(), "batch": args.batch, "tokens": args.tokens, "rows": rows}
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
