"""Step 2, the DPO alternative to steps 2 + 3: train the step-1 model directly on (prompt, chosen, rejected)
pairs against a frozen reference (no reward model, no generation, no critic).

    # the built-in tiny model on the bundled sorting pairs, one process
    python step2_dpo/main.py --output_dir output/step2_dpo
    # from a step-1 output, 2 ranks (GPUs, or CPU processes on gloo), ZeRO-3, LoRA; the reference is the
    # policy with its adapters switched off (no second copy)
    deepspeed --num_gpus 2 step2_dpo/main.py --model_name_or_path output/step1_sft --zero_stage 3 \\
        --lora_dim 8 --only_optimize_lora --output_dir output/step2_dpo
    # the reference's log-probs computed once before training, then no reference in memory
    deepspeed --num_gpus 2 step2_dpo/main.py --model_name_or_path output/step1_sft --precompute_ref_logps

Writes a Hugging Face causal-LM folder to --output_dir (LoRA fused; `AutoModelForCausalLM.from_pretrained`
loads it as is), with metrics.jsonl (TRL's names: rewards/chosen, rewards/accuracies, logps/chosen, ...),
curves.png and config.yaml. docs/step2_dpo.md has the losses, the reference modes and the flags.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from tqdm import tqdm

from engine.config import DPOConfig
from engine.data.pairs import collate_dpo_pairs, dpo_cache_path, load_dpo_pair_data
from engine.dpo import reference as ref
from engine.dpo.logps import pair_logps
from engine.dpo.trainer import MetricSums, batch_loss, evaluate
from engine.flags import parse_config, save_config_yaml
from engine.models.load import load_causal_lm
from engine.models.lora import apply_lora
from engine.observe import startup
from engine.observe.metrics import plot_curves
from engine.observe.perf import StepTimer, peak_memory_gb, train_throughput
from engine.rl.batch_mean import mean_normaliser
from engine.runtime import faults
from engine.runtime.bad_steps import BadStepGuard, optimizer_metrics
from engine.runtime.checkpoint import save_hf_folder
from engine.runtime.distributed import all_reduce_sum
from engine.runtime.engines import init_trained_engine
from engine.runtime.entry import run_main
from engine.runtime.run import (
    RunContext,
    Schedule,
    epoch_start,
    epoch_windows,
    prepare_step,
    save_checkpoint,
    start_run,
    to_device,
)

logger = logging.getLogger("engine")


def main(argv: Sequence[str] | None = None) -> None:
    startup.begin()
    cfg = parse_config(DPOConfig, argv, description=__doc__)
    # Output folder, ranks, DeepSpeed config, tokenizer and data first: bad input fails before anything is written.
    inputs = prepare_step(cfg, load_dpo_pair_data, collate_dpo_pairs, role="sft",
                          fit=fit_to_machine if cfg.dpo.auto_fit else None)
    cfg = inputs.cfg
    out, dist, ds_config, zero_stage = inputs.out, inputs.dist, inputs.ds_config, inputs.zero_stage
    tokenizer, model_path, schedule = inputs.tokenizer, inputs.model_path, inputs.schedule
    train_loader, eval_loader = inputs.train_loader, inputs.eval_loader

    # Policy (the starting model, + LoRA), optimizer, DeepSpeed; then the reference, held as the flags say.
    with startup.part("model"):
        model = load_causal_lm(model_path, cfg.model, tokenizer, cfg.ds.dtype, ds_config,
                               cfg.ds.gradient_checkpointing, role="sft")
        if cfg.lora.lora_dim > 0:
            model = apply_lora(model, cfg.lora)
        engine = init_trained_engine(model, ds_config, train=cfg.train, lora=cfg.lora, ds=cfg.ds,
                                     total_steps=schedule.total_steps)
        reference = build_reference(cfg, engine, model_path, tokenizer, dist, inputs)

    # Resume or start.
    position, metrics = start_run(cfg, engine, out, dist)
    logger.info("training %d steps (%d per epoch), %d ranks, ZeRO-%d, %s loss, reference: %s", schedule.total_steps,
                schedule.steps_per_epoch, dist.world_size, zero_stage, cfg.dpo.dpo_loss, reference.mode)
    run = RunContext(cfg, engine, tokenizer, dist, out, zero_stage, metrics)
    if position["global_step"] == 0:
        with startup.part("first_eval"):
            metrics.log(0, run_eval(run, reference, eval_loader))

    stopped = train(run, reference, train_loader, eval_loader, schedule, position)

    final = run_eval(run, reference, eval_loader)
    if not interval_eval_due(cfg, position["global_step"]):  # else this step's evaluation is logged already
        metrics.log(position["global_step"], final)
    save_hf_folder(engine.module, tokenizer, out, zero_stage, dist,
                   extra=lambda folder: save_config_yaml(cfg, folder / "config.yaml"))
    metrics.close()
    if dist.is_main:
        plot_curves(out / "metrics.jsonl", out / "curves.png",
                    ["train/loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies",
                     "eval/rewards/margins", "eval/loss"], title="Step 2: DPO")
        logger.info("done%s: eval rewards/accuracies %.3f, margin %.3f; model in %s",
                    " (stopped by --test_stop_step)" if stopped else "", final["eval/rewards/accuracies"],
                    final["eval/rewards/margins"], out)


def fit_to_machine(cfg: DPOConfig, dist, model_path: str) -> DPOConfig:
    """--auto_fit: the planner's cheapest memory settings for this machine (flags the user set are kept)."""
    from transformers import AutoConfig

    from engine.planner.dpo import plan_dpo
    from engine.planner.step3 import this_machine

    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    # --reference_model copy rules out the policy without adapters as the reference; auto and adapters_off allow it.
    fitted, message = plan_dpo(cfg, this_machine(dist.world_size), model_config,
                               adapter_reference=cfg.dpo.reference_model != "copy")
    logger.info("%s", message)
    return fitted


def build_reference(cfg: DPOConfig, engine, model_path: str, tokenizer, dist, inputs) -> ref.Reference:
    """The reference as `cfg.reference_mode` and --precompute_ref_logps say (engine.dpo.reference)."""
    chunk = cfg.ds.logprob_chunk_size
    mode = cfg.reference_mode
    if mode == "none":
        return ref.Reference("none", chunk)
    copy = ref.load_reference_copy(cfg, model_path, tokenizer, dist) if mode == "copy" else None
    source = ref.Reference(mode, chunk, model=copy, policy=engine)
    if not cfg.dpo.precompute_ref_logps:
        return source
    data_cache = dpo_cache_path(cfg.data, tokenizer, inputs.cache_dir, cfg.train.seed)
    paths = ref.cache_paths(cfg, model_path, tokenizer, data_cache)
    datasets = {"train": inputs.train_loader.dataset, "eval": inputs.eval_loader.dataset}
    precomputed = ref.precomputed_reference(cfg, source, paths, datasets, tokenizer.pad_token_id, dist)
    if copy is not None:
        source.model = None
        ref.release(copy)
    return precomputed


def run_eval(run: RunContext, reference: ref.Reference, loader) -> dict[str, float]:
    cfg = run.cfg
    return evaluate(run.engine, reference, loader, cfg.dpo, run.dist.device, cfg.ds.logprob_chunk_size,
                    cfg.train.eval_iters)


def interval_eval_due(cfg: DPOConfig, step: int) -> bool:
    return bool(cfg.train.eval_interval) and step % cfg.train.eval_interval == 0


def train(run: RunContext, reference: ref.Reference, train_loader, eval_loader, schedule: Schedule,
          position: dict[str, int]) -> bool:
    """The DPO loop; returns True when --test_stop_step ended it early."""
    cfg, engine, dist = run.cfg, run.engine, run.dist
    accum = cfg.train.gradient_accumulation_steps
    step = position["global_step"]
    guard = BadStepGuard(cfg.fault.max_bad_steps, last_checkpoint=step or None)  # a resumed run starts at one
    engine.train()  # from_pretrained returns a model in eval mode: dropout would be off
    bar = tqdm(total=schedule.total_steps, initial=step, disable=not dist.is_main or cfg.log.disable_tqdm,
               desc="step 2 DPO")
    for epoch in range(position["epoch"], cfg.train.num_train_epochs):
        first, consumed = epoch_start(position, epoch)
        for step_in_epoch, (samples, window) in enumerate(epoch_windows(train_loader, epoch, consumed, accum),
                                                          start=first):
            row = train_step(run, reference, window, step + 1, guard)
            step += 1
            position.update(epoch=epoch, step_in_epoch=step_in_epoch + 1, samples_in_epoch=samples, global_step=step)
            row |= {"train/lr": engine.get_lr()[0], "train/epoch": epoch} | startup.first_step_done(dist.is_main)
            if interval_eval_due(cfg, step):
                row |= run_eval(run, reference, eval_loader)
            if step % cfg.log.print_interval == 0 or step == schedule.total_steps:
                logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
            run.metrics.log(step, row)
            guard.check(step)
            bar.update(1)
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", acc=f"{row['rewards/accuracies']:.3f}")
            if cfg.log.save_interval and step % cfg.log.save_interval == 0 and guard.save_allowed(step):
                save_checkpoint(run, engine.module, step, dict(position))
            if cfg.train.test_stop_step and step >= cfg.train.test_stop_step:
                bar.close()
                return True
        # After each epoch (the last one's evaluation is the final one, in main).
        if epoch + 1 < cfg.train.num_train_epochs and not interval_eval_due(cfg, step):
            run.metrics.log(step, run_eval(run, reference, eval_loader))
    bar.close()
    return False


def train_step(run: RunContext, reference: ref.Reference, batches: list[dict], step: int,
               guard: BadStepGuard) -> dict[str, float]:
    """One optimizer step over the accumulation window: the update and the logged metrics are means over the
    window's pairs on all ranks (engine.rl.batch_mean), whatever the split into micro-batches. A NaN or inf
    loss or log-prob on any rank, or an update the optimizer skipped, is a bad step for `guard`."""
    cfg, engine, dist = run.cfg, run.engine, run.dist
    timer = StepTimer()
    timer.start()
    window_pairs = all_reduce_sum([float(sum(b["input_ids"].shape[0] // 2 for b in batches))], dist.device)[0]
    normaliser = mean_normaliser(window_pairs, len(batches), dist.world_size)
    sums, width = MetricSums(), 0
    for batch in batches:
        batch = to_device(batch, dist.device)
        ref_logps = reference.logps(batch, "train")  # before the policy's forward: its graph stays alone
        policy = pair_logps(engine, batch, cfg.ds.logprob_chunk_size)
        loss, stats = batch_loss(policy, ref_logps, cfg.dpo, pair_count=normaliser)
        loss = faults.poison(loss, step)
        nll = float(stats["nll_loss"]) * normaliser if "nll_loss" in stats else 0.0
        sums.add(float(loss.detach()) * normaliser, stats, nll)
        engine.backward(loss)
        faults.mid_step(step)
        engine.step()  # DeepSpeed only updates at the accumulation boundary
        width = max(width, batch["input_ids"].shape[1])
    step_time = timer.stop()
    if cfg.log.print_loss:
        logger.warning("rank %d step %d loss %.4f", dist.rank, step, sums.sums["loss"] / max(sums.sums["pairs"], 1))
    row, nonfinite = sums.reduce(dist.device)
    row = {"train/loss" if k == "loss" else k: v for k, v in row.items()}
    if nonfinite:
        row["train/loss"] = math.nan  # `null` in metrics.jsonl
    # The optimizer's overflow check is over all ranks, so every rank sees the same skip.
    row |= guard.record(step, nonfinite=nonfinite, skipped=not engine.was_step_applied(), what="log-probs or loss")
    row |= optimizer_metrics(engine, "train/", fp16=cfg.ds.dtype == "fp16")
    per_device_batch = 2 * len(batches) * cfg.train.per_device_train_batch_size  # chosen + rejected
    row |= train_throughput(step_time_s=step_time, per_device_batch=per_device_batch, world_size=dist.world_size,
                            seq_length=width, hf_config=engine.module.config,
                            gradient_checkpointing=cfg.ds.gradient_checkpointing, lora_dim=cfg.lora.lora_dim)
    row["memory/peak_gb"] = peak_memory_gb(dist.device)
    return row


if __name__ == "__main__":
    run_main(main)
