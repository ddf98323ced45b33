"""Step 2: train a reward model on (prompt, chosen, rejected) pairs.

    # the built-in tiny model on the bundled sorting task, one process
    python step2_reward/main.py --output_dir output/step2_reward
    # from a step-1 output, 2 ranks (GPUs, or CPU processes on gloo), ZeRO-3
    deepspeed --num_gpus 2 step2_reward/main.py --model_name_or_path output/step1_sft --zero_stage 3 \\
        --output_dir output/step2_reward

Writes a Hugging Face folder (a *ForSequenceClassification model, num_labels 1) to --output_dir
that step 3 loads as critic and reward model and `AutoModelForSequenceClassification.from_pretrained`
loads as is, plus reward_stats.json (score mean and std on the eval set), metrics.jsonl, curves.png
and config.yaml.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from engine.config import Step2Config
from engine.data.pairs import collate_pairs, load_pair_data
from engine.flags import parse_config, save_config_yaml
from engine.models.load import hf_model
from engine.models.reward_model import add_lora, load_reward_model
from engine.observe import startup
from engine.observe.metrics import plot_curves
from engine.observe.perf import StepTimer, peak_memory_gb, train_throughput
from engine.rl.batch_mean import mean_normaliser
from engine.rl.reward import end_scores, reward_loss
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
    cfg = parse_config(Step2Config, argv, description=__doc__)
    # Output folder, ranks, DeepSpeed config, tokenizer and data first: bad input fails before anything is written.
    inputs = prepare_step(cfg, load_pair_data, collate_pairs, role="reward")
    out, dist, ds_config, zero_stage = inputs.out, inputs.dist, inputs.ds_config, inputs.zero_stage
    tokenizer, model_path, schedule = inputs.tokenizer, inputs.model_path, inputs.schedule
    train_loader, eval_loader = inputs.train_loader, inputs.eval_loader

    # Reward model (value head on the base transformer), LoRA, optimizer, DeepSpeed.
    with startup.part("model"):
        model = load_reward_model(model_path, cfg.model, tokenizer, cfg.ds.dtype, ds_config,
                                  cfg.ds.gradient_checkpointing, role="reward")
        if cfg.lora.lora_dim > 0:
            model = add_lora(model, cfg.lora)
        engine = init_trained_engine(model, ds_config, train=cfg.train, lora=cfg.lora, ds=cfg.ds,
                                     total_steps=schedule.total_steps)

    # Resume or start.
    position, metrics = start_run(cfg, engine, out, dist, samples_per_step=cfg.train.per_device_train_batch_size
                                  * cfg.train.gradient_accumulation_steps)
    logger.info("training %d steps (%d per epoch), %d ranks, ZeRO-%d, %s loss", schedule.total_steps,
                schedule.steps_per_epoch, dist.world_size, zero_stage, cfg.reward.rm_loss)
    run = RunContext(cfg, engine, tokenizer, dist, out, zero_stage, metrics)
    if position["global_step"] == 0:
        with startup.part("first_eval"):
            metrics.log(0, evaluate(run, eval_loader))

    if train(run, train_loader, eval_loader, schedule, position) is not None:
        logger.info("stopped by --test_stop_step at step %d", position["global_step"])

    final = evaluate(run, eval_loader)
    if not interval_eval_due(cfg, position["global_step"]):  # else this step's evaluation is logged already
        metrics.log(position["global_step"], final)
    stats = {"score_mean": final["eval/score_mean"], "score_std": final["eval/score_std"],
             "reward_accuracy": final["eval/reward_accuracy"], "eval_pairs": final["eval/pairs"]}

    def extra(folder: Path) -> None:
        save_config_yaml(cfg, folder / "config.yaml")
        (folder / "reward_stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    save_hf_folder(engine.module.model, tokenizer, out, zero_stage, dist, extra=extra)
    metrics.close()
    if dist.is_main:
        plot_curves(out / "metrics.jsonl", out / "curves.png",
                    ["train/loss", "train/accuracy", "eval/reward_accuracy", "eval/score_margin"],
                    title="Step 2: reward model")
        logger.info("done: eval reward accuracy %.3f; model in %s", stats["reward_accuracy"], out)


def train(run: RunContext, train_loader, eval_loader, schedule: Schedule, position: dict[str, int]) -> int | None:
    """The reward-model loop; returns the step at which --test_stop_step ended it, else None."""
    cfg, engine, dist = run.cfg, run.engine, run.dist
    accum = cfg.train.gradient_accumulation_steps
    step = position["global_step"]
    guard = BadStepGuard(cfg.fault.max_bad_steps, last_checkpoint=step or None)  # a resumed run starts at one
    engine.train()
    bar = tqdm(total=schedule.total_steps, initial=step, disable=not dist.is_main or cfg.log.disable_tqdm,
               desc="step 2 RM")
    for epoch in range(position["epoch"], cfg.train.num_train_epochs):
        first, consumed = epoch_start(position, epoch)
        for step_in_epoch, (samples, window) in enumerate(epoch_windows(train_loader, epoch, consumed, accum),
                                                          start=first):
            row = train_step(run, window, step + 1, guard)
            step += 1
            position.update(epoch=epoch, step_in_epoch=step_in_epoch + 1, samples_in_epoch=samples, global_step=step)
            row |= {"train/lr": engine.get_lr()[0], "train/epoch": epoch} | startup.first_step_done(dist.is_main)
            if interval_eval_due(cfg, step):
                row |= evaluate(run, eval_loader)
            if step % cfg.log.print_interval == 0 or step == schedule.total_steps:
                logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
            run.metrics.log(step, row)
            guard.check(step)
            bar.update(1)
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", acc=f"{row['train/accuracy']:.3f}")
            if cfg.log.save_interval and step % cfg.log.save_interval == 0 and guard.save_allowed(step):
                save_checkpoint(run, engine.module.model, step, dict(position))
            if cfg.train.test_stop_step and step >= cfg.train.test_stop_step:
                bar.close()
                return step
        # After each epoch (the last one's evaluation is the final one, in main).
        if epoch + 1 < cfg.train.num_train_epochs and not interval_eval_due(cfg, step):
            run.metrics.log(step, evaluate(run, eval_loader))
    bar.close()
    return None


def interval_eval_due(cfg: Step2Config, step: int) -> bool:
    return bool(cfg.train.eval_interval) and step % cfg.train.eval_interval == 0


def train_step(run: RunContext, batches: list[dict], step: int, guard: BadStepGuard) -> dict[str, float]:
    """One optimizer step over the accumulation window. The update and the logged loss and accuracy are
    means over the window's pairs on all ranks: a window can hold fewer pairs in its last micro-batch (the
    loader keeps a short last batch), where DeepSpeed-Chat's mean of micro-batch means would weigh those
    pairs more. A NaN or inf score or loss on any rank, or an update the optimizer skipped, is a bad step
    for `guard`."""
    cfg, engine, dist = run.cfg, run.engine, run.dist
    timer = StepTimer()
    timer.start()
    # Each micro-batch's summed loss over the global pair count per micro-batch: DeepSpeed's mean over the
    # window's micro-batches and the ranks then gives the mean over the global batch's pairs (engine.rl.batch_mean).
    window_pairs = all_reduce_sum([float(sum(b["input_ids"].shape[0] // 2 for b in batches))], dist.device)[0]
    normaliser = mean_normaliser(window_pairs, len(batches), dist.world_size)
    sums = torch.zeros(4, dtype=torch.float64)  # summed loss, correct pairs, pairs, non-finite flag
    width = 0
    for batch in batches:
        batch = to_device(batch, dist.device)
        values = faults.poison(engine(batch["input_ids"], batch["attention_mask"]), step)
        loss, stats = reward_loss(values, batch["input_ids"], batch["attention_mask"], cfg.reward.rm_loss,
                                  cfg.reward.rm_margin, cfg.reward.rm_l2_coef, pair_count=normaliser)
        nonfinite = not (torch.isfinite(values).all() and torch.isfinite(loss))  # an inf score can give a finite loss
        n_pairs = values.shape[0] // 2
        sums += torch.tensor([float(loss.detach()) * normaliser, float(stats["accuracy"]) * n_pairs, n_pairs,
                              float(nonfinite)], dtype=torch.float64)
        engine.backward(loss)
        faults.mid_step(step)
        engine.step()
        width = max(width, batch["input_ids"].shape[1])
    step_time = timer.stop()
    if cfg.log.print_loss:
        logger.warning("rank %d step %d loss %.4f", dist.rank, step, float(sums[0] / sums[2]))
    loss_sum, correct, pairs, nonfinite = all_reduce_sum(sums.tolist(), dist.device)
    row = {"train/loss": loss_sum / pairs, "train/accuracy": correct / pairs}
    # The optimizer's overflow check is over all ranks, so every rank sees the same skip.
    row |= guard.record(step, nonfinite=bool(nonfinite), skipped=not engine.was_step_applied(),
                        what="scores or loss")
    row |= optimizer_metrics(engine, "train/", fp16=cfg.ds.dtype == "fp16")
    per_device_batch = 2 * len(batches) * cfg.train.per_device_train_batch_size  # chosen + rejected
    row |= train_throughput(step_time_s=step_time, per_device_batch=per_device_batch,
                            world_size=dist.world_size, seq_length=width,
                            hf_config=hf_model(engine.module.model).config,
                            gradient_checkpointing=cfg.ds.gradient_checkpointing, lora_dim=cfg.lora.lora_dim)
    row["memory/peak_gb"] = peak_memory_gb(dist.device)
    return row


@torch.no_grad()
def evaluate(run: RunContext, loader) -> dict[str, float]:
    """Pairwise accuracy and score statistics over at most --eval_iters batches per rank, all ranks."""
    engine, dist = run.engine, run.dist
    engine.eval()
    # pairs, correct, sum chosen, sum rejected, score count, score sum, score sum of squares
    sums = torch.zeros(7, dtype=torch.float64)
    for i, batch in enumerate(loader):
        if i >= run.cfg.train.eval_iters:
            break
        batch = to_device(batch, dist.device)
        scores = end_scores(engine(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]).double().cpu()
        b = scores.shape[0] // 2
        c, r = scores[:b], scores[b:]
        sums += torch.stack([torch.tensor(float(b)), (c > r).sum().double(), c.sum(), r.sum(),
                             torch.tensor(float(2 * b)), scores.sum(), (scores ** 2).sum()])
    engine.train()
    pairs, correct, c_sum, r_sum, n, s_sum, sq_sum = all_reduce_sum(sums.tolist(), dist.device)
    mean = s_sum / n
    return {"eval/reward_accuracy": correct / pairs, "eval/chosen_score": c_sum / pairs,
            "eval/rejected_score": r_sum / pairs, "eval/score_margin": (c_sum - r_sum) / pairs,
            "eval/score_mean": mean, "eval/score_std": max(sq_sum / n - mean ** 2, 0.0) ** 0.5,
            "eval/pairs": pairs}


if __name__ == "__main__":
    run_main(main)
