"""Step 3's roles built as main.py builds them, then three PPO updates: the reference and the reward model
stay frozen (no optimizer, eval mode, no gradients, weights unchanged), the actor and its EMA move.

    python -m tests.helpers.frozen_probe STEP3_FLAGS...

prints "frozen ok" and exits 0, or fails an assertion (tests/smoke/test_step3_rlhf.py runs it).
"""
from __future__ import annotations

import sys

import torch

from engine.config import Step3Config
from engine.data.prompts import collate_left_padded
from engine.flags import parse_config
from engine.models.roles import build_roles, load_step3_tokenizer, resolve_paths
from engine.ppo.trainer import PPOTrainer
from engine.runtime.distributed import init_distributed

PROMPTS = (" Human: sort 3 1 2 Assistant:", " Human: sort 9 8 7 6 Assistant:")


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def main(argv: list[str]) -> None:
    cfg = parse_config(Step3Config, argv)
    dist = init_distributed(cfg.train.seed)
    actor_path, critic_path = resolve_paths(cfg, dist)
    tok = load_step3_tokenizer(cfg, actor_path, critic_path)
    roles = build_roles(cfg, dist, tok, actor_path, critic_path, total_steps=10, ptx=False)
    frozen = {"reference": roles.reference, "reward": roles.reward, "ema": roles.ema}
    for name, engine in frozen.items():
        assert engine.optimizer is None, name
        assert not engine.module.training, name
        assert not any(p.requires_grad for p in engine.module.parameters()), name
    before = {name: snapshot(engine.module) for name, engine in frozen.items()}
    actor_before = snapshot(roles.actor.module)

    trainer = PPOTrainer(cfg, roles, tok, dist)
    prompts = [torch.tensor(tok(p)["input_ids"]) for p in PROMPTS]
    batch = collate_left_padded(prompts, tok.pad_token_id, cfg.data.max_prompt_seq_len)
    for _ in range(3):
        exp, _ = trainer.experience(trainer.generate(batch)[0], batch["attention_mask"])
        trainer.train_micro_batch(exp)
        trainer.update_ema()

    for name, engine in frozen.items():
        assert not engine.module.training, name
        if name != "ema":  # the EMA is frozen to the optimizer but moves towards the actor
            assert not changed(before[name], engine.module), name
    assert changed(actor_before, roles.actor.module) and changed(before["ema"], roles.ema.module)
    print("frozen ok")


if __name__ == "__main__":
    main(sys.argv[1:])
