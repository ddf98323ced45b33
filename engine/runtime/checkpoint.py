"""Saving: Hugging Face folders (LoRA fused, safetensors, atomic) and DeepSpeed checkpoints for --resume.

A Hugging Face folder is written into a staging folder and then published: renamed into place when
the target does not exist yet, or, for a step's output folder that already holds logs, moved in file
by file with `config.json` removed first and written last, so a crash never leaves a folder that
loads as a model with half of its weights.

Resume state: DeepSpeed's own checkpoint (model, optimizer, scheduler) plus, per rank, the RNG states
and data position, written with safetensors/JSON. A checkpoint is sealed by `manifest.json` (every file
and its size, the world size), written after everything else; --resume takes the newest sealed
checkpoint whose files are all there at their sealed sizes, so one cut short by a kill, a full disk or
a truncated copy is skipped with a warning and the previous good one is used. DeepSpeed's own files
are pickles: they are read with `torch.load(weights_only=True)` and an allow-list of the few DeepSpeed
types they hold, so a tampered checkpoint cannot run code.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.errors import UserError
from engine.models.load import copy_missing_buffers, hf_model, is_quantized, is_quantized_tensor, meta_skeleton
from engine.runtime import faults
from engine.runtime.atomic import publish_folder, remove_folder, staging_folder, write_atomically
from engine.runtime.distributed import DistInfo, all_reduce_sum, barrier, set_seed
from engine.runtime.ds_private import safe_checkpoint_loading, universal_loading
from engine.runtime.nodes import output_is_node_local, writes_node_copy
from engine.runtime.universal import UNIVERSAL_DIR, UNIVERSAL_MANIFEST, ensure_universal, is_sharded, remove_universal

logger = logging.getLogger("engine")

DS_CHECKPOINT_DIR = "ds_checkpoint"
MANIFEST = "manifest.json"
TAG = re.compile(r"step(\d+)")  # a checkpoint tag, "step<N>"; every other folder in ds_checkpoint/ is a role's
# The data position a step saves: the epoch, the optimizer (PPO) steps taken in it and in all, and the samples of the
# epoch's global order all ranks consumed (`engine.runtime.run.ResumableSampler`), which any world size can resume.
POSITION_KEYS = ("epoch", "step_in_epoch", "samples_in_epoch", "global_step")


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
        tensors = {k: v.contiguous() for k, v in state.items()}
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))
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
        with staging_folder(target) as staging:
            # Building the skeleton runs weight init; keep it from moving the training RNG.
            with torch.random.fork_rng(devices=[]):
                model = _merged_model(module, state)
            model.config.use_cache = True
            model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
            if extra is not None:
                extra(staging)
            publish_folder(staging, target)
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
                      extra: Callable[[Path], None] | None = None, keep: int = 0) -> None:
    """DeepSpeed checkpoint `tag` ("step<N>") of one engine or {role: engine}, plus this rank's RNG states,
    then sealed (`manifest.json`, `latest`). `extra(tag_folder)` (called on every rank) adds files.
    `keep` > 0: afterwards only the newest `keep` sealed checkpoints are kept (with their
    checkpoint-<step>/ folders); unsealed leftovers of interrupted saves go too."""
    folder = output_dir / DS_CHECKPOINT_DIR
    seals = writes_node_copy(dist)  # rank 0; on node-local disks each node's local rank 0 too (engine/runtime/nodes.py)
    if seals and (folder / tag / MANIFEST).exists():  # re-writing a step (after a resume): unseal first
        (folder / tag / MANIFEST).unlink()
        remove_universal(folder, tag, list(_named_engines(engines)))  # its universal copy is of the old state
    barrier()
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
    faults.mid_save(tag_step(tag))
    barrier()
    if seals:
        position = {k: client_state[k] for k in POSITION_KEYS if k in client_state}
        _seal(folder, tag, list(_named_engines(engines)), dist.world_size, position)
        write_atomically(folder / "latest", tag)  # DeepSpeed's tools (zero_to_fp32.py) read `latest`
        if keep:
            prune_checkpoints(output_dir, keep)
    barrier()


def tag_step(tag: str) -> int:
    """The step of a checkpoint tag "step<N>"."""
    match = TAG.fullmatch(tag)
    if match is None:
        raise ValueError(f"not a checkpoint tag: {tag!r}")
    return int(match.group(1))


def _tag_files(folder: Path, tag: str, names: list[str]) -> list[Path]:
    """Every file of checkpoint `tag`: the per-role DeepSpeed folders and the tag folder itself (less the
    universal copy an elastic resume adds, which has its own seal)."""
    roots = {folder / tag} | {folder / name / tag for name in names}
    return sorted(p for root in roots if root.is_dir() for p in root.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, UNIVERSAL_MANIFEST)
                  and not p.relative_to(root).parts[0].startswith(UNIVERSAL_DIR))


def _seal(folder: Path, tag: str, names: list[str], world_size: int, position: dict[str, int] | None = None) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in _tag_files(folder, tag, names)}
    # The position is here too (it is also in DeepSpeed's client state), readable before any engine is built:
    # a run resuming with another world size sizes its learning-rate schedule from it (`resume_position`).
    manifest = {"tag": tag, "world_size": world_size, "roles": names, "position": position or {},
                "files": files}
    write_atomically(folder / tag / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def checkpoint_problem(folder: Path, tag: str) -> str | None:
    """Why checkpoint `tag` under `folder` (the ds_checkpoint folder) cannot be resumed from, or None.

    Checks the seal and every sealed file's presence and size (not a checksum: hashing the 100 GB of a
    7B run's optimizer state would add minutes to each save), so it catches a save cut short and a
    truncated copy, not bytes flipped in place."""
    path = folder / tag / MANIFEST
    if not path.is_file():
        return "not sealed (the save was interrupted)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"{path} is damaged"
    for name, size in files.items():
        f = folder / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is {f.stat().st_size} bytes, {size} when saved (truncated?)"
    return None


def checkpoint_tags(folder: Path) -> list[str]:
    """Checkpoint tags under `folder` (ds_checkpoint), newest first."""
    tags = [p.name for p in folder.iterdir() if p.is_dir() and TAG.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(tags, key=tag_step, reverse=True)


def find_resume_checkpoint(output_dir: Path, world_size: int | None = None, warn: bool = True) -> Path:
    """The tag folder of the newest complete checkpoint in `output_dir`; warns (`warn`) about each newer
    one that is incomplete. A UserError when there is none. `world_size`: the ranks of the run that resumes; one
    other than the checkpoint's is logged (the checkpoint is converted when it loads, `engine.runtime.universal`)."""
    folder = output_dir / DS_CHECKPOINT_DIR
    tags = checkpoint_tags(folder)
    if not tags:
        raise UserError(f"--resume: no checkpoint in {folder}; run without --resume, or set "
                        "--save_interval so that checkpoints are written")
    skipped = []
    for tag in tags:
        problem = checkpoint_problem(folder, tag)
        if problem is None:
            break
        skipped.append(f"{tag}: {problem}")
    else:
        raise UserError(f"--resume: no complete checkpoint in {folder} ({'; '.join(skipped)}); "
                        "run without --resume to start over")
    for reason in skipped if warn else []:
        logger.warning("--resume: skipping checkpoint %s; using %s", reason, tag)
    saved_world = saved_world_size(folder / tag)
    if warn and world_size is not None and saved_world != world_size:
        logger.info("--resume: checkpoint %s was written by %d ranks, this run has %d: elastic resume (the data "
                    "position is global; docs/reliability.md)", folder / tag, saved_world, world_size)
    return folder / tag


def saved_world_size(tag_folder: Path) -> int:
    """The number of ranks that wrote the sealed checkpoint `tag_folder`."""
    return int(json.loads((tag_folder / MANIFEST).read_text())["world_size"])


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (DeepSpeed state and checkpoint-<step>/ folder);
    remove the older ones and any incomplete one older than the newest complete one."""
    folder = output_dir / DS_CHECKPOINT_DIR
    tags = checkpoint_tags(folder)
    complete = [t for t in tags if checkpoint_problem(folder, t) is None]
    if not complete:
        return
    newest = tag_step(complete[0])
    doomed = complete[keep:] + [t for t in tags if t not in complete and tag_step(t) < newest]
    roles = [p for p in folder.iterdir() if p.is_dir() and not TAG.fullmatch(p.name)]
    for tag in doomed:
        # unsealed first: a crash mid-delete leaves no "complete" half
        (folder / tag / MANIFEST).unlink(missing_ok=True)
        for path in [folder / tag, *(r / tag for r in roles), output_dir / f"checkpoint-{tag_step(tag)}"]:
            if path.is_dir():
                remove_folder(path)
        logger.info("removed checkpoint %s (--save_total_limit %d)", tag, keep)


def _restore_rng(path: Path) -> None:
    from safetensors import safe_open

    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["python"])
    random.setstate((state[0], tuple(state[1]), state[2]))


def _load_trained(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's module loader for a model with a quantized frozen base (saved without it): every trained
    parameter must be in the checkpoint; the base stays as loaded from the model folder."""
    trained = {n for n, p in dst.named_parameters() if p.requires_grad}
    missing = sorted(trained - set(src))
    if missing:
        raise UserError(f"--resume: the checkpoint lacks trained weights of the model ({missing[:3]}); was it written "
                        "with other LoRA settings? Resume with the flags of the run that wrote it")
    dst.load_state_dict({k: v for k, v in src.items() if k in trained}, strict=False)


def resume_position(output_dir: Path) -> dict[str, int] | None:
    """The data position of the checkpoint --resume takes (None for a checkpoint sealed before the manifest
    held it), read before any engine is built."""
    tag_folder = find_resume_checkpoint(output_dir, warn=False)
    position = json.loads((tag_folder / MANIFEST).read_text()).get("position")
    return position if position and all(k in position for k in POSITION_KEYS) else None


def load_resume_state(engines: Any, output_dir: Path, dist: DistInfo, keys: tuple[str, ...] = POSITION_KEYS,
                      extra: Callable[[Path], None] | None = None, seed: int = 0) -> dict[str, Any]:
    """Restore the newest complete checkpoint written by `save_resume_state`; returns the `keys` of its client
    state. `extra(tag_folder)` (called on every rank) loads what the save's `extra` added.

    Written by another number of ranks (elastic resume), it is converted once (`engine.runtime.universal`) and
    loaded from DeepSpeed's universal format, and every rank seeds its RNGs from `seed` and the step (the
    saved per-rank RNG states belong to ranks that may no longer exist)."""
    tag_folder = find_resume_checkpoint(output_dir, dist.world_size)
    folder, tag = tag_folder.parent, tag_folder.name
    step = tag_step(tag)
    if all_reduce_sum([float(step)], dist.device)[0] != step * dist.world_size:
        raise UserError(f"--resume: the ranks found different checkpoints in {folder}; --output_dir must be one "
                        "folder that every rank sees (a shared file system), or, on disks of each machine's own, hold "
                        "the same checkpoints on every machine (as the run wrote them there)")
    saved_world = saved_world_size(tag_folder)
    elastic = saved_world != dist.world_size
    if elastic and output_is_node_local():
        # The converter reads every rank's shards from one folder; a node-local disk holds only its node's.
        raise UserError(f"--resume: checkpoint {tag_folder} was written by {saved_world} ranks, this run has "
                        f"{dist.world_size}, and --output_dir is on each machine's own disk; resume with "
                        f"{saved_world} ranks, or copy every machine's {folder.name}/ into one shared --output_dir")
    if elastic:
        _convert_on_rank0(folder, tag, list(_named_engines(engines)), saved_world, dist)
    client_state: dict[str, Any] = {}
    for name, engine in _named_engines(engines).items():
        state = _load_engine(engine, folder, name, tag, elastic)  # every engine loads; the first's client state
        client_state = client_state or state
    if extra is not None:
        extra(tag_folder)
    if elastic:
        _check_elastic_position(client_state, tag_folder, saved_world)
        set_seed(elastic_seed(seed, step))
    else:
        _restore_rng(_rng_file(tag_folder, dist.rank))
    logger.info("resumed from %s (step %s)%s", tag_folder, client_state.get("global_step"),
                f", written by {saved_world} ranks, on {dist.world_size}" if elastic else "")
    # DeepSpeed adds its own keys to the client state; hand back only what we saved (a checkpoint from before
    # elastic resume lacks "samples_in_epoch": `engine.runtime.run.start_run` derives it).
    return {k: client_state[k] for k in keys if k in client_state}


def _convert_on_rank0(folder: Path, tag: str, roles: list[str], saved_world: int, dist: DistInfo) -> None:
    """`ensure_universal` on rank 0 while the others wait; its refusal stops every rank with a message."""
    failure = None
    if dist.is_main:
        try:
            ensure_universal(folder, tag, roles, saved_world)
        except UserError as err:
            failure = err
    if all_reduce_sum([float(failure is not None)], dist.device)[0]:
        raise failure or UserError(f"--resume: rank 0 could not convert {folder / tag} (its message says why); "
                                   f"resume with the {saved_world} ranks that wrote it")


def _load_engine(engine: Any, folder: Path, name: str, tag: str, elastic: bool) -> dict[str, Any]:
    """Load one engine's DeepSpeed checkpoint (its universal copy for an elastic resume of a sharded one);
    returns its client state."""
    role_folder = folder / name / tag
    universal = elastic and is_sharded(role_folder)
    if universal and getattr(engine, "zero_nvme_offload_optimizer", lambda: False)():
        raise UserError(f"--resume: {role_folder} was written by another number of ranks with the optimizer "
                        "offloaded to NVMe, whose per-rank swap files DeepSpeed cannot re-shard; resume with "
                        "the ranks that wrote it")
    load_dir, load_tag = (role_folder, UNIVERSAL_DIR) if universal else (folder / name, tag)
    try:
        with safe_checkpoint_loading(engine), universal_loading(engine) if universal else contextlib.nullcontext():
            load_path, state = engine.load_checkpoint(
                str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                custom_load_fn=_load_trained if is_quantized(engine.module) else None)
    except (KeyError, ValueError) as err:
        # What DeepSpeed raises when the saved trained parameters are not this model's: a parameter it cannot
        # find (ZeRO) or an optimizer group of another size (torch's optimizer).
        raise UserError(f"--resume: {role_folder} does not fit the {name or 'model'} this run builds "
                        f"({type(err).__name__}: {str(err)[:160]}): it was saved with other trained parameters, "
                        "e.g. other LoRA flags (--lora_dim, --lora_module_name, --only_optimize_lora), or before "
                        "2026-12-08, when LoRA without --only_optimize_lora also trained the adapted Linear "
                        "weights; resume with the flags it was saved with, or start again in a new --output_dir"
                        ) from None
    if load_path is None:
        raise UserError(f"--resume: DeepSpeed could not load {load_dir / load_tag}")
    return state


def _check_elastic_position(client_state: dict[str, Any], tag_folder: Path, saved_world: int) -> None:
    if "samples_in_epoch" not in client_state:
        raise UserError(f"--resume: checkpoint {tag_folder} predates elastic resume (it holds the data position "
                        f"per rank, not the samples all ranks consumed); resume with the {saved_world} ranks that "
                        "wrote it")


def elastic_seed(seed: int, step: int) -> int:
    """The seed of every rank's RNGs after an elastic resume at `step`: like a fresh start (every rank seeded
    alike from --seed), moved on by the step, so the resumed run does not replay step 1's dropout masks."""
    return (seed * 1_000_003 + step) % (2 ** 63 - 1)
