"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen answer.

    # the built-in tiny model on the bundled sorting task, one process
    python step1_sft/main.py --output_dir output/step1_sft
    # 2 ranks (GPUs, or CPU processes on gloo when there is no GPU), ZeRO-3 with offload, LoRA
    deepspeed --num_gpus 2 step1_sft/main.py --model_name_or_path ./my-model --data_path ./data.jsonl \\
        --zero_stage 3 --offload --lora_dim 8 --gradient_checkpointing --dtype bf16 \\
        --output_dir output/step1_sft
    # the same with torchrun
    torchrun --nproc_per_node 2 step1_sft/main.py --model_name_or_path ./my-model --data_path ./data.jsonl

Writes a Hugging Face folder to --output_dir, with metrics.jsonl, curves.png and the resolved
config.yaml.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from tqdm import tqdm

from engine.config import Step1Config
from engine.data.sft import collate_right_padded, load_sft_data
from engine.eval.lm import evaluate_lm
from engine.flags import parse_config, save_config_yaml
from engine.models.lm_head import lm_loss
from engine.models.load import load_causal_lm
from engine.models.lora import apply_lora
from engine.observe import startup
from engine.observe.metrics import plot_curves
from engine.observe.perf import StepTimer, peak_memory_gb, train_throughput
from engine.rl.batch_mean import mean_normaliser
from engine.rl.lm_loss import label_count
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
    cfg = parse_config(Step1Config, argv, description=__doc__)
    # Output folder, ranks, DeepSpeed config, tokenizer and data first: bad input fails before anything is written.
    inputs = prepare_step(cfg, load_sft_data, collate_right_padded, role="sft")
    out, dist, ds_config, zero_stage = inputs.out, inputs.dist, inputs.ds_config, inputs.zero_stage
    tokenizer, model_path, schedule = inputs.tokenizer, inputs.model_path, inputs.schedule
    train_loader, eval_loader = inputs.train_loader, inputs.eval_loader

    # Model, LoRA, optimizer, DeepSpeed.
    with startup.part("model"):
        model = load_causal_lm(model_path, cfg.model, tokenizer, cfg.ds.dtype, ds_config,
                               cfg.ds.gradient_checkpointing, role="sft")
        if cfg.lora.lora_dim > 0:
            model = apply_lora(model, cfg.lora)
        engine = init_trained_engine(model, ds_config, train=cfg.train, lora=cfg.lora, ds=cfg.ds,
                                     total_steps=schedule.total_steps)

    # Resume or start.
    position, metrics = start_run(cfg, engine, out, dist, samples_per_step=cfg.train.per_device_train_batch_size
                                  * cfg.train.gradient_accumulation_steps)
    logger.info("training %d steps (%d per epoch), %d ranks, ZeRO-%d", schedule.total_steps,
                schedule.steps_per_epoch, dist.world_size, zero_stage)
    if position["global_step"] == 0:
        with startup.part("first_eval"):
            metrics.log(0, evaluate_lm(engine, eval_loader, dist.device, cfg.ds))

    run = RunContext(cfg, engine, tokenizer, dist, out, zero_stage, metrics)
    stopped = train(run, train_loader, eval_loader, schedule, position)

    save_hf_folder(engine.module, tokenizer, out, zero_stage, dist,
                   extra=lambda folder: save_config_yaml(cfg, folder / "config.yaml"))
    metrics.close()
    if dist.is_main:
        plot_curves(out / "metrics.jsonl", out / "curves.png",
                    ["train/loss", "eval/loss", "eval/perplexity"], title="Step 1: SFT")
        logger.info("done%s; model in %s", " (stopped by --test_stop_step)" if stopped else "", out)


def train(run: RunContext, train_loader, eval_loader, schedule: Schedule, position: dict[str, int]) -> bool:
    """The SFT loop; returns True when --test_stop_step ended it early."""
    cfg, engine, dist = run.cfg, run.engine, run.dist
    accum = cfg.train.gradient_accumulation_steps
    step = position["global_step"]
    guard = BadStepGuard(cfg.fault.max_bad_steps, last_checkpoint=step or None)  # a resumed run starts at one
    engine.train()  # from_pretrained returns a model in eval mode: dropout would be off
    bar = tqdm(total=schedule.total_steps, initial=step, disable=not dist.is_main or cfg.log.disable_tqdm,
               desc="step 1 SFT")
    for epoch in range(position["epoch"], cfg.train.num_train_epochs):
        first, consumed = epoch_start(position, epoch)
        for step_in_epoch, (samples, window) in enumerate(epoch_windows(train_loader, epoch, consumed, accum),
                                                          start=first):
            row = train_step(run, window, step + 1, guard)
            step += 1
            row |= {"train/lr": engine.get_lr()[0], "train/epoch": epoch} | startup.first_step_done(dist.is_main)
            if step % cfg.log.print_interval == 0 or step == schedule.total_steps:
                logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
            run.metrics.log(step, row)
            guard.check(step)
            bar.update(1)
            bar.set_postfix(loss=f"{row['train/loss']:.4f}")
            if cfg.log.save_interval and step % cfg.log.save_interval == 0 and guard.save_allowed(step):
                position = {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "samples_in_epoch": samples,
                            "global_step": step}
                save_checkpoint(run, engine.module, step, position)
            if cfg.train.test_stop_step and step >= cfg.train.test_stop_step:
                bar.close()
                return True
        run.metrics.log(step, evaluate_lm(engine, eval_loader, dist.device, cfg.ds))
    bar.close()
    return False


def train_step(run: RunContext, batches: list[dict], step: int, guard: BadStepGuard) -> dict[str, float]:
    """Optimizer step `step` over `batches` (the accumulation window). The update and the logged loss are
    the token mean over the window's labelled tokens on all ranks, however the batch is split into
    micro-batches and ranks (DeepSpeed-Chat used each micro-batch's own mean). A NaN or inf loss on any
    rank, or an update the optimizer skipped, is a bad step for `guard`."""
    cfg, engine, dist = run.cfg, run.engine, run.dist
    timer = StepTimer()
    timer.start()
    # Each micro-batch's summed loss over the global count per micro-batch: DeepSpeed's mean over the
    # window's micro-batches (len(batches) = --gradient_accumulation_steps, what engine.backward divides by)
    # and the ranks then gives the global token mean (engine.rl.batch_mean).
    window_tokens = all_reduce_sum([float(sum(label_count(b["labels"]) for b in batches))], dist.device)[0]
    normaliser = mean_normaliser(window_tokens, len(batches), dist.world_size)
    loss_sum, tokens, nonfinite, width = 0.0, 0.0, 0.0, 0
    for batch in batches:
        batch = to_device(batch, dist.device)
        loss, stats = lm_loss(engine, batch, cfg.ds.logprob_chunk_size, cfg.ds.compute_fp32_loss, normaliser)
        loss = faults.poison(loss, step)
        engine.backward(loss)
        faults.mid_step(step)
        engine.step()  # DeepSpeed only updates at the accumulation boundary
        loss_sum, tokens = loss_sum + float(stats["loss_sum"]), tokens + float(stats["tokens"])
        nonfinite += float(not math.isfinite(float(loss.detach())))
        width = max(width, batch["input_ids"].shape[1])
    step_time = timer.stop()
    if cfg.log.print_loss:
        logger.warning("rank %d loss %.4f", dist.rank, loss_sum / max(tokens, 1.0))
    loss_sum, tokens, nonfinite = all_reduce_sum([loss_sum, tokens, nonfinite], dist.device)
    row = {"train/loss": math.nan if nonfinite else loss_sum / max(tokens, 1.0)}  # NaN: `null` in metrics.jsonl
    # The optimizer's overflow check is over all ranks, so every rank sees the same skip.
    row |= guard.record(step, nonfinite=bool(nonfinite), skipped=not engine.was_step_applied(), what="loss")
    row |= optimizer_metrics(engine, "train/", fp16=cfg.ds.dtype == "fp16")
    per_device_batch = len(batches) * cfg.train.per_device_train_batch_size
    row |= train_throughput(step_time_s=step_time, per_device_batch=per_device_batch,
                            world_size=dist.world_size, seq_length=width, hf_config=engine.module.config,
                            gradient_checkpointing=cfg.ds.gradient_checkpointing, lora_dim=cfg.lora.lora_dim)
    row["memory/peak_gb"] = peak_memory_gb(dist.device)
    return row


if __name__ == "__main__":
    run_main(main)
