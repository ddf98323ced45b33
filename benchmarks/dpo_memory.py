"""Peak memory and time per pair of a DPO step with each reference mode, on one model shape.

    OMP_NUM_THREADS=2 python benchmarks/dpo_memory.py --out docs/bench/dpo_memory.json

The reference log-probs come three ways (the DPO step's `--precompute_ref_logps` and LoRA): `copy`, a
frozen second copy of the model; `lora`, the policy with its LoRA adapters switched off; `precomputed`, one
no-grad pass before training whose log-probs go through the reference log-probs cache
(`engine.data.ref_logps`), after which no reference exists. The policy trains the same way in all three
(LoRA adapters only by default, so the reference is the only difference; `--train full` trains every
weight and skips `lora`). Each mode runs in a fresh process on a random-weight model
(`engine.bench.random_models`; default: Llama-2-7B scaled to 4 layers of hidden 512): one warm-up and
`--steps` timed steps of the reference log-probs, one forward and backward over the micro-batch's chosen
and rejected sequences concatenated, and an AdamW step. Reported per mode: the process's peak RSS, its
RSS once models and data are ready, on CUDA the peak allocated bytes, seconds per pair, every step's loss
(equal in all modes: the same numbers), and a census of every live `torch.nn.Module`'s parameters
and buffers (by storage): the bytes that are not the policy's are the reference's weights, measured.
Modes run interleaved `--repeats` times; the JSON keeps every run, the table the median time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's engine package
    sys.path.insert(0, str(ROOT))

MODES = ("copy", "lora", "precomputed")
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-2-7b", help="a shipped planner config, a model folder or 'tiny'")
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--intermediate_size", type=int, default=1376)
    p.add_argument("--num_heads", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch (2x as many sequences)")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--answer_len", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up")
    p.add_argument("--repeats", type=int, default=2, help="rounds of all modes, interleaved")
    p.add_argument("--train", choices=("lora", "full"), default="lora")
    p.add_argument("--lora_dim", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--cache_dir", default=None, help="random-weight model folders (default: the engine's cache)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def sequence_logprobs(model: Any, seqs: Any, answer_mask: Any) -> Any:
    """(2B,) summed log-probs of the answer tokens of each sequence (the prompt masked out)."""
    import torch

    from engine.models.lm_head import token_logprobs
    from engine.models.load import position_ids

    mask = torch.ones_like(seqs)
    logprobs, _ = token_logprobs(model, seqs, mask, position_ids(mask), None)
    return (logprobs * answer_mask).sum(-1)


def make_batch(args: argparse.Namespace, vocab: int, device: Any) -> tuple[Any, Any]:
    """(sequences (2B, T): B chosen then B rejected, sharing their prompts; answer mask (2B, T-1) on actions)."""
    import torch

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (args.pairs, args.prompt_len), generator=g)
    answers = torch.randint(3, vocab, (2 * args.pairs, args.answer_len), generator=g)
    seqs = torch.cat([prompts.repeat(2, 1), answers], dim=1)
    mask = torch.zeros(seqs.shape[0], seqs.shape[1] - 1)
    mask[:, args.prompt_len - 1:] = 1.0  # action t produced token t + 1: the answer starts at action P - 1
    return seqs.to(device), mask.to(device)


def adapters_off(model: Any):
    """The policy as the reference: its LoRA adapters switched off (a no-op context without LoRA)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def build(args: argparse.Namespace, mode: str, device: Any, dtype: Any) -> tuple[Any, Any, Any]:
    """(policy, optimizer, reference: a model, the policy for adapters-off, or None when precomputed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.bench.random_models import ensure_random_model, load_shape
    from engine.config import LoRAArgs
    from engine.models.lora import apply_lora
    from engine.runtime.atomic import cache_root

    config = load_shape(args.shape, num_layers=args.num_layers, hidden_size=args.hidden_size,
                        intermediate_size=args.intermediate_size, num_heads=args.num_heads)
    root = Path(args.cache_dir).expanduser() if args.cache_dir else cache_root() / "bench_models"
    folder = ensure_random_model(config, "actor", "fp32", 0, root)
    load = lambda: AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype).to(device)  # noqa: E731
    policy = load()
    if args.train == "lora":
        policy = apply_lora(policy, LoRAArgs(lora_dim=args.lora_dim, only_optimize_lora=True))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    reference = None
    if mode == "copy":
        reference = load().eval().requires_grad_(False)
    elif mode == "lora":
        reference = policy
    return policy, optimizer, reference


def precompute(policy: Any, seqs: Any, answer_mask: Any, path: Path) -> dict[str, Any]:
    """The reference pass before training (the policy before its first update, adapters off), through the
    cache: saved, then read back as training would."""
    import torch

    from engine.data import ref_logps

    pairs = seqs.shape[0] // 2
    with torch.no_grad(), adapters_off(policy):
        logps = sequence_logprobs(policy, seqs, answer_mask).float().cpu()
    ref_logps.save(path, logps[:pairs], logps[pairs:], {"what": "benchmarks/dpo_memory.py"})
    return ref_logps.load(path, num_rows=pairs)


def dpo_step(args, policy, optimizer, reference, cached, seqs, answer_mask) -> float:
    """One DPO step (engine.rl.dpo's sigmoid loss); returns its loss."""
    import torch

    from engine.rl.dpo import dpo_loss

    pairs = seqs.shape[0] // 2
    if cached is not None:
        ref = torch.cat([cached["chosen"], cached["rejected"]]).to(seqs.device)
    else:
        with torch.no_grad(), (adapters_off(reference) if reference is policy else contextlib.nullcontext()):
            ref = sequence_logprobs(reference, seqs, answer_mask)
    logps = sequence_logprobs(policy, seqs, answer_mask)
    loss, _ = dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], loss_type="sigmoid", beta=args.beta)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One mode in this process (see the module docstring for what is reported)."""
    import tempfile

    import torch

    from engine.bench.live_weights import live_weights

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    torch.manual_seed(0)
    rss_start = current_rss()
    policy, optimizer, reference = build(args, mode, device, dtype)
    seqs, answer_mask = make_batch(args, policy.config.vocab_size, device)
    cached = None
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "precomputed":
            cached = precompute(policy, seqs, answer_mask, Path(tmp) / "ref_logps.safetensors")
    census = live_weights(policy)  # engine.bench.live_weights: every live module's weights, by storage
    rss_ready = current_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = [dpo_step(args, policy, optimizer, reference, cached, seqs, answer_mask)]  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(dpo_step(args, policy, optimizer, reference, cached, seqs, answer_mask))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"mode": mode, "losses": losses, "s_per_pair": statistics.median(times) / args.pairs,
            "step_s": times, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB,
            "rss_start_mib": rss_start / MiB, "rss_ready_mib": rss_ready / MiB,
            "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / MiB if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            **census}


def planned_reference_bytes(args: argparse.Namespace) -> dict[str, float]:
    """The planner's reference parameter bytes per mode (engine.planner.dpo), for the same shape and dtype."""
    import torch

    from engine.bench.random_models import load_shape
    from engine.planner.dpo import DPOKnobs, DPOWorkload, dpo_role_states
    from engine.planner.shapes import model_shape_of

    config = load_shape(args.shape, num_layers=args.num_layers, hidden_size=args.hidden_size,
                        intermediate_size=args.intermediate_size, num_heads=args.num_heads)
    shape, tokens = model_shape_of(config), args.prompt_len + args.answer_len
    dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    lora = {"lora_dim": args.lora_dim, "only_optimize_lora": True} if args.train == "lora" else {}
    out = {}
    for mode in MODES:  # the copy is what the policy has no adapters-off rule for (adapter_reference False)
        work = DPOWorkload(shape, tokens, adapter_reference=mode != "copy")
        knobs = DPOKnobs(dtype=dtype, precompute_ref_logps=mode == "precomputed", **lora)
        ref = dpo_role_states(work, knobs).get("reference", {}).get("parameters")
        out[mode] = 0.0 if ref is None else ref.gpu + ref.cpu
    return out


def run_child(argv: list[str], mode: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", mode], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]], modes: list[str], planned: dict[str, float]) -> str:
    lines = ["| reference | weights not the policy's (MiB) | planner's reference (MiB) | models | RSS ready (MiB) "
             "| peak RSS (MiB) | CUDA peak (MiB) | s per pair (median) | last loss |", "|---" * 9 + "|"]
    for mode in modes:
        runs = [r for r in rows if r["mode"] == mode]
        cuda = "-" if runs[0]["cuda_max_allocated_mib"] is None else \
            f"{max(r['cuda_max_allocated_mib'] for r in runs):.0f}"
        lines.append(f"| {mode} | {runs[0]['non_policy_bytes'] / MiB:.1f} | {planned[mode] / MiB:.1f} | "
                     f"{runs[0]['models_with_weights']} | "
                     f"{max(r['rss_ready_mib'] for r in runs):.0f} | {max(r['peak_rss_mib'] for r in runs):.0f} | "
                     f"{cuda} | {statistics.median(r['s_per_pair'] for r in runs):.4f} | {runs[0]['losses'][-1]:.6f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if args.train == "full":
        modes = [m for m in modes if m != "lora"]  # no adapters to switch off
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    argv = [a for a in sys.argv[1:] if a not in ("--out", str(args.out))]
    load_before = os.getloadavg()
    rows = [run_child(argv, mode) for _ in range(args.repeats) for mode in modes]
    import peft
    import torch
    import transformers

    result = {"command": " ".join(["python", "benchmarks/dpo_memory.py", *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__},
              "load_average": {"before": load_before, "after": os.getloadavg()}, "cpus": os.cpu_count(),
              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "args": vars(args) | {"out": str(args.out)},
              "rows": rows}
    planned = planned_reference_bytes(args)
    result["planner_reference_bytes"] = planned
    print(table(rows, modes, planned))
    if "precomputed" in modes and any(r["non_policy_bytes"] for r in rows if r["mode"] == "precomputed"):
        sys.exit("the precomputed mode holds weights besides the policy's")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
