"""One place every metric of every step goes through: a JSONL file always, TensorBoard and W&B when asked.

Keys are namespaced (`train/loss`, `eval/perplexity`, `ppo/clipfrac`, `perf/tflops`, `memory/peak_gb`).
Rank 0 writes; on every other rank `log` is a no-op, so callers can log unconditionally.

`metrics.jsonl` holds one JSON object per line, `{"step": 12, "train/loss": 1.93, ...}`. Each line is
flushed as it is written, so a crash keeps everything logged before it. Non-finite values (a NaN loss,
an infinite perplexity) are written as `null`: the file stays strict JSON that any reader can parse.
"""
from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.runtime.atomic import write_atomically

logger = logging.getLogger("engine")

METRICS_FILENAME = "metrics.jsonl"


def _to_json_value(value: Any) -> int | float | None:
    """A metric as a JSON number: ints stay ints, anything with `.item()` (tensors) becomes a float,
    and NaN / +-inf become None (`null`)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Write metrics to `<output_dir>/metrics.jsonl` (rank 0), plus TensorBoard / W&B when asked.

    Args:
        output_dir: folder for `metrics.jsonl` (created on rank 0).
        is_main: True on the rank that writes (rank 0); every other rank logs nothing.
        tensorboard_dir: when given, scalars also go to a TensorBoard `SummaryWriter` there.
        wandb_project: when given, scalars also go to Weights & Biases (the `wandb` package is needed).
        wandb_config: the run's resolved config, shown in the W&B run page.
        run_name: W&B run name ("" lets W&B choose).
        resume: keep the existing `metrics.jsonl`; the first `log(step, ...)` drops the rows with
            step >= `step` (they were logged after the checkpoint we resume from) before appending.
            Without `resume` an existing `metrics.jsonl` is replaced by a fresh one.
    """

    def __init__(self, output_dir: str | Path, *, is_main: bool, tensorboard_dir: str | Path | None = None,
                 wandb_project: str | None = None, wandb_config: dict | None = None, run_name: str = "",
                 resume: bool = False) -> None:
        self.path = Path(output_dir) / METRICS_FILENAME
        self.is_main = is_main
        self._tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir is not None else None
        self._resume_pending = resume
        self._file = None
        self._tb_writer = None
        self._wandb_run = None
        self._closed = False

        # Check for wandb on every rank, so a missing package fails the same way everywhere
        # instead of rank 0 alone exiting while the others wait in a collective.
        wandb = _import_wandb() if wandb_project is not None else None
        if not is_main:
            return

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            self._file = open(self.path, "w", encoding="utf-8")
            if self._tensorboard_dir is not None:
                self._tb_writer = _summary_writer(self._tensorboard_dir, purge_step=None)
        # When resuming, the file and the TensorBoard writer are opened by the first log(), which is
        # the first moment we know which step the run continues from.
        if wandb is not None:
            self._wandb_run = wandb.init(project=wandb_project, name=run_name or None, config=wandb_config,
                                         dir=str(self.path.parent))
        logger.info("metrics -> %s", self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (namespaced key -> number or 0-d tensor) at optimizer step `step`."""
        if not self.is_main:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log() called after close()")
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step number; pass it as the `step` argument")
        if self._resume_pending:
            self._start_resumed(step)
        row = {"step": int(step), **{key: _to_json_value(value) for key, value in metrics.items()}}
        # allow_nan=False: a non-finite value that slipped past _to_json_value is a bug, not a NaN token.
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

        finite = {key: value for key, value in row.items() if key != "step" and value is not None}
        if self._tb_writer is not None:
            for key, value in finite.items():
                self._tb_writer.add_scalar(key, value, global_step=row["step"])
            self._tb_writer.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(finite, step=row["step"])

    def _start_resumed(self, first_step: int) -> None:
        """Keep only the rows logged before `first_step`, then open the file for appending."""
        if self.path.exists():
            kept = [row for row in read_metrics(self.path) if row["step"] < first_step]
            write_atomically(self.path, "".join(json.dumps(row, allow_nan=False) + "\n" for row in kept))
            logger.info("resuming metrics at step %d: kept %d earlier rows of %s", first_step, len(kept), self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tensorboard_dir is not None:
            # purge_step hides TensorBoard events at steps >= first_step from the interrupted run.
            self._tb_writer = _summary_writer(self._tensorboard_dir, purge_step=int(first_step))
        self._resume_pending = False

    def close(self) -> None:
        """Flush and close every sink. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._tb_writer is not None:
            self._tb_writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _import_wandb():
    try:
        import wandb
    except ImportError as err:
        raise UserError("--enable_wandb needs the wandb package: pip install wandb") from err
    return wandb


def _summary_writer(log_dir: Path, purge_step: int | None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def read_metrics(path: str | Path) -> list[dict]:
    """Parse a `metrics.jsonl` into a list of rows (`null` values come back as None).

    A final line without its newline is the half-written last row of a run that crashed mid-write;
    it is skipped if it does not parse. A malformed line anywhere else raises ValueError.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # no trailing newline: the write was cut off
                logger.warning("%s: skipping truncated last line", path)
                continue
            raise ValueError(f"{path}:{number}: not a JSON object: {err}") from err
    return rows


def plot_curves(metrics_path: str | Path, png_path: str | Path, keys: list[str], title: str = "") -> Path | None:
    """Plot each of `keys` against step, one subplot per key that has at least one finite value.

    Returns the PNG path, or None (and writes nothing) when no key has data or the metrics file is
    missing. Uses matplotlib's Agg canvas directly: no display and no change to pyplot's global backend.
    """
    metrics_path, png_path = Path(metrics_path), Path(png_path)
    if not metrics_path.exists():
        return None
    rows = read_metrics(metrics_path)
    curves = {}
    for key in keys:
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            curves[key] = points
    if not curves:
        return None

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows))
    FigureCanvasAgg(fig)
    for index, (key, points) in enumerate(curves.items(), start=1):
        ax = fig.add_subplot(nrows, ncols, index)
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(png_path, png.getvalue())
    return png_path
