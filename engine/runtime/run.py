"""Training plumbing shared by the steps: output folder, DeepSpeed engine, loaders, LM evaluation."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine.data.sources import default_data_note
from engine.errors import UserError
from engine.flags import config_to_dict, save_config_yaml
from engine.models.load import check_given_model, keep_bitsandbytes_out, load_tokenizer, resolve_model_path
from engine.observe import startup
from engine.observe.metrics import MetricsLogger
from engine.runtime.distributed import DistInfo, init_distributed, setup_logging
from engine.runtime.engines import build_ds_config
from engine.runtime.nodes import probe_output_dir

logger = logging.getLogger("engine")


def check_output_dir(output_dir: str, resume: bool = False) -> Path:
    """The output folder as a Path; refuses a file, an unwritable place and (`resume`) a folder without a
    checkpoint before any work starts, so a refused run writes nothing."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {path} is a file; give a folder path")
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"--output_dir {path}: {parent} is a file, not a folder; give a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {path}: no permission to write in {parent}; choose a folder you can write to")
    if resume:
        from engine.runtime.checkpoint import find_resume_checkpoint

        # A UserError naming the fix when there is no usable checkpoint (the launchers set WORLD_SIZE).
        find_resume_checkpoint(path, warn=False)  # start_run warns
    return path


def check_inputs(cfg: Any) -> None:
    """The input checks that read only the file system (today: the --data_path entries), run before the process
    group starts: DeepSpeed's start-up can take a minute the first time (engine/runtime/op_builds.py), and a
    typo must not wait for it."""
    from engine.data.sources import data_path_problem

    for spec in list(cfg.data.data_path) + list(getattr(cfg.data, "sft_only_data_path", [])):
        problem = data_path_problem(spec)
        if problem:
            raise UserError(problem)


# Tests: each rank appends "<epoch> <index>" per training sample it takes to <value>.rank<r>.
SAMPLE_LOG = "RLHF_ENGINE_SAMPLE_LOG"


class ResumableSampler(torch.utils.data.DistributedSampler):
    """A DistributedSampler that starts after the first `consumed` samples of the epoch's global order.

    The global order is the epoch's permutation (or 0..n-1 without shuffling) as torch's DistributedSampler
    makes it, independent of the world size; DistributedSampler deals it out round-robin (rank r takes
    positions r, r + W, r + 2W, ...), so after every rank has taken k samples the first k * W of the order are
    consumed. That count is the data position a checkpoint saves; a run with any number of ranks deals out the
    rest of the order round-robin again, so no sample of the epoch is skipped or repeated (`consumed` = 0 is
    exactly DistributedSampler, padding included: the tail is padded from the epoch's start to a multiple of
    the world size)."""

    def __init__(self, dataset: Any, dist: DistInfo, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle, seed=seed)
        self.consumed = 0
        self.log: str | None = None  # SAMPLE_LOG's value, set on training loaders by `epoch_windows`

    def epoch_order(self) -> list[int]:
        """The epoch's global sample order, before padding (DistributedSampler's permutation)."""
        if not self.shuffle:
            return list(range(len(self.dataset)))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        rest = order[self.consumed:]
        pad = -len(rest) % self.num_replicas
        if pad:
            rest += (order * -(-pad // len(order)))[:pad]
        mine = rest[self.rank::self.num_replicas]
        return iter(mine) if self.log is None else self._logged(mine)

    def _logged(self, indices: list[int]) -> Iterator[int]:
        for index in indices:  # appended as the loader draws it, so only what was trained on is logged
            with open(f"{self.log}.rank{self.rank}", "a") as f:
                f.write(f"{self.epoch} {index}\n")
            yield index

    def __len__(self) -> int:
        return -(-max(len(self.dataset) - self.consumed, 0) // self.num_replicas)


def make_loader(dataset: Any, batch_size: int, dist: DistInfo, shuffle: bool, seed: int,
                collate: Callable[[list[Any]], Any]) -> torch.utils.data.DataLoader:
    # Its own generator: creating an iterator then draws from it, not from the global RNG that
    # dropout uses, so a resumed run sees the same dropout masks as an uninterrupted one.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                       sampler=ResumableSampler(dataset, dist, shuffle, seed),
                                       generator=torch.Generator().manual_seed(seed))


@dataclass
class Schedule:
    """Optimizer steps per epoch and in total. Derived here only."""

    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, micro_batches_per_epoch: int, accumulation: int, epochs: int) -> Schedule:
        steps = micro_batches_per_epoch // accumulation
        if steps == 0:
            raise UserError(f"an epoch has {micro_batches_per_epoch} micro-batches per rank, fewer than "
                            f"--gradient_accumulation_steps {accumulation}; lower the batch size or accumulation")
        return cls(steps, steps * epochs)

    def resumed(self, position: dict[str, int] | None, loaders: torch.utils.data.DataLoader | list[Any],
                accumulation: int, epochs: int) -> Schedule:
        """The schedule of a run resuming at `position` (None: a fresh run): the steps taken, plus those left
        in the epoch at this run's world size (of the shortest of `loaders`), plus the later epochs. The same
        as `self` when the world size is the checkpoint's; with another one the global batch changes (the
        per-device batch stays), so the steps left change, and the learning-rate schedule ends with them."""
        if position is None:
            return self
        loaders = loaders if isinstance(loaders, list) else [loaders]
        left = min(windows_left(loader, position["epoch"], position["samples_in_epoch"], accumulation)
                   for loader in loaders)
        later = max(epochs - position["epoch"] - 1, 0) * self.steps_per_epoch
        return Schedule(self.steps_per_epoch, position["global_step"] + left + later)


def windows_left(loader: torch.utils.data.DataLoader, epoch: int, consumed: int, accumulation: int) -> int:
    """The accumulation windows (optimizer steps) of epoch `epoch` left after `consumed` samples (all ranks)."""
    sampler = loader.sampler
    sampler.set_epoch(epoch)
    sampler.consumed = consumed
    return len(loader) // accumulation


def epoch_start(position: dict[str, int], epoch: int) -> tuple[int, int]:
    """(steps taken, samples all ranks consumed) in epoch `epoch` before the loop starts it: the resumed
    position's in its epoch, else none."""
    return (position["step_in_epoch"], position["samples_in_epoch"]) if epoch == position["epoch"] else (0, 0)


def epoch_windows(loader: torch.utils.data.DataLoader, epoch: int, consumed: int,
                  accumulation: int) -> Iterator[tuple[int, list[Any]]]:
    """(samples of the epoch consumed after it, by all ranks; the window) for each accumulation window (a list
    of micro-batches) of epoch `epoch` after the first `consumed` samples of its global order.

    A resumed run starts part-way: the sampler skips what the ranks of the run that saved took, whatever
    their number. A last micro-batch short of the batch size counts as a full one (the epoch is then over)."""
    windows = windows_left(loader, epoch, consumed, accumulation)
    loader.sampler.log = os.environ.get(SAMPLE_LOG) or None
    per_window = accumulation * loader.batch_size * loader.sampler.num_replicas
    batches = iter(loader)
    for window in range(windows):
        yield consumed + (window + 1) * per_window, [next(batches) for _ in range(accumulation)]


def resume_position(out: Path) -> dict[str, int] | None:
    """The data position --resume starts from (see `engine.runtime.checkpoint.resume_position`)."""
    from engine.runtime.checkpoint import resume_position as position_of

    return position_of(out)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device`; other entries (prompt texts, reward columns) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class RunContext:
    """What a step's loop and its checkpoint writer share."""

    cfg: Any
    engine: Any
    tokenizer: Any
    dist: DistInfo
    out: Path
    zero_stage: int
    metrics: MetricsLogger


def save_checkpoint(run: RunContext, module: torch.nn.Module, step: int, position: dict[str, int]) -> None:
    """A Hugging Face folder checkpoint-<step>/ of `module` and the DeepSpeed state --resume reads."""
    from engine.runtime.checkpoint import save_hf_folder, save_resume_state

    save_hf_folder(module, run.tokenizer, run.out / f"checkpoint-{step}", run.zero_stage, run.dist,
                   extra=lambda folder: save_config_yaml(run.cfg, folder / "config.yaml"))
    save_resume_state(run.engine, run.out, f"step{step}", position, run.dist, keep=run.cfg.log.save_total_limit)


def start_run(cfg: Any, engine: Any, out: Path, dist: DistInfo, keys: tuple[str, ...] | None = None,
              load_extra: Callable[[Path], None] | None = None,
              samples_per_step: int = 0) -> tuple[dict[str, Any], MetricsLogger]:
    """(data position, metrics logger) of a step: from the newest complete checkpoint with --resume, else zero.

    `engine`: one DeepSpeed engine or {role: engine}; `keys`: the client-state keys to restore
    (default: the data position); `load_extra(tag_folder)` loads the files the save's `extra` added;
    `samples_per_step`: the samples one rank takes per step, for a checkpoint that predates "samples_in_epoch".
    Also creates --output_dir and saves the resolved config there (the first thing a run writes).
    """
    from engine.runtime.checkpoint import POSITION_KEYS, load_resume_state

    position: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "samples_in_epoch": 0, "global_step": 0}
    if cfg.log.resume:
        position.update(load_resume_state(engine, out, dist, keys or POSITION_KEYS, extra=load_extra,
                                          seed=cfg.train.seed))
        if "samples_in_epoch" not in position:  # same world size (load_resume_state checks): per rank x ranks
            position["samples_in_epoch"] = position["step_in_epoch"] * samples_per_step * dist.world_size
    out.mkdir(parents=True, exist_ok=True)
    notes = [n for n in (default_data_note(cfg.data.data_path),) if n]
    if dist.is_main:
        save_config_yaml(cfg, out / "config.yaml", notes)
    for note in notes:
        logger.info("%s", note)
    metrics = MetricsLogger(out, is_main=dist.is_main,
                            tensorboard_dir=tensorboard_dir(cfg, out),
                            wandb_project=cfg.log.wandb_project if cfg.log.enable_wandb else None,
                            wandb_config=config_to_dict(cfg), run_name=out.name, resume=cfg.log.resume)
    return position, metrics


def tensorboard_dir(cfg: Any, out: Path) -> Path | None:
    """Where the TensorBoard events go (None without --enable_tensorboard): the default folder inside `out`;
    a --tensorboard_path the user gave resolves as in DeepSpeed-Chat (dschat/utils/ds_utils.py): relative to
    the working directory, into <path>/ds_tensorboard_logs/<job>_tensorboard."""
    log = cfg.log
    if not log.enable_tensorboard:
        return None
    if "tensorboard_path" not in cfg.given:
        return out / log.tensorboard_path
    job = f"{log.tensorboard_job}_tensorboard"
    return Path(log.tensorboard_path).expanduser().absolute() / "ds_tensorboard_logs" / job


@dataclass
class StepInputs:
    """What steps 1 and 2 set up before their model, from the flags (`prepare_step`)."""

    out: Path
    dist: DistInfo
    ds_config: dict[str, Any]
    zero_stage: int
    model_path: str
    tokenizer: Any
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    schedule: Schedule
    cache_dir: Path  # the tokenized-data cache folder (--data_output_path, or data_cache/ in --output_dir)
    cfg: Any  # the config the step runs with (the parsed one, or `fit`'s)


def prepare_step(cfg: Any, load_data: Callable[..., tuple[Any, Any]], collate: Callable[..., Any],
                 role: str, fit: Callable[[Any, DistInfo, str], Any] | None = None) -> StepInputs:
    """Output folder, data paths, distributed set-up and seed, model path, DeepSpeed config, tokenizer, data
    loaders and schedule of step 1 or 2, in this order: bad input fails before anything is written.

    load_data: `(data_args, tokenizer, cache_dir, seed, dist) -> (train_set, eval_set)`.
    collate: a collate function taking `pad_id`. role: what errors call the model ("sft", "reward").
    fit: `(cfg, dist, model_path) -> cfg` (--auto_fit), run before the DeepSpeed config and batch sizes."""
    out = check_output_dir(cfg.log.output_dir, resume=cfg.log.resume)
    keep_bitsandbytes_out(quantized=False)  # steps 1 and 2 quantize nothing
    check_inputs(cfg)
    check_given_model(cfg.model, role=role)  # again in resolve_model_path; here before DeepSpeed starts
    dist = init_distributed(cfg.train.seed, peer_timeout=cfg.fault.peer_timeout,
                            startup_timeout=cfg.fault.startup_timeout)
    setup_logging(dist.is_main, cfg.log.verbose)
    probe_output_dir(out, dist)  # shared or node-local: who writes which checkpoint files
    with startup.part("model"):
        model_path = resolve_model_path(cfg.model, cfg.train.seed, dist, role=role)
        if fit is not None:
            cfg = fit(cfg, dist, model_path)
        tokenizer = load_tokenizer(model_path, cfg.model, cfg.data, role=role)
    ds_config = build_ds_config(cfg.ds, cfg.train, dist.world_size)
    cache_dir = Path(cfg.data.data_output_path or out / "data_cache")
    with startup.part("data"):
        train_set, eval_set = load_data(cfg.data, tokenizer, cache_dir, cfg.train.seed, dist)
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    t = cfg.train
    train_loader = make_loader(train_set, t.per_device_train_batch_size, dist, True, t.seed, collate_fn)
    eval_loader = make_loader(eval_set, t.per_device_eval_batch_size, dist, False, t.seed, collate_fn)
    schedule = Schedule.of(len(train_loader), t.gradient_accumulation_steps, t.num_train_epochs)
    schedule = schedule.resumed(resume_position(out) if cfg.log.resume else None, train_loader,
                                t.gradient_accumulation_steps, t.num_train_epochs)
    return StepInputs(out, dist, ds_config, ds_config["zero_optimization"]["stage"], model_path, tokenizer,
                      train_loader, eval_loader, schedule, cache_dir, cfg)
