"""DPO's frozen reference, held one of three ways that give the same numbers:

- copy: a frozen copy of the starting model, partitioned like the policy under ZeRO-3 (else whole), optionally
  offloaded or quantized like step 3's frozen roles (`engine.models.roles.init_frozen`);
- adapters_off: the policy itself with its LoRA adapters switched off (peft's `disable_adapter`), valid while
  the base is frozen (--only_optimize_lora); no second copy of the weights;
- precomputed (--precompute_ref_logps): one pass of either of the above over both splits before training, cached
  beside the tokenized data (`engine.data.ref_logps`); the copy is then dropped, so no reference is in memory
  while training.
"""
from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine.config import DPOConfig
from engine.data import ref_logps
from engine.data.cache import tokenizer_fingerprint
from engine.data.pairs import collate_dpo_pairs
from engine.dpo.logps import PairLogps, answer_counts, pair_logps
from engine.models.load import load_causal_lm
from engine.models.roles import init_frozen
from engine.runtime.distributed import DistInfo, all_reduce_sum
from engine.runtime.ds_config import eval_ds_config, frozen_zero_stage
from engine.runtime.run import to_device

logger = logging.getLogger("engine")

SPLITS = ("train", "eval")


@contextlib.contextmanager
def adapters_off(engine: Any) -> Iterator[None]:
    """The policy engine as its own reference: eval mode (no dropout), LoRA adapters disabled; restores both.
    (The mode is read from the engine's module: DeepSpeed's engine passes train()/eval() on without setting its
    own `training`.)"""
    was_training = engine.module.training
    engine.eval()
    try:
        with engine.module.disable_adapter():
            yield
    finally:
        engine.train(was_training)


class Reference:
    """The reference's answer log-probs of a pair batch, however it is held (module docstring).

    mode: 'copy' (`model` is the frozen role), 'adapters_off' (`policy` is the trained engine), 'precomputed'
    (`cached` is {split: {"chosen", "rejected"}} indexed by the pair's row in the split) or 'none' (SimPO)."""

    def __init__(self, mode: str, chunk_size: int | None, model: Any = None, policy: Any = None,
                 cached: dict[str, dict[str, torch.Tensor]] | None = None):
        self.mode, self.chunk_size, self.model, self.policy, self.cached = mode, chunk_size, model, policy, cached

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], split: str) -> PairLogps | None:
        """The reference's `PairLogps` of `batch` (on the batch's device); None without a reference."""
        if self.mode == "none":
            return None
        if self.mode == "copy":
            return pair_logps(self.model, batch, self.chunk_size)
        if self.mode == "adapters_off":
            with adapters_off(self.policy):
                return pair_logps(self.policy, batch, self.chunk_size)
        if self.mode == "precomputed":
            rows, device = batch["index"].cpu(), batch["input_ids"].device
            cached = self.cached[split]
            return PairLogps(cached["chosen"][rows].to(device), cached["rejected"][rows].to(device),
                             *answer_counts(batch))
        raise ValueError(f"unknown reference mode {self.mode!r}")


def load_reference_copy(cfg: DPOConfig, model_path: str, tokenizer: Any, dist: DistInfo) -> Any:
    """The frozen copy of the starting model: ZeRO-3 iff the policy is (offloaded with --offload_reference_model),
    or whole on every rank; a plain module when quantized (--reference_quantization)."""
    quantization = cfg.dpo.reference_quantization
    ds_config = None if quantization != "none" else eval_ds_config(
        zero_stage=frozen_zero_stage(cfg.ds.zero_stage), offload=cfg.dpo.offload_reference_model, dtype=cfg.ds.dtype,
        micro_batch_size=cfg.train.per_device_train_batch_size, world_size=dist.world_size)
    model = load_causal_lm(model_path, cfg.model, tokenizer, cfg.ds.dtype, ds_config, False, quantization,
                           dist.device, role="reference")
    return init_frozen(model, ds_config)


def reference_fingerprint(cfg: DPOConfig, model_path: str) -> str:
    """What the reference's numbers depend on: the starting model's config and weights (a hub name's cached
    snapshot; `ref_logps.fingerprint_model_folder`), the dtype and the quantization (not how it is held: a copy
    and the policy without adapters give the same numbers)."""
    from engine.data.cache import digest

    return digest({"model": ref_logps.fingerprint_model_folder(model_path), "dtype": cfg.ds.dtype,
                   "quantization": cfg.dpo.reference_quantization})


def cache_paths(cfg: DPOConfig, model_path: str, tokenizer: Any, data_cache: Path) -> dict[str, Path]:
    """{split: the file of its precomputed log-probs}, beside the tokenized pairs `data_cache`."""
    tok, ref = tokenizer_fingerprint(tokenizer), reference_fingerprint(cfg, model_path)
    return {split: ref_logps.cache_path(f"{data_cache.stem}/{split}", tok, ref, data_cache.parent) for split in SPLITS}


def precompute(reference: Reference, datasets: dict[str, Any], batch_size: int, pad_id: int, dist: DistInfo
               ) -> dict[str, dict[str, torch.Tensor]]:
    """{split: {"chosen", "rejected"}}: every pair's reference log-probs, each rank computing its share (the same
    number of batches on every rank, as ZeRO-3's gathers need), then summed over the ranks."""
    out = {}
    for split, dataset in datasets.items():
        n = len(dataset)
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                                      shuffle=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                             collate_fn=partial(collate_dpo_pairs, pad_id=pad_id))
        sums = torch.zeros(3, n, dtype=torch.float64)  # chosen, rejected, times seen (the sampler repeats rows)
        for batch in loader:
            logps = reference.logps(to_device(batch, dist.device), split)
            rows = batch["index"]
            sums[0, rows] += logps.chosen.double().cpu()
            sums[1, rows] += logps.rejected.double().cpu()
            sums[2, rows] += 1
        total = torch.tensor(all_reduce_sum(sums.flatten().tolist(), dist.device), dtype=torch.float64).view(3, n)
        out[split] = {"chosen": (total[0] / total[2]).float(), "rejected": (total[1] / total[2]).float()}
    return out


def precomputed_reference(cfg: DPOConfig, source: Reference, paths: dict[str, Path], datasets: dict[str, Any],
                          pad_id: int, dist: DistInfo) -> Reference:
    """The 'precomputed' reference: read from `paths` when every rank has them, else computed with `source` (a
    copy or the policy without adapters) and written by rank 0."""
    cached = {split: ref_logps.load(path) for split, path in paths.items()}
    usable = all(c is not None and len(c["chosen"]) == len(datasets[s]) for s, c in cached.items())
    if all_reduce_sum([float(not usable)], dist.device)[0] == 0:
        logger.info("reference log-probs read from %s", ", ".join(str(p) for p in paths.values()))
        return Reference("precomputed", source.chunk_size, cached=cached)
    computed = precompute(source, datasets, cfg.train.per_device_eval_batch_size, pad_id, dist)
    if dist.is_main:
        for split, path in paths.items():
            ref_logps.save(path, computed[split]["chosen"], computed[split]["rejected"],
                           {"split": split, "rows": str(len(datasets[split]))})
        logger.info("reference log-probs of %s pairs computed and cached in %s",
                    " + ".join(str(len(d)) for d in datasets.values()), paths["train"].parent)
    return Reference("precomputed", source.chunk_size, cached=computed)


def release(model: Any) -> None:
    """Drop a frozen copy: its DeepSpeed engine's hooks and partitions, then the memory."""
    destroy = getattr(model, "destroy", None)
    if callable(destroy):
        destroy()
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
