"""Step 3: PPO RLHF. The actor (from step 1) learns to raise the reward model's score (from step 2)
with a per-token KL penalty to a frozen reference; a critic (from step 2) estimates values.

    # from the default outputs of step 1 and step 2 (output/step1_sft, output/step2_reward), one process
    python step3_rlhf/main.py --output_dir output/step3_rlhf
    # 2 ranks (GPUs, or CPU processes on gloo), ZeRO-3, hybrid generation, LoRA, EMA
    deepspeed --num_gpus 2 step3_rlhf/main.py --actor_model_name_or_path output/step1_sft \\
        --critic_model_name_or_path output/step2_reward --actor_zero_stage 3 --critic_zero_stage 3 \\
        --enable_hybrid_engine --actor_lora_dim 8 --enable_ema --output_dir output/step3_rlhf
    # critic-free: GRPO with 4 answers per prompt and the bundled task's rule as the reward
    python step3_rlhf/main.py --advantage_estimator grpo --n_samples_per_prompt 4 \\
        --reward_funcs engine.rewards.builtin:sort_rule --output_dir output/step3_grpo

Writes actor/, critic/ and (with --enable_ema) actor_ema/ as Hugging Face folders to --output_dir,
plus metrics.jsonl, curves.png and config.yaml. One PPO step = generate answers for
--generation_batches prompt batches, score them (reference log-probs, critic values, reward-model
scores), turn scores and KL into per-token rewards and GAE advantages, then --ppo_epochs passes of
PPO updates over that experience.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.config import Step3Config, parse_column_map
from engine.data.prompts import collate_prompt_rows, load_prompt_data
from engine.data.unsupervised import collate_blocks, load_ptx_data
from engine.errors import UserError
from engine.eval.compare import rule_checks
from engine.flags import parse_config, save_config_yaml
from engine.models.load import hf_model, keep_bitsandbytes_out
from engine.models.roles import Roles, build_roles, check_role_paths, load_step3_tokenizer, resolve_paths
from engine.observe import startup
from engine.observe.metrics import plot_curves
from engine.observe.perf import (
    StepTimer,
    activation_factor,
    current_memory_gb,
    model_shape,
    step3_throughput,
)
from engine.ppo.experience import Experience, fill_with_groups, reward_scores, sequence_masks
from engine.ppo.health import health_warnings
from engine.ppo.metrics import critic_free_rollout_stats
from engine.ppo.trainer import PPOTrainer, generate_sequences, generation_kwargs, rollout_seed
from engine.rewards import RewardFunctions
from engine.rl.dapo import informative_groups
from engine.runtime.bad_steps import BadStepGuard, optimizer_metrics
from engine.runtime.checkpoint import (
    POSITION_KEYS,
    load_module_tensors,
    save_hf_folder,
    save_module_tensors,
    save_resume_state,
)
from engine.runtime.distributed import DistInfo, all_reduce_max, all_reduce_sum, init_distributed, setup_logging
from engine.runtime.ds_config import DTYPE_BYTES
from engine.runtime.ds_private import full_numel
from engine.runtime.entry import run_main
from engine.runtime.nodes import probe_output_dir
from engine.runtime.run import (
    Schedule,
    check_inputs,
    check_output_dir,
    epoch_start,
    epoch_windows,
    make_loader,
    resume_position,
    start_run,
    to_device,
)

logger = logging.getLogger("engine")
EMA_FILE = "actor_ema.safetensors"


@dataclass
class PPOSchedule:
    """PPO steps per epoch and in total, and the optimizer steps of each trained role. Derived here only."""

    steps: Schedule            # PPO steps (one per --generation_batches prompt batches)
    micro_batches: int         # PPO micro-batches per rank per PPO step (per PPO epoch)
    optimizer_steps: int       # optimizer steps of the actor and of the critic over the whole run

    @classmethod
    def of(cls, cfg: Step3Config, prompt_batches: int) -> PPOSchedule:
        t, per_step = cfg.train, cfg.step_generation_batches
        if prompt_batches < per_step:
            raise UserError(f"an epoch has {prompt_batches} prompt batches per rank, fewer than the {per_step} "
                            f"generation batches of a PPO step ({accumulation_note(cfg) or '--generation_batches'}); "
                            "lower --per_device_generation_batch_size, --generation_batches or "
                            "--gradient_accumulation_steps")
        steps = Schedule.of(prompt_batches, per_step, t.num_train_epochs)
        rows = t.per_device_generation_batch_size * cfg.rl.n_samples_per_prompt  # answers per generation batch
        micro = rows * per_step // t.per_device_training_batch_size
        return cls(steps, micro, steps.total_steps * micro * t.ppo_epochs // t.gradient_accumulation_steps)

    def resumed(self, cfg: Step3Config, position: dict[str, int] | None, loaders: list[Any]) -> PPOSchedule:
        """The schedule of a run resuming at `position` on this run's world size (`Schedule.resumed`)."""
        t = cfg.train
        steps = self.steps.resumed(position, loaders, cfg.step_generation_batches, t.num_train_epochs)
        return PPOSchedule(steps, self.micro_batches,
                           steps.total_steps * self.micro_batches * t.ppo_epochs // t.gradient_accumulation_steps)


def accumulation_note(cfg: Step3Config) -> str:
    """Why a PPO step collects more than --generation_batches generation batches ('' when it does not)."""
    t, per_step = cfg.train, cfg.step_generation_batches
    if per_step == t.generation_batches:
        return ""
    micro = t.per_device_generation_batch_size * cfg.rl.n_samples_per_prompt * t.generation_batches
    micro //= t.per_device_training_batch_size
    return (f"--gradient_accumulation_steps {t.gradient_accumulation_steps} spans {per_step // t.generation_batches} "
            f"rounds of --generation_batches {t.generation_batches} ({micro} micro-batches each), so a PPO step "
            f"collects {per_step} generation batches, all generated before the optimizer steps, as DeepSpeed-Chat "
            "accumulates across experience batches")


@dataclass
class Run:
    """A built step-3 run: `build` makes it, `run_ppo` runs it."""

    cfg: Step3Config
    roles: Roles
    trainer: PPOTrainer
    tokenizer: Any
    dist: DistInfo
    out: Path
    metrics: Any
    model_shapes: dict[str, Any]  # the fixed inputs of `step3_throughput`, from `model_shapes`
    plan: PPOSchedule
    prompt_loader: Any
    eval_loader: Any
    ptx_loader: Any | None
    position: dict[str, int]      # epoch, step_in_epoch, global_step: where the loop starts (a resume's)
    baseline_gb: float            # memory in use before any model was built


def main(argv: Sequence[str] | None = None) -> None:
    startup.begin()
    run_ppo(build(parse_config(Step3Config, argv, description=__doc__)))


def build(cfg: Step3Config) -> Run:
    """Distributed set-up and seed, inputs checked, data, the roles and the PPO trainer, resumed with --resume."""
    out = check_output_dir(cfg.log.output_dir, resume=cfg.log.resume)
    keep_bitsandbytes_out(quantized=any(q != "none" for q in (cfg.ds.actor_quantization, cfg.ds.reference_quantization,
                                                               cfg.ds.reward_quantization)))
    check_inputs(cfg)  # before DeepSpeed's start-up, which can take a minute the first time
    check_role_paths(cfg)
    dist = init_distributed(cfg.train.seed, peer_timeout=cfg.fault.peer_timeout,
                            startup_timeout=cfg.fault.startup_timeout)
    setup_logging(dist.is_main, cfg.log.verbose)
    probe_output_dir(out, dist)  # shared or node-local: who writes which checkpoint files
    for notice in cfg.compat_notices(cuda=dist.device.type == "cuda"):
        logger.warning("%s", notice)

    # Inputs first: bad folders or data fail before anything is written.
    with startup.part("model"):
        actor_path, critic_path = resolve_paths(cfg, dist)
        if cfg.ds.auto_fit:
            cfg = fit_to_machine(cfg, dist, actor_path, critic_path)
        tokenizer = load_step3_tokenizer(cfg, actor_path, critic_path)
    # Imported now: a bad --reward_funcs reference fails before any data is cached.
    reward_fns = RewardFunctions(cfg.rl.reward_funcs, cfg.rl.reward_weights) if cfg.rl.reward_funcs else None
    with startup.part("data"):
        prompt_loader, eval_loader, ptx_loader = make_loaders(cfg, tokenizer, out, dist)
    batches = min(len(prompt_loader), len(ptx_loader)) if ptx_loader is not None else len(prompt_loader)
    loaders = [loader for loader in (prompt_loader, ptx_loader) if loader is not None]
    plan = PPOSchedule.of(cfg, batches).resumed(cfg, resume_position(out) if cfg.log.resume else None, loaders)

    # Memory in use before any model is built (on CPU the RSS of Python, the libraries, the tokenizer and
    # the data): the CPU phase peaks (process RSS) minus this are what the models and the PPO step added.
    baseline_gb = current_memory_gb(dist.device)
    with startup.part("model"):
        roles = build_roles(cfg, dist, tokenizer, actor_path, critic_path, plan.optimizer_steps,
                            ptx_loader is not None)
        trainer = PPOTrainer(cfg, roles, tokenizer, dist, reward_fns)

    def load_ema(tag_folder: Path) -> None:
        if roles.ema is not None:
            load_module_tensors(roles.ema.module, roles.ema_stage, tag_folder / EMA_FILE, dist)

    position, metrics = start_run(cfg, roles.trained(), out, dist, keys=POSITION_KEYS + ("trainer",),
                                  load_extra=load_ema, samples_per_step=cfg.train.per_device_generation_batch_size
                                  * cfg.step_generation_batches)
    if cfg.log.resume:
        trainer.load_state_dict(position.pop("trainer"))
    if accumulation_note(cfg):
        logger.info("%s", accumulation_note(cfg))
    logger.info("PPO: %d steps (%d per epoch), %d micro-batches of %d per step, %d optimizer steps, %d ranks",
                plan.steps.total_steps, plan.steps.steps_per_epoch, plan.micro_batches,
                cfg.train.per_device_training_batch_size, plan.optimizer_steps, dist.world_size)
    return Run(cfg, roles, trainer, tokenizer, dist, out, metrics, model_shapes(cfg, roles), plan,
               prompt_loader, eval_loader, ptx_loader, position, baseline_gb)


def make_loaders(cfg: Step3Config, tokenizer: Any, out: Path, dist: DistInfo) -> tuple[Any, Any, Any | None]:
    """(training prompts, held-out prompts, PTX blocks or None), prompts left-padded to --max_prompt_seq_len."""
    cache_dir = Path(cfg.data.data_output_path or out / "data_cache")
    width = cfg.data.max_prompt_seq_len
    train_prompts, eval_prompts = load_prompt_data(cfg.data_args(), tokenizer, width, cache_dir, cfg.train.seed, dist,
                                                   column_map=parse_column_map(cfg.data.prompt_column_map))
    gen_bs = cfg.train.per_device_generation_batch_size
    # Training batches carry the prompt texts and the dataset's other columns (for the reward functions).
    rows = partial(collate_prompt_rows, pad_id=tokenizer.pad_token_id, width=width)
    prompt_loader = make_loader(train_prompts.rows(), gen_bs, dist, True, cfg.train.seed, rows)
    eval_loader = make_loader(eval_prompts.rows(), gen_bs, dist, False, cfg.train.seed, rows)
    ptx_loader = None
    if cfg.data.unsupervised_dataset_name:
        ptx = load_ptx_data(cfg.data, tokenizer, cache_dir, dist)
        ptx_loader = make_loader(ptx, gen_bs, dist, True, cfg.train.seed, collate_blocks)
    return prompt_loader, eval_loader, ptx_loader


def run_ppo(run: Run, *, measure_only: bool = False) -> None:
    """The PPO loop from where `build` left it, then the final evaluation, the saved models and the plots.
    `measure_only` (benchmarks/rlhf_step.py, whose probe has seen the built run) skips the evaluations,
    the saved models and the plots, which a throughput measurement does not want."""
    cfg, dist, metrics, position, out = run.cfg, run.dist, run.metrics, run.position, run.out
    if position["global_step"] == 0:
        with startup.part("first_eval"):
            first = {} if measure_only else evaluate(run)
        metrics.log(0, {"memory/baseline_gb": run.baseline_gb} | first)
    stopped = train(run)
    if stopped is not None:
        logger.info("stopped by --test_stop_step at PPO step %d", stopped)
    if measure_only:
        metrics.close()
        return
    final = evaluate(run)
    if final and not eval_due(cfg, position["global_step"]):
        metrics.log(position["global_step"], final)
    save_models(run, out)
    metrics.close()
    if dist.is_main:
        plot_curves(out / "metrics.jsonl", out / "curves.png",
                    ["rollout/score_mean", "rollout/kl", "ppo/policy_loss", "ppo/value_loss",
                     "rollout/response_len", "eval/score_mean"], title="Step 3: PPO")
        if final:
            logger.info("done: eval score %.3f%s; models in %s", final["eval/score_mean"],
                        f", rule success {final['eval/rule_success']:.3f}" if "eval/rule_success" in final else "", out)
        else:
            logger.info("done (no evaluation: --eval_prompts 0); models in %s", out)


def fit_to_machine(cfg: Step3Config, dist: DistInfo, actor_path: str, critic_path: str) -> Step3Config:
    """--auto_fit: the planner's cheapest memory settings for this machine (flags the user set are kept)."""
    from transformers import AutoConfig

    from engine.planner.step3 import auto_fit, this_machine

    configs = [AutoConfig.from_pretrained(p, trust_remote_code=cfg.model.trust_remote_code)
               for p in (actor_path, critic_path or actor_path)]  # no step-2 folder: the critic's shape is unused
    fitted, message = auto_fit(cfg, this_machine(dist.world_size), *configs)
    logger.info("%s", message)
    return fitted


def train(run: Run) -> int | None:
    """The PPO loop; returns the step at which --test_stop_step ended it, else None."""
    cfg, dist, plan, position = run.cfg, run.dist, run.plan, run.position
    prompt_loader, ptx_loader = run.prompt_loader, run.ptx_loader
    step, history = position["global_step"], []
    guard = BadStepGuard(cfg.fault.max_bad_steps, namespace="ppo", step_name="PPO step",
                         last_checkpoint=step or None)  # a resumed run starts at one
    bar = tqdm(total=plan.steps.total_steps, initial=step, disable=not dist.is_main or cfg.log.disable_tqdm,
               desc="step 3 " + (cfg.rl.advantage_estimator.upper() if cfg.critic_free else "PPO"))
    for epoch in range(position["epoch"], cfg.train.num_train_epochs):
        first, consumed = epoch_start(position, epoch)
        # PTX blocks are drawn in step with the prompts (the same batch size): the same global position.
        windows = epoch_windows(prompt_loader, epoch, consumed, cfg.step_generation_batches)
        ptx_windows = (epoch_windows(ptx_loader, epoch, consumed, cfg.step_generation_batches)
                       if ptx_loader is not None else repeat((0, None)))
        for step_in_epoch, ((samples, prompts), (_, ptx)) in enumerate(zip(windows, ptx_windows), start=first):
            row = ppo_step(run, prompts, ptx, step + 1, guard)
            step += 1
            position.update(epoch=epoch, step_in_epoch=step_in_epoch + 1, samples_in_epoch=samples, global_step=step)
            row |= {f"train/{name}_lr": engine.get_lr()[0] for name, engine in run.roles.trained().items()}
            row["train/epoch"] = epoch
            row |= startup.first_step_done(dist.is_main)
            if eval_due(cfg, step):
                row |= evaluate(run)
            if guard.healthy:  # a bad step's NaN statistics would blind the trend checks
                history.append(row)
                for warning in health_warnings(history, cfg.ppo.warn_kl_above):
                    logger.warning("PPO step %d: %s", step, warning)
                    row["warnings/count"] = row.get("warnings/count", 0) + 1
            if step % cfg.log.print_interval == 0 or step == plan.steps.total_steps:
                logger.info("PPO step %d: %s", step, ", ".join(
                    f"{k.split('/')[-1]}={row[k]:.4g}" for k in ("rollout/score_mean", "rollout/kl",
                                                                  "ppo/policy_loss", "ppo/value_loss",
                                                                  "rollout/response_len") if k in row))
            run.metrics.log(step, row)
            guard.check(step)
            bar.update(1)
            bar.set_postfix(score=f"{row['rollout/score_mean']:.3f}", kl=f"{row['rollout/kl']:.3f}")
            if cfg.log.save_interval and step % cfg.log.save_interval == 0 and guard.save_allowed(step):
                save_checkpoint(run, step, dict(position))
            if cfg.train.test_stop_step and step >= cfg.train.test_stop_step:
                bar.close()
                return step
    bar.close()
    return None


def ppo_step(run: Run, prompt_batches: list[dict], ptx_batches: list[dict] | None, step: int,
             guard: BadStepGuard) -> dict[str, float]:
    """Generate -> score -> rewards and advantages -> PPO updates, for one PPO step. Returns its metrics.
    A NaN or inf in the rollout skips the updates; that, a NaN or inf loss, or an update an optimizer
    skipped makes it a bad step for `guard`."""
    cfg, trainer, dist = run.cfg, run.trainer, run.dist
    trained = run.roles.trained().values()
    timer = StepTimer(dist.device, phases=("generate", "experience", "train"))
    kl_coef = trainer.kl_ctl.coef

    # 1.-3. for every generation batch of this step: its experience.
    experiences: list[Experience] = []
    per_seq: list[dict[str, torch.Tensor]] = []
    extras: list[dict[str, Any]] = []
    dynamic: dict[str, float] = {}
    for draw, batch in enumerate(prompt_batches):
        batch = to_device(batch, dist.device)
        with timer.phase("generate"):  # 1. generate (N answers per prompt, this rank's own noise)
            sequences, greedy = trainer.generate(batch, step, draw)
        with timer.phase("experience"):  # 2. score (reference, critic, reward model), 3. rewards and advantages
            if cfg.critic_free:
                exp, stats, extra = trainer.critic_free_experience(batch, sequences, greedy, step)
                extras.append(extra)
            else:
                exp, stats = trainer.experience(sequences, batch["attention_mask"], step)
        per_seq.append(stats)
        if cfg.rl.dynamic_sampling:  # drop flat groups, refill from further prompts (its own phases inside)
            exp, fill_row = dynamic_fill(run, exp, step, draw, timer, per_seq, extras)
            dynamic = {k: dynamic.get(k, 0.0) + v for k, v in fill_row.items()}
        experiences.append(exp)
        if cfg.log.print_answers and step % cfg.log.print_answers_interval == 0:
            print_answer(run, sequences, exp)
    row = rollout_stats(per_seq, dist)
    if cfg.critic_free:
        names = trainer.reward_fns.names if trainer.reward_fns is not None else []
        row |= critic_free_rollout_stats(per_seq, extras, names, cfg.rl.n_samples_per_prompt, dist)
    if dynamic:
        keys = sorted(dynamic)
        row |= dict(zip(keys, all_reduce_sum([dynamic[k] for k in keys], dist.device)))
    # A NaN or inf score, KL, value or advantage on any rank (the count is over all ranks, so every rank
    # agrees) skips this step's updates: the NaN reaches neither the weights, the EMA nor the KL controller.
    rollout_ok = row["rollout/nonfinite_sequences"] == 0
    if rollout_ok:
        trainer.kl_ctl.update(row["rollout/kl"], int(row["rollout/sequences"]))

    # 4. PPO updates over the step's experience (+ PTX), then the EMA.
    ptx = [to_device(b, dist.device) for b in ptx_batches] if ptx_batches is not None else None
    skipped = sum(e.skipped_steps for e in trained)
    with timer.phase("train"):
        if rollout_ok:
            row |= trainer.ppo_updates(experiences, ptx, step)

    # 5. log: the step's health, optimizer, timing, memory and throughput figures.
    loss_bad = row.pop("ppo/nonfinite", 0.0) > 0
    row |= guard.record(step, nonfinite=not rollout_ok or loss_bad,
                        skipped=sum(e.skipped_steps for e in trained) > skipped,
                        what="policy or value loss" if rollout_ok else "reward, KL or value in the rollout")
    fp16 = cfg.ds.dtype == "fp16"
    for name, engine in run.roles.trained().items():
        row |= optimizer_metrics(engine, f"ppo/{name}_", fp16)
    row["ppo/kl_coef"] = kl_coef
    row |= {f"timing/{k}_s": v for k, v in timer.seconds.items()}
    row |= {f"memory/{k}_peak_gb": v for k, v in timer.peaks.items()}
    row["memory/current_gb"] = current_memory_gb(dist.device)
    if not rollout_ok:  # no updates: no training throughput
        return row
    row |= step3_throughput(
        **run.model_shapes,
        per_device_generation_batch=cfg.train.per_device_generation_batch_size * cfg.rl.n_samples_per_prompt,
        generation_batches=len(prompt_batches), ppo_epochs=cfg.train.ppo_epochs, ptx=ptx is not None,
        world_size=dist.world_size, seq_length=cfg.data.max_prompt_seq_len + cfg.data.max_answer_seq_len,
        answer_len=row["rollout/response_len"],  # all ranks' real answers, not this rank's padded width
        generate_s=timer.seconds["generate"] / len(prompt_batches), train_s=timer.seconds["train"],
        e2e_s=sum(timer.seconds.values()))
    return row


def dynamic_fill(run: Run, exp: Experience, step: int, draw: int, timer: StepTimer,
                 per_seq: list[dict[str, torch.Tensor]], extras: list[dict[str, Any]]) -> tuple[Experience, dict]:
    """--dynamic_sampling (DAPO): keep the groups of `exp` whose rewards differ; while any rank has fewer than a
    full batch of them and fewer than --max_gen_batches generation batches, generate for a further batch of
    training prompts (drawn from this rank's stream, so a resumed run draws the same). A batch that cannot fill
    is topped up with flat groups (zero advantage) and trains on what it has. Generated rollouts are added to
    `per_seq` / `extras` (the step's rollout metrics); returns the batch and its counts (summed over ranks)."""
    cfg, trainer, dist, n = run.cfg, run.trainer, run.dist, run.cfg.rl.n_samples_per_prompt
    rows, dataset, collate = len(exp), run.prompt_loader.dataset, run.prompt_loader.collate_fn
    pool, keep = [exp], [informative_groups(exp.scores, n)[0]]
    batches = 1
    # Every rank takes part in each generation (ZeRO-3 gathers are collective), so the loop's test is global.
    while batches < cfg.rl.max_gen_batches and all_reduce_max([float(sum(int(k.sum()) for k in keep) < rows)],
                                                              dist.device)[0] > 0:
        pick = torch.Generator().manual_seed(rollout_seed(cfg.train.seed, dist.rank, step, 1000 * batches + draw))
        index = torch.randint(len(dataset), (cfg.train.per_device_generation_batch_size,), generator=pick)
        batch = to_device(collate([dataset[i] for i in index.tolist()]), dist.device)
        with timer.phase("generate"):
            sequences, greedy = trainer.generate(batch, step, 1000 * batches + draw)
        with timer.phase("experience"):
            more, stats, extra = trainer.critic_free_experience(batch, sequences, greedy, step)
        pool.append(more)
        keep.append(informative_groups(more.scores, n)[0])
        per_seq.append(stats)
        extras.append(extra)
        batches += 1
    filled, flat = fill_with_groups(pool, keep, n, rows, run.tokenizer.pad_token_id)
    dropped = sum(int((~k).sum()) for k in keep) // n
    return filled, {"rollout/dynamic_gen_batches": float(batches), "rollout/dynamic_groups_dropped": float(dropped),
                    "rollout/dynamic_flat_groups_trained": float(flat)}


def rollout_stats(per_seq: list[dict[str, torch.Tensor]], dist: DistInfo) -> dict[str, float]:
    """Means over every sequence of the step on all ranks (score std too), and counts of empty answers and
    of sequences with a NaN or inf score, reward, advantage or return (`make_experience`'s "nonfinite")."""
    cat = {k: torch.cat([s[k] for s in per_seq]).double() for k in per_seq[0]}
    n = float(cat["score"].numel())
    values = [n, float(cat["score"].sum()), float((cat["score"] ** 2).sum()), float(cat["kl"].sum()),
              float(cat["response_len"].sum()), float(cat["value_mean"].sum()),
              float((cat["response_len"] == 0).sum()), float(cat["nonfinite"].sum())]
    n, s, sq, kl, length, value, empty, nonfinite = all_reduce_sum(values, dist.device)
    mean = s / n
    return {"rollout/score_mean": mean, "rollout/score_std": max(sq / n - mean ** 2, 0.0) ** 0.5,
            "rollout/kl": kl / n, "rollout/response_len": length / n, "rollout/value_mean": value / n,
            "rollout/empty_answers": empty, "rollout/sequences": n, "rollout/nonfinite_sequences": nonfinite}


def print_answer(run: Run, sequences: torch.Tensor, exp: Experience) -> None:
    width = run.cfg.data.max_prompt_seq_len
    prompt = run.tokenizer.decode(sequences[0, :width], skip_special_tokens=True)
    answer = run.tokenizer.decode(sequences[0, width:][exp.attention_mask[0, width:].bool()])
    print(f"[rank {run.dist.rank}] prompt: {prompt!r}\n[rank {run.dist.rank}] answer: {answer!r} "
          f"(score {float(exp.scores[0]):.3f})", flush=True)


def eval_due(cfg: Step3Config, step: int) -> bool:
    return bool(cfg.ppo.eval_interval) and step % cfg.ppo.eval_interval == 0


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """The actor's answers to held-out prompts, decoded as in the rollouts (or greedily with
    --eval_greedy): reward score, length, and the sorting rule where the prompts are the bundled
    task's (`engine.data.sort_task`). Sampling uses a fixed seed of its own, so every evaluation sees the
    same noise and the training RNG stream is untouched. Empty with --eval_prompts 0."""
    cfg, tok, dist = run.cfg, run.tokenizer, run.dist
    if not cfg.ppo.eval_prompts:
        return {}
    width, per_rank = cfg.data.max_prompt_seq_len, -(-cfg.ppo.eval_prompts // dist.world_size)
    kwargs = generation_kwargs(cfg, tok)
    if cfg.ppo.eval_greedy:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p", "top_k")} | {"do_sample": False}
    with torch.random.fork_rng(devices=[dist.device] if dist.device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed + 1000 * dist.rank)
        return _evaluate(run, run.eval_loader, kwargs, width, per_rank)


def _evaluate(run: Run, loader, kwargs: dict[str, Any], width: int, per_rank: int) -> dict[str, float]:
    cfg, roles, tok, dist = run.cfg, run.roles, run.tokenizer, run.dist
    sums = torch.zeros(5, dtype=torch.float64)  # sequences, score, length, rule-checked, rule correct
    seen = 0
    for batch in loader:
        if seen >= per_rank:
            break
        batch = to_device(head_rows(batch, per_rank - seen), dist.device)
        seen += batch["input_ids"].shape[0]
        sequences = generate_sequences(roles.actor, roles.actor_stage, batch["input_ids"], batch["attention_mask"],
                                       kwargs, cfg.ds.enable_hybrid_engine, cfg.ds.unpin_actor_parameters)
        mask, action_mask = sequence_masks(sequences, width, tok.pad_token_id, tok.eos_token_id,
                                           batch["attention_mask"])
        if cfg.critic_free:  # what the run optimises: the reward functions (+ the reward model's score)
            scores = run.trainer.outcome_rewards(sequences, batch["attention_mask"], batch["prompts"],
                                                 batch["columns"])[0].nan_to_num(0.0).double().cpu()
        else:
            scores = reward_scores(roles.reward, sequences, mask).double().cpu()
        prompts = tok.batch_decode(sequences[:, :width], skip_special_tokens=True)
        answers = [tok.decode(s[width:][m[width:].bool()], skip_special_tokens=True) for s, m in zip(sequences, mask)]
        checked, correct = rule_checks(prompts, answers)
        sums += torch.tensor([float(len(scores)), float(scores.sum()), float(action_mask.sum()),
                              float(checked.sum()), float(correct.sum())], dtype=torch.float64)
    n, score, length, checked, correct = all_reduce_sum(sums.tolist(), dist.device)
    row = {"eval/score_mean": score / max(n, 1), "eval/response_len": length / max(n, 1)}
    if checked:
        row["eval/rule_success"] = correct / checked
    return row


def head_rows(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first `n` rows of a `collate_prompt_rows` batch (tensors, prompt texts and every column)."""
    out = {k: v[:n] for k, v in batch.items() if k != "columns"}
    out["columns"] = {k: v[:n] for k, v in batch["columns"].items()}
    return out


def model_shapes(cfg: Step3Config, roles: Roles) -> dict[str, Any]:
    """What `step3_throughput` needs of the models, computed once: configs, FLOPs factors, actor size."""
    ds, lora = cfg.ds, cfg.lora
    actor_cfg = hf_model(roles.actor.module).config
    critic_cfg = hf_model(roles.critic.module.model).config if roles.critic is not None else None
    return {"actor_config": actor_cfg, "critic_config": critic_cfg,
            "actor_k": activation_factor(ds.actor_gradient_checkpointing, lora.actor_lora_dim,
                                         model_shape(actor_cfg)[1]),
            "critic_k": activation_factor(ds.critic_gradient_checkpointing, lora.critic_lora_dim,
                                          model_shape(critic_cfg)[1]) if critic_cfg is not None else 0.0,
            "actor_params": sum(full_numel(p) for p in roles.actor.module.parameters()),
            "bytes_per_param": DTYPE_BYTES[ds.dtype]}


def save_models(run: Run, folder: Path) -> None:
    """actor/, critic/ and actor_ema/ under `folder` as Hugging Face folders (LoRA fused, atomic)."""
    roles, tok, dist = run.roles, run.tokenizer, run.dist
    extra = lambda target: save_config_yaml(run.cfg, target / "config.yaml")  # noqa: E731
    base = roles.actor_full_precision  # a 4-bit actor is saved as its full-precision base with LoRA merged
    save_hf_folder(roles.actor.module, tok, folder / "actor", roles.actor_stage, dist, extra=extra, full_precision=base)
    if roles.critic is not None:  # critic-free estimators have none
        save_hf_folder(roles.critic.module.model, tok, folder / "critic", roles.critic_stage, dist, extra=extra)
    if roles.ema is not None:
        save_hf_folder(roles.ema.module, tok, folder / "actor_ema", roles.ema_stage, dist, extra=extra,
                       full_precision=base)


def save_checkpoint(run: Run, step: int, position: dict[str, int]) -> None:
    """checkpoint-<step>/{actor,critic,actor_ema} and the state --resume reads (both engines, the EMA,
    the KL controller and score statistics, RNG and data position)."""
    save_models(run, run.out / f"checkpoint-{step}")
    roles = run.roles

    def extra(tag_folder: Path) -> None:
        if roles.ema is not None:
            save_module_tensors(roles.ema.module, roles.ema_stage, tag_folder / EMA_FILE, run.dist)

    save_resume_state(roles.trained(), run.out, f"step{step}",
                      position | {"trainer": run.trainer.state_dict()}, run.dist, extra=extra,
                      keep=run.cfg.log.save_total_limit)


if __name__ == "__main__":
    run_main(main)
