"""Step 3's PPO trainer: generation, experience, and the actor/critic updates of one micro-batch.

The math lives in `engine.rl.ppo` (pure functions); this module runs the models. Conventions:
sequences are prompts left-padded to --max_prompt_seq_len followed by the generated answer, and
every per-position tensor is indexed by action (see `engine.rl.ppo`).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch

from engine.config import Step3Config
from engine.models.ema import ema_update
from engine.models.hybrid import generation_mode
from engine.models.lm_head import lm_loss, token_logprobs
from engine.models.load import position_ids
from engine.models.lora import forwards_through_wrapper
from engine.models.roles import Roles
from engine.ppo.experience import (
    Experience,
    make_critic_free_experience,
    make_experience,
    reward_scores,
    sequence_masks,
)
from engine.rewards import RewardFunctions
from engine.rl.batch_mean import mean_normaliser
from engine.rl.dapo import overlong_penalty, truncated_answers
from engine.rl.lm_loss import label_count
from engine.rl.losses import POLICY_LOSSES, aggregate_loss, kl_loss, loss_counts
from engine.rl.ppo import (
    AdaptiveKLController,
    RunningMoments,
    policy_loss,
    token_mean,
    value_loss,
)
from engine.runtime import faults
from engine.runtime.distributed import DistInfo, all_reduce_sum
from engine.runtime.ds_private import step_together

logger = logging.getLogger("engine")


def generation_kwargs(cfg: Step3Config, tokenizer: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": cfg.data.max_answer_seq_len, "do_sample": cfg.ppo.do_sample,
                              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if cfg.ppo.do_sample:
        kwargs.update(temperature=cfg.ppo.temperature, top_p=cfg.ppo.top_p, top_k=cfg.ppo.top_k)
    return kwargs


@torch.no_grad()
def generate_sequences(actor: Any, zero_stage: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       gen_kwargs: dict[str, Any], hybrid: bool, unpin: bool = False) -> torch.Tensor:
    """(B, P + n) prompts followed by answers, from the actor engine.

    hybrid: a hook-free replica, gathered once (ZeRO-3), LoRA fused, KV cache (`engine.models.hybrid`).
    Otherwise (or with `unpin` under ZeRO-3) the training module itself generates: ZeRO-3 gathers
    each layer per token, and `synced_gpus` keeps every rank stepping until all have finished; a peft
    (LoRA) actor's forwards go through its wrapper, as in training (`forwards_through_wrapper`).
    """
    if hybrid and not (unpin and zero_stage == 3):
        with generation_mode(actor, zero_stage) as model:
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
    module = actor.module
    was_training = module.training
    module.eval()
    try:
        synced = zero_stage == 3 and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        with forwards_through_wrapper(module) if zero_stage == 3 else contextlib.nullcontext():
            return module.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                                   synced_gpus=synced, **gen_kwargs)
    finally:
        module.train(was_training)


def rollout_seed(seed: int, rank: int, step: int, draw: int = 0) -> int:
    """The seed of one rank's sampling noise for one generation batch (`draw`) of PPO step `step`: distinct per
    rank, step and draw, and a function of them only, so that data-parallel ranks sample independently and a
    resumed run samples exactly what the uninterrupted run did."""
    return (((seed * 1_000_003 + rank) * 1_000_003 + step) * 1_009 + draw) % (2 ** 63 - 1)


def decode_answers(tokenizer: Any, sequences: torch.Tensor, attention_mask: torch.Tensor, width: int) -> list[str]:
    """The answer texts of generated `sequences` (B, T): the real tokens after the prompt width, special
    tokens dropped (what the reward functions judge)."""
    return [tokenizer.decode(s[width:][m[width:].bool()], skip_special_tokens=True)
            for s, m in zip(sequences, attention_mask)]


class PPOTrainer:
    """Runs the roles for one PPO step: `generate`, `experience`, then `train_micro_batch` per micro-batch."""

    def __init__(self, cfg: Step3Config, roles: Roles, tokenizer: Any, dist: DistInfo,
                 reward_fns: RewardFunctions | None = None):
        self.cfg, self.roles, self.tokenizer, self.dist = cfg, roles, tokenizer, dist
        self.kl_ctl = AdaptiveKLController(cfg.ppo.kl_ctl, cfg.ppo.target_kl, cfg.ppo.kl_horizon)
        self.score_moments = RunningMoments()
        self.gen_kwargs = generation_kwargs(cfg, tokenizer)
        self.reward_fns = reward_fns  # --reward_funcs, resolved by the caller (None: the reward model scores)

    # -- rollout ---------------------------------------------------------------------------------
    def generate(self, batch: dict[str, Any], step: int = 0, draw: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sequences (B x N, T) with the N = --n_samples_per_prompt answers of prompt g in rows g*N .. g*N+N-1,
        greedy sequences (B, T') for remax's baseline or None). Both in one generate call each; the sampling
        noise comes from this rank's own stream (`rollout_seed`, per rank, PPO step and generation batch `draw`),
        so data-parallel ranks sample independently and the global RNG is left as it was."""
        n = self.cfg.rl.n_samples_per_prompt
        ids, mask = batch["input_ids"], batch["attention_mask"]
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(rollout_seed(self.cfg.train.seed, self.dist.rank, step, draw))
            sequences = self._generate(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), self.gen_kwargs)
        greedy = None
        if self.cfg.rl.advantage_estimator == "remax":  # ReMax's baseline: one greedy answer per prompt
            kwargs = {k: v for k, v in self.gen_kwargs.items() if k not in ("temperature", "top_p", "top_k")}
            greedy = self._generate(ids, mask, kwargs | {"do_sample": False})
        return sequences, greedy

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        ds = self.cfg.ds
        sequences = generate_sequences(self.roles.actor, self.roles.actor_stage, ids, mask, kwargs,
                                       ds.enable_hybrid_engine, ds.unpin_actor_parameters)
        if ds.release_inference_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return sequences

    @torch.no_grad()
    def outcome_rewards(self, sequences: torch.Tensor, prompt_mask: torch.Tensor, prompts: list[str],
                        columns: dict[str, list], step: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(rewards (B,), action_mask (B, T-1), parts) of generated rows whose prompts are `prompts` (B texts, one
        per row) with their `columns`: the weighted reward functions plus the reward model's score (one more
        term, weight 1) when there is one, plus DAPO's overlong penalty; NaN where nothing scored. With
        --mask_truncated_answers, truncated answers have no actions. `parts`: "fn_values" (B, F) or None,
        "truncated" (B,) bool."""
        cfg, rl, tok = self.cfg, self.cfg.rl, self.tokenizer
        width = cfg.data.max_prompt_seq_len
        attention_mask, action_mask = sequence_masks(sequences, width, tok.pad_token_id, tok.eos_token_id, prompt_mask)
        rewards, values = torch.zeros(len(sequences)), None
        if self.reward_fns is not None:
            answers = decode_answers(tok, sequences, attention_mask, width)
            rewards, values, _ = self.reward_fns(prompts, answers, columns)
        rewards = rewards.to(sequences.device)
        if self.roles.reward is not None:
            self.roles.reward.eval()
            score = reward_scores(self.roles.reward, sequences, attention_mask).float()
            rewards = score if self.reward_fns is None else rewards.nan_to_num(0.0) + score
        rewards = faults.poison(rewards, step)
        if rl.overlong_buffer_len > 0:
            penalty, _ = overlong_penalty(action_mask, max_answer_len=cfg.data.max_answer_seq_len,
                                          buffer_len=rl.overlong_buffer_len, penalty_factor=rl.overlong_penalty_factor)
            rewards = rewards + penalty
        truncated, _ = truncated_answers(sequences, action_mask, tok.eos_token_id)
        if rl.mask_truncated_answers:
            action_mask = action_mask * ~truncated.unsqueeze(1)
        return rewards, action_mask, {"fn_values": values, "truncated": truncated, "attention_mask": attention_mask}

    def critic_free_experience(self, batch: dict[str, Any], sequences: torch.Tensor, greedy: torch.Tensor | None,
                               step: int) -> tuple[Experience, dict[str, torch.Tensor], dict[str, Any]]:
        """Score the groups `generate` made of a prompt batch and compute their advantages over whole
        groups (before any micro-batch split). Returns the experience, per-sequence stats and the rollout's
        extras (the estimator's stats, the reward functions' values)."""
        cfg, rl, n = self.cfg, self.cfg.rl, self.cfg.rl.n_samples_per_prompt
        prompts = [p for p in batch["prompts"] for _ in range(n)]
        columns = {k: [v for v in vs for _ in range(n)] for k, vs in batch["columns"].items()}
        prompt_mask = batch["attention_mask"].repeat_interleave(n, 0)
        rewards, action_mask, parts = self.outcome_rewards(sequences, prompt_mask, prompts, columns, step)
        baselines = None
        if greedy is not None:
            baselines = self.outcome_rewards(greedy, batch["attention_mask"], batch["prompts"], batch["columns"],
                                             step)[0].repeat_interleave(n)
        self.roles.actor.eval()
        try:
            exp, per_seq, adv_stats = make_critic_free_experience(
                self.roles.actor, self.roles.reference, sequences, parts["attention_mask"], action_mask, rewards,
                estimator=rl.advantage_estimator, group_size=n, kl_coef=self.kl_ctl.coef,
                kl_estimator=cfg.ppo.kl_estimator, baselines=baselines, gamma=cfg.ppo.gamma,
                std_normalize=rl.grpo_std_normalize, batch_sum=self._sum_over_ranks,
                logprob_chunk_size=cfg.ds.logprob_chunk_size)
        finally:
            self.roles.actor.train()
        per_seq["truncated"] = parts["truncated"].float()
        return exp, per_seq, {"advantages": adv_stats, "fn_values": parts["fn_values"]}

    def _sum_over_ranks(self, stats: torch.Tensor) -> torch.Tensor:
        return torch.tensor(all_reduce_sum(stats.tolist(), self.dist.device), dtype=torch.float64)

    def experience(self, sequences: torch.Tensor, prompt_mask: torch.Tensor, step: int = 0
                   ) -> tuple[Experience, dict[str, torch.Tensor]]:
        """Score `sequences` with all four roles (eval mode) and turn them into PPO targets. `step` (the PPO
        step) is where `engine.runtime.faults` may make the reward model's output NaN."""
        roles, cfg = self.roles, self.cfg
        roles.actor.eval()
        roles.critic.eval()
        reference = roles.reference if roles.reference is not None else roles.actor  # no KL term: KL is 0
        try:
            transform = self._normalise if cfg.ppo.normalize_reward else None
            reward = lambda seqs, mask: faults.poison(roles.reward(seqs, mask), step)  # noqa: E731
            return make_experience(roles.actor, reference, roles.critic, reward, sequences,
                                   cfg.data.max_prompt_seq_len, self.tokenizer.pad_token_id,
                                   self.tokenizer.eos_token_id, kl_coef=self.kl_ctl.coef,
                                   clip_reward_value=cfg.ppo.clip_reward_value, gamma=cfg.ppo.gamma,
                                   lam=cfg.ppo.lam, kl_estimator=cfg.ppo.kl_estimator,
                                   whiten_advantages=cfg.ppo.whiten_advantages, score_transform=transform,
                                   prompt_mask=prompt_mask, logprob_chunk_size=cfg.ds.logprob_chunk_size)
        finally:
            roles.actor.train()
            roles.critic.train()

    def _normalise(self, scores: torch.Tensor) -> torch.Tensor:
        n, total, total_sq = all_reduce_sum([float(scores.numel()), float(scores.sum()), float((scores ** 2).sum())],
                                            self.dist.device)
        # A NaN or inf score on any rank (the sums are over all ranks, so all agree) makes this PPO step a bad
        # one whose updates are skipped; it must not poison the moments of every later step too.
        if math.isfinite(total_sq):
            self.score_moments.update(n, total, total_sq)
        return (scores - self.score_moments.mean) / max(self.score_moments.std, 1e-6)

    # -- updates ---------------------------------------------------------------------------------
    def _actor_forward(self, exp: Experience, token_count: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs (B, A) of the taken actions, the entropy's token mean) under the actor being trained; the
        entropy carries a gradient only when --entropy_coef uses it."""
        seq, mask = exp.sequences, exp.attention_mask
        logprobs, entropy = token_logprobs(self.roles.actor, seq, mask, position_ids(mask),
                                           self.cfg.ds.logprob_chunk_size, with_entropy=True)
        if self.cfg.ppo.entropy_coef <= 0:
            entropy = entropy.detach()
        return logprobs, token_mean(entropy, exp.action_mask, token_count)

    def train_micro_batch(self, exp: Experience, token_count: float | None = None) -> dict[str, float]:
        """One PPO update of the actor, then of the critic, on a micro-batch of experience. The losses (and
        their statistics) divide sums over the answer actions by `token_count` (None: this micro-batch's own
        count; `ppo_updates` passes the global count per micro-batch, engine.rl.batch_mean)."""
        cfg, actor, critic = self.cfg, self.roles.actor, self.roles.critic
        seq, mask, action_mask = exp.sequences, exp.attention_mask, exp.action_mask
        logprobs, entropy = self._actor_forward(exp, token_count)
        pg_loss, pg_stats = policy_loss(logprobs, exp.logprobs, exp.advantages, action_mask, cfg.ppo.cliprange,
                                        token_count)
        actor_loss = pg_loss - cfg.ppo.entropy_coef * entropy if cfg.ppo.entropy_coef > 0 else pg_loss
        actor.backward(actor_loss)
        if not cfg.ppo.align_overflow:
            actor.step()

        values = critic(seq, mask)[:, :-1]
        v_loss, v_stats = value_loss(values, exp.values, exp.returns, action_mask, cfg.ppo.cliprange_value,
                                     token_count)
        critic.backward(v_loss)
        if cfg.ppo.align_overflow:
            self._aligned_steps()
        else:
            critic.step()
        pg_loss, v_loss = pg_loss.detach(), v_loss.detach()
        return {"ppo/policy_loss": float(pg_loss), "ppo/value_loss": float(v_loss),
                "ppo/clipfrac": float(pg_stats["clipfrac"]), "ppo/approx_kl": float(pg_stats["approx_kl"]),
                "ppo/ratio_max": float(pg_stats["ratio_max"]), "ppo/entropy": float(entropy.detach()),
                "ppo/vf_clipfrac": float(v_stats["vf_clipfrac"]),
                "ppo/nonfinite": float(not (math.isfinite(float(pg_loss)) and math.isfinite(float(v_loss))))}

    def train_actor_micro_batch(self, exp: Experience, token_count: float | None = None,
                                seq_count: float | None = None) -> dict[str, float]:
        """One critic-free update of the actor on a micro-batch: the --policy_loss terms aggregated with
        --loss_agg_mode (global window counts `token_count`, `seq_count`), plus --kl_loss_coef times the KL
        loss on answer tokens, minus the entropy bonus."""
        cfg, rl, actor = self.cfg, self.cfg.rl, self.roles.actor
        action_mask = exp.action_mask
        logprobs, entropy = self._actor_forward(exp, token_count)
        gspo = rl.policy_loss == "gspo"
        default_clip = cfg.ppo.cliprange if not gspo else None
        clips = {k: v for k, v in (("clip_low", rl.cliprange_low if rl.cliprange_low is not None else default_clip),
                                   ("clip_high", rl.cliprange_high if rl.cliprange_high is not None else default_clip))
                 if v is not None}  # gspo without a flag: its own defaults (engine.rl.losses.GSPO_CLIP_*)
        terms, pg_stats = POLICY_LOSSES[rl.policy_loss](logprobs, exp.logprobs, exp.advantages, action_mask,
                                                        dual_clip_c=rl.dual_clip_c, token_count=token_count, **clips)
        agg = {"token_count": token_count, "seq_count": seq_count, "constant": float(cfg.data.max_answer_seq_len)}
        pg_loss, _ = aggregate_loss(terms, action_mask, rl.loss_agg_mode, **agg)
        loss = pg_loss
        stats: dict[str, float] = {}
        if rl.kl_loss_coef > 0:
            kl_terms, kl_stats = kl_loss(logprobs, exp.ref_logprobs, action_mask, rl.kl_loss_estimator, token_count)
            kl_value, _ = aggregate_loss(kl_terms, action_mask, rl.loss_agg_mode, **agg)
            loss = loss + rl.kl_loss_coef * kl_value
            stats["ppo/kl_loss"] = float(kl_value.detach())
        if cfg.ppo.entropy_coef > 0:
            loss = loss - cfg.ppo.entropy_coef * entropy
        actor.backward(loss)
        actor.step()
        pg_loss = pg_loss.detach()
        return stats | {"ppo/policy_loss": float(pg_loss), "ppo/entropy": float(entropy.detach()),
                        "ppo/nonfinite": float(not math.isfinite(float(loss.detach())))} | {
            f"ppo/{k}": float(pg_stats[k]) for k in ("clipfrac", "clipfrac_low", "clipfrac_high", "clipfrac_dual",
                                                      "approx_kl", "ratio_max")}

    def ppo_updates(self, experiences: list[Experience], ptx: list[dict[str, torch.Tensor]] | None,
                    step: int) -> dict[str, float]:
        """--ppo_epochs passes of `train_micro_batch` (and `train_ptx` on the matching rows of `ptx`, one
        batch per experience) over a PPO step's experience, with the EMA after each micro-batch.

        Every loss is a token mean over its optimizer step's window (--gradient_accumulation_steps
        consecutive micro-batches) on all ranks, not over each micro-batch as in DeepSpeed-Chat, so how the
        window is split into micro-batches and ranks does not change the update. Returns the mean of each
        statistic over every micro-batch of every rank: for the losses, the mean over the optimizer steps
        of each window's token mean."""
        sums: dict[str, float] = {}
        n = 0
        micro = self.cfg.train.per_device_training_batch_size
        accum = self.cfg.train.gradient_accumulation_steps
        pieces = [(i, slice(start, start + micro)) for i, exp in enumerate(experiences)
                  for start in range(0, len(exp), micro)]
        normalisers = self._window_normalisers(experiences, ptx, pieces)
        for _ in range(self.cfg.train.ppo_epochs):
            for j, (i, rows) in enumerate(pieces):
                answer_norm, ptx_norm, seq_norm = normalisers[j // accum]
                if self.cfg.critic_free:
                    stats = self.train_actor_micro_batch(experiences[i].select(rows), answer_norm, seq_norm)
                else:
                    stats = self.train_micro_batch(experiences[i].select(rows), answer_norm)
                faults.mid_step(step)
                if ptx is not None:
                    stats |= self.train_ptx({k: v[rows] for k, v in ptx[i].items()}, ptx_norm)
                self.update_ema()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
        keys = sorted(sums)
        totals = all_reduce_sum([sums[k] for k in keys] + [float(n)], self.dist.device)
        return {k: totals[i] / totals[-1] for i, k in enumerate(keys)}

    def _window_normalisers(self, experiences: list[Experience], ptx: list[dict[str, torch.Tensor]] | None,
                            pieces: list[tuple[int, slice]]) -> list[tuple[float, float, float]]:
        """(answer-action, PTX-target, answer) normaliser of each optimizer step's window of `pieces` (the
        micro-batches of one PPO epoch, in order), from the counts of the window on all ranks in one all-reduce
        (engine.rl.batch_mean). The answer count (answers with at least one action) is the seq-mean loss modes'.

        The config makes a PPO epoch a whole number of windows, so windows line up with DeepSpeed's boundaries.
        With PTX the actor's DeepSpeed window is doubled (a PPO and a PTX backward per micro-batch) and
        DeepSpeed divides by twice --gradient_accumulation_steps; the normalisers count only the micro-batches
        of their own loss, so each of the two losses weighs one half, as in DeepSpeed-Chat."""
        accum = self.cfg.train.gradient_accumulation_steps
        local: list[float] = []
        for w in range(0, len(pieces), accum):
            window = pieces[w:w + accum]
            counts = [loss_counts(experiences[i].action_mask[rows]) for i, rows in window]
            ptx_targets = sum(label_count(ptx[i]["labels"][rows]) for i, rows in window) if ptx else 0
            local += [float(sum(c[0] for c in counts)), float(ptx_targets), float(sum(c[1] for c in counts))]
        totals = all_reduce_sum(local, self.dist.device)
        world = self.dist.world_size
        return [tuple(mean_normaliser(t, accum, world) for t in totals[k:k + 3]) for k in range(0, len(totals), 3)]

    def _aligned_steps(self) -> None:
        """--align_overflow (fp16): when exactly one of actor and critic overflowed, skip the other's step too."""
        actor_over, critic_over = step_together(self.roles.actor, self.roles.critic)
        if actor_over or critic_over:
            logger.warning("fp16 overflow (actor %s, critic %s): both steps skipped", actor_over, critic_over)

    def train_ptx(self, batch: dict[str, torch.Tensor], token_count: float | None = None) -> dict[str, float]:
        """One language-modelling update of the actor on a PTX batch, weighted by --unsup_coef; `token_count`
        as in `engine.rl.lm_loss.causal_lm_loss`."""
        actor = self.roles.actor
        loss, _ = lm_loss(actor, batch, self.cfg.ds.logprob_chunk_size, fp32=True, token_count=token_count)
        actor.backward(self.cfg.data.unsup_coef * loss)
        actor.step()
        return {"ppo/ptx_loss": float(loss.detach())}

    def update_ema(self) -> None:
        if self.roles.ema is not None:
            ema_update(self.roles.ema.module, self.roles.actor.module, self.cfg.ppo.ema_decay, self.roles.actor_stage)

    # -- state for --resume ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])


