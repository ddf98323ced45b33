"""Step 3's PPO trainer: generation, experience, and the actor/critic updates of one micro-batch.

The math lives in `engine.rl.ppo` (pure functions); this module runs the models. Conventions:
sequences are prompts left-padded to --max_prompt_seq_len followed by the generated answer, and
every per-position tensor is indexed by action (see `engine.rl.ppo`).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from engine.config import Step3Config
from engine.models.ema import ema_update
from engine.models.hybrid import generation_mode
from engine.models.load import position_ids
from engine.models.roles import Roles
from engine.ppo.experience import Experience, make_experience
from engine.rl.batch_mean import mean_normaliser
from engine.rl.lm_loss import causal_lm_loss, label_count
from engine.rl.ppo import (
    AdaptiveKLController,
    RunningMoments,
    entropy_from_logits,
    logprobs_from_logits,
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
    each layer per token, and `synced_gpus` keeps every rank stepping until all have finished.
    """
    if hybrid and not (unpin and zero_stage == 3):
        with generation_mode(actor, zero_stage) as model:
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
    module = actor.module
    was_training = module.training
    module.eval()
    try:
        synced = zero_stage == 3 and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        return module.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                               synced_gpus=synced, **gen_kwargs)
    finally:
        module.train(was_training)


class PPOTrainer:
    """Runs the roles for one PPO step: `generate`, `experience`, then `train_micro_batch` per micro-batch."""

    def __init__(self, cfg: Step3Config, roles: Roles, tokenizer: Any, dist: DistInfo):
        self.cfg, self.roles, self.tokenizer, self.dist = cfg, roles, tokenizer, dist
        self.kl_ctl = AdaptiveKLController(cfg.ppo.kl_ctl, cfg.ppo.target_kl, cfg.ppo.kl_horizon)
        self.score_moments = RunningMoments()
        self.gen_kwargs = generation_kwargs(cfg, tokenizer)

    # -- rollout ---------------------------------------------------------------------------------
    def generate(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ds = self.cfg.ds
        sequences = generate_sequences(self.roles.actor, self.roles.actor_stage, batch["input_ids"],
                                       batch["attention_mask"], self.gen_kwargs, ds.enable_hybrid_engine,
                                       ds.unpin_actor_parameters)
        if ds.release_inference_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return sequences

    def experience(self, sequences: torch.Tensor, prompt_mask: torch.Tensor, step: int = 0
                   ) -> tuple[Experience, dict[str, torch.Tensor]]:
        """Score `sequences` with all four roles (eval mode) and turn them into PPO targets. `step` (the PPO
        step) is where `engine.runtime.faults` may make the reward model's output NaN."""
        roles, cfg = self.roles, self.cfg
        roles.actor.eval()
        roles.critic.eval()
        try:
            transform = self._normalise if cfg.ppo.normalize_reward else None
            reward = lambda seqs, mask: faults.poison(roles.reward(seqs, mask), step)  # noqa: E731
            return make_experience(roles.actor, roles.reference, roles.critic, reward, sequences,
                                   cfg.data.max_prompt_seq_len, self.tokenizer.pad_token_id,
                                   self.tokenizer.eos_token_id, kl_coef=self.kl_ctl.coef,
                                   clip_reward_value=cfg.ppo.clip_reward_value, gamma=cfg.ppo.gamma,
                                   lam=cfg.ppo.lam, kl_estimator=cfg.ppo.kl_estimator,
                                   whiten_advantages=cfg.ppo.whiten_advantages, score_transform=transform,
                                   prompt_mask=prompt_mask)
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
    def train_micro_batch(self, exp: Experience, token_count: float | None = None) -> dict[str, float]:
        """One PPO update of the actor, then of the critic, on a micro-batch of experience. The losses (and
        their statistics) divide sums over the answer actions by `token_count` (None: this micro-batch's own
        count; `ppo_updates` passes the global count per micro-batch, engine.rl.batch_mean)."""
        cfg, actor, critic = self.cfg, self.roles.actor, self.roles.critic
        seq, mask, action_mask = exp.sequences, exp.attention_mask, exp.action_mask
        logits = actor(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1]
        logprobs = logprobs_from_logits(logits, seq[:, 1:])
        pg_loss, pg_stats = policy_loss(logprobs, exp.logprobs, exp.advantages, action_mask, cfg.ppo.cliprange,
                                        token_count)
        if cfg.ppo.entropy_coef > 0:
            entropy = token_mean(entropy_from_logits(logits), action_mask, token_count)
            actor_loss = pg_loss - cfg.ppo.entropy_coef * entropy
        else:
            with torch.no_grad():
                entropy = token_mean(entropy_from_logits(logits), action_mask, token_count)
            actor_loss = pg_loss
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
                answer_norm, ptx_norm = normalisers[j // accum]
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
                            pieces: list[tuple[int, slice]]) -> list[tuple[float, float]]:
        """(answer-action, PTX-target) normaliser of each optimizer step's window of `pieces` (the micro-batches
        of one PPO epoch, in order), from the counts of the window on all ranks (engine.rl.batch_mean).

        The config makes a PPO epoch a whole number of windows, so windows line up with DeepSpeed's boundaries.
        With PTX the actor's DeepSpeed window is doubled (a PPO and a PTX backward per micro-batch) and
        DeepSpeed divides by twice --gradient_accumulation_steps; the normalisers count only the micro-batches
        of their own loss, so each of the two losses weighs one half, as in DeepSpeed-Chat."""
        accum = self.cfg.train.gradient_accumulation_steps
        local: list[float] = []
        for w in range(0, len(pieces), accum):
            window = pieces[w:w + accum]
            local.append(float(sum(experiences[i].action_mask[rows].sum() for i, rows in window)))
            local.append(float(sum(label_count(ptx[i]["labels"][rows]) for i, rows in window)) if ptx else 0.0)
        totals = all_reduce_sum(local, self.dist.device)
        world = self.dist.world_size
        return [(mean_normaliser(totals[k], accum, world), mean_normaliser(totals[k + 1], accum, world))
                for k in range(0, len(totals), 2)]

    def _aligned_steps(self) -> None:
        """--align_overflow (fp16): when exactly one of actor and critic overflowed, skip the other's step too."""
        actor_over, critic_over = step_together(self.roles.actor, self.roles.critic)
        if actor_over or critic_over:
            logger.warning("fp16 overflow (actor %s, critic %s): both steps skipped", actor_over, critic_over)

    def train_ptx(self, batch: dict[str, torch.Tensor], token_count: float | None = None) -> dict[str, float]:
        """One language-modelling update of the actor on a PTX batch, weighted by --unsup_coef; `token_count`
        as in `causal_lm_loss`."""
        actor = self.roles.actor
        logits = actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = causal_lm_loss(logits, batch["labels"], fp32=True, token_count=token_count)
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


