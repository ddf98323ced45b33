"""Saving: Hugging Face folders (LoRA fused, safetensors, atomic) and DeepSpeed checkpoints for --resume.

A Hugging Face folder is written into a staging folder and then published: renamed into place when
the target does not exist yet, or, for a step's output folder that already holds logs, moved in file
by file with `config.json` removed first and written last, so a crash never leaves a folder that
loads as a model with half of its weights.

Resume state: DeepSpeed's own checkpoint (model, optimizer, scheduler) plus, per rank, the RNG states
and data position, written with safetensors/JSON (no pickle).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from engine.distributed import DistInfo, barrier
from engine.errors import UserError
from engine.model import copy_missing_buffers, hf_model, is_quantized, is_quantized_tensor, meta_skeleton

logger = logging.getLogger("engine")

DS_CHECKPOINT_DIR = "ds_checkpoint"
POSITION_KEYS = ("epoch", "step_in_epoch", "global_step")  # the data position a step saves


# ----------------------------------------------------------------------------------------------
# Full weights from any ZeRO stage
# ----------------------------------------------------------------------------------------------
def gather_state_dict(module: torch.nn.Module, zero_stage: int, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The module's full state dict on rank 0 (CPU tensors), None on the other ranks.

    Under ZeRO-3 every rank takes part in gathering one parameter at a time, so no rank ever holds
    more than one full parameter beyond its shard.
    """
    out: dict[str, torch.Tensor] = {}
    if zero_stage == 3:
        import deepspeed

        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if is_main:
                    out[name] = p.detach().cpu().clone()
        if is_main:
            for name, b in module.named_buffers():
                out[name] = b.detach().cpu().clone()
            persistent = set(module.state_dict().keys())
            out = {k: v for k, v in out.items() if k in persistent}
        return out if is_main else None
    if not is_main:
        return None
    return {k: v.detach().cpu().clone() for k, v in _plain_state_dict(module).items()}


def _plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` less bitsandbytes-quantized weights and the statistics bitsandbytes stores beside
    them (absmax, quant maps, row scales): they are frozen and re-made from the model folder, and torch's
    `load_state_dict` cannot load them back into a quantized layer."""
    state = module.state_dict()
    params = dict(module.named_parameters())
    if not any(is_quantized_tensor(p) for p in params.values()):
        return state
    keep = {n for n, p in params.items() if not is_quantized_tensor(p)} | {n for n, _ in module.named_buffers()}
    return {k: v for k, v in state.items() if k in keep}


def save_module_tensors(module: torch.nn.Module, zero_stage: int, path: Path, dist: DistInfo) -> None:
    """The module's full state dict as one safetensors file (rank 0 writes; all ranks must call)."""
    state = gather_state_dict(module, zero_stage, dist.is_main)
    if dist.is_main:
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)
    barrier()


@torch.no_grad()
def load_module_tensors(module: torch.nn.Module, zero_stage: int, path: Path, dist: DistInfo) -> None:
    """Load a `save_module_tensors` file into `module`, whose ZeRO-3 shards are updated in place."""
    if not path.is_file():
        raise UserError(f"--resume: {path} is missing; the checkpoint is incomplete")
    state = load_file(str(path))
    if zero_stage == 3:
        import deepspeed

        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.is_main:
                    p.data.copy_(state[name])
        return
    missing, unexpected = module.load_state_dict(state, strict=False)
    expected = {n for n, p in module.named_parameters() if not is_quantized_tensor(p)}  # see _plain_state_dict
    if unexpected or [k for k in missing if k in expected]:
        raise UserError(f"--resume: {path} does not match the model ({(unexpected or missing)[:3]})")


def _merged_model(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CPU copy of `module`'s architecture holding `state`, with any LoRA fused in.

    The skeleton is built on the meta device (no memory, no init) and the gathered tensors are
    assigned into it (so `state` must be a copy, as `gather_state_dict` returns, not live weights);
    peft's `merge_and_unload` then folds the adapters into the base weights.
    """
    from peft import PeftModel, get_peft_model

    skeleton = meta_skeleton(hf_model(module))  # config copied: the save must not touch the training model
    # A quantized model's config names its bitsandbytes settings; the saved weights are full precision.
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(skeleton.config, key):
            delattr(skeleton.config, key)
    if isinstance(module, PeftModel):
        skeleton = get_peft_model(skeleton, module.peft_config["default"])
    missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"state dict keys not in the model: {unexpected[:5]}")
    copy_missing_buffers(skeleton, module, clone=True)
    # Tie before merging, so tied output embeddings (OPT, GPT-2) stay one tensor.
    (skeleton.get_base_model() if isinstance(skeleton, PeftModel) else skeleton).tie_weights()
    if isinstance(skeleton, PeftModel):
        skeleton = skeleton.merge_and_unload()
    skeleton.tie_weights()
    still_meta = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"weights missing from the gathered state: {still_meta[:5]} (missing {missing[:5]})")
    return skeleton


def _full_precision_weights(module: torch.nn.Module, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name in `module`: full-precision tensor of `base`} for each quantized weight of `module`.

    `base` is the same model loaded without quantization; it gets `module`'s LoRA layout (peft) so that
    the names pair exactly."""
    from peft import PeftModel, get_peft_model

    if isinstance(module, PeftModel):
        with torch.random.fork_rng(devices=[]):  # adapter init of a throw-away copy
            base = get_peft_model(base, module.peft_config["default"])
    base_params = dict(base.named_parameters())
    return {name: base_params[name].detach() for name, p in module.named_parameters() if is_quantized_tensor(p)}


# ----------------------------------------------------------------------------------------------
# Atomic Hugging Face folders
# ----------------------------------------------------------------------------------------------
def publish_folder(staging: Path, target: Path) -> None:
    """Move a finished staging folder to `target` so that a crash never leaves a loadable half."""
    if not target.exists():
        os.rename(staging, target)
        return
    (target / "config.json").unlink(missing_ok=True)  # not loadable until the move completes
    files = sorted(p for p in staging.iterdir() if p.name != "config.json")
    for path in files + [staging / "config.json"]:
        dest = target / path.name
        if dest.is_dir() and not path.is_dir():
            shutil.rmtree(dest)
        os.replace(path, dest)
    shutil.rmtree(staging, ignore_errors=True)


def save_hf_folder(module: torch.nn.Module, tokenizer: Any, target: Path, zero_stage: int, dist: DistInfo,
                   extra: Callable[[Path], None] | None = None,
                   full_precision: Callable[[], torch.nn.Module] | None = None) -> None:
    """Write `module` (LoRA fused) as a Hugging Face folder at `target`; all ranks must call this.

    `extra(folder)` adds files (e.g. the resolved config) before the folder is published.
    `full_precision()`, for a module with bitsandbytes-quantized weights, loads the same model unquantized
    on the CPU: its weights replace the quantized ones, so the folder is full precision (LoRA merged into
    the original base, not into its 4-bit rounding) and loads without bitsandbytes.
    """
    state = gather_state_dict(module, zero_stage, dist.is_main)
    if dist.is_main and is_quantized(module):
        if full_precision is None:
            raise ValueError("saving a quantized model needs `full_precision` (the base is not kept in full precision)")
        state |= _full_precision_weights(module, full_precision())
    if dist.is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
        try:
            # Building the skeleton runs weight init; keep it from moving the training RNG.
            with torch.random.fork_rng(devices=[]):
                model = _merged_model(module, state)
            model.config.use_cache = True
            model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
            if extra is not None:
                extra(staging)
            publish_folder(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("saved model to %s", target)
    barrier()


# ----------------------------------------------------------------------------------------------
# DeepSpeed checkpoints + RNG + data position, for --resume
# ----------------------------------------------------------------------------------------------
def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_rank{rank}.safetensors"


def _named_engines(engines: Any) -> dict[str, Any]:
    """One engine (saved at the checkpoint folder's top) or {role: engine} (one subfolder per role)."""
    return engines if isinstance(engines, dict) else {"": engines}


def save_resume_state(engines: Any, output_dir: Path, tag: str, client_state: dict[str, Any], dist: DistInfo,
                      extra: Callable[[Path], None] | None = None) -> None:
    """DeepSpeed checkpoint `tag` of one engine or {role: engine}, plus this rank's RNG states;
    `latest` points at it once all is written. `extra(tag_folder)` (called on every rank) adds files."""
    folder = output_dir / DS_CHECKPOINT_DIR
    # DeepSpeed writes its `latest` file at the end of save_checkpoint; we write ours only after the
    # RNG files too, so an interrupted save is never picked up by --resume.
    for name, engine in _named_engines(engines).items():
        # A quantized base is frozen and re-made from the model folder: only what trains is saved.
        engine.save_checkpoint(str(folder / name), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=is_quantized(engine.module))
    (folder / tag).mkdir(parents=True, exist_ok=True)
    if extra is not None:
        extra(folder / tag)
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"python": json.dumps(random.getstate())}
    save_file(tensors, str(_rng_file(folder / tag, dist.rank)), metadata=meta)
    barrier()
    if dist.is_main:
        tmp = folder / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, folder / "latest")
    barrier()


def _restore_rng(path: Path) -> None:
    from safetensors import safe_open

    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["python"])
    random.setstate((state[0], tuple(state[1]), state[2]))


def latest_checkpoint(output_dir: Path) -> Path:
    """The tag folder `latest` points at; a UserError when there is none."""
    folder = output_dir / DS_CHECKPOINT_DIR
    latest = folder / "latest"
    if not latest.is_file():
        raise UserError(f"--resume: no checkpoint in {folder}; run without --resume, or set "
                        "--save_interval so that checkpoints are written")
    return folder / latest.read_text().strip()


def _load_trained(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's module loader for a model with a quantized frozen base (saved without it): every trained
    parameter must be in the checkpoint; the base stays as loaded from the model folder."""
    trained = {n for n, p in dst.named_parameters() if p.requires_grad}
    missing = sorted(trained - set(src))
    if missing:
        raise UserError(f"--resume: the checkpoint lacks trained weights of the model ({missing[:3]}); was it written "
                        "with other LoRA settings? Resume with the flags of the run that wrote it")
    dst.load_state_dict({k: v for k, v in src.items() if k in trained}, strict=False)


def load_resume_state(engines: Any, output_dir: Path, dist: DistInfo, keys: tuple[str, ...] = POSITION_KEYS
                      ) -> dict[str, Any]:
    """Restore the last checkpoint written by `save_resume_state`; returns the `keys` of its client state."""
    tag_folder = latest_checkpoint(output_dir)
    folder, tag = tag_folder.parent, tag_folder.name
    rng = _rng_file(tag_folder, dist.rank)
    if not rng.is_file():
        raise UserError(f"--resume: {rng} is missing; was the checkpoint written with a different "
                        "number of ranks? Resume with the same world size")
    client_state: dict[str, Any] = {}
    for name, engine in _named_engines(engines).items():
        load_path, state = engine.load_checkpoint(str(folder / name), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True,
                                                  custom_load_fn=_load_trained if is_quantized(engine.module) else None)
        if load_path is None:
            raise UserError(f"--resume: DeepSpeed could not load {folder / name / tag}")
        client_state = client_state or state
    _restore_rng(rng)
    logger.info("resumed from %s (step %s)", tag_folder, client_state.get("global_step"))
    # DeepSpeed adds its own keys to the client state; hand back only what we saved.
    return {k: client_state[k] for k in keys}
