"""What a step config asks of this machine that it lacks: a GPU, installed packages, files and folders.

The configs' own checks are pure (`cfg.problems()` in `engine.config`); these read the machine, so
`engine.flags.check` lists both together, and the planner, which plans for other machines, uses only
the pure ones.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from engine.config import Step3Config
from engine.data.unsupervised import missing_source_problem
from engine.errors import UserError
from engine.runtime.distributed import gpu_wanted
from engine.runtime.ds_config import load_template


def cuda_available() -> bool:
    return gpu_wanted()


def default_dtype() -> str:
    """DeepSpeed-Chat defaults to fp16, which DeepSpeed cannot run on a CPU; bf16 can."""
    return "fp16" if cuda_available() else "bf16"


def missing_quantization_packages() -> list[str]:
    """The packages bitsandbytes quantization needs that are not installed (transformers loads bitsandbytes
    models through accelerate's device map)."""
    return [name for name in ("bitsandbytes", "accelerate") if importlib.util.find_spec(name) is None]


def preflight(cfg: Any) -> list[str]:
    """The problems of running the step config `cfg` here (empty when there are none)."""
    out = []
    if cfg.ds.dtype == "fp16" and not cuda_available():
        out.append("--dtype fp16 needs a GPU (DeepSpeed cannot run fp16 on a CPU); use --dtype bf16 or fp32")
    if cfg.model.attn_implementation == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
        out.append("--attn_implementation flash_attention_2 needs the flash-attn package "
                   "(pip install -e '.[flash]' on a CUDA machine); use sdpa or eager")
    if cfg.ds.deepspeed_config:
        out += deepspeed_config_problems(cfg.ds.deepspeed_config)
    path = cfg.data.data_output_path
    if path and Path(path).expanduser().exists() and not Path(path).expanduser().is_dir():
        out.append(f"--data_output_path {path} is a file; give a folder path for the tokenized-data cache")
    if isinstance(cfg, Step3Config):
        out += _step3_preflight(cfg)
    dpo = getattr(cfg, "dpo", None)  # DPOConfig
    missing = missing_quantization_packages() if dpo is not None and dpo.reference_quantization != "none" else []
    if missing:
        out.append(f"--reference_quantization needs {' and '.join(missing)}, which "
                   f"{'are' if len(missing) > 1 else 'is'} not installed: pip install {' '.join(missing)}")
    return out


def deepspeed_config_problems(path: str) -> list[str]:
    """A --deepspeed_config that is missing, a folder or not a JSON object (its values are checked against
    the flags when the DeepSpeed config is built)."""
    if Path(path).is_dir():
        return [f"--deepspeed_config {path} is a folder; give a DeepSpeed JSON file (see ds_configs/)"]
    if not Path(path).is_file():
        return [f"--deepspeed_config {path}: no such file; give a DeepSpeed JSON file (see ds_configs/)"]
    try:
        load_template(path)
    except UserError as err:
        return [str(err)]
    return []


def _step3_preflight(cfg: Step3Config) -> list[str]:
    out = []
    ds = cfg.ds
    if cfg.data.unsupervised_dataset_name:
        ptx_problem = missing_source_problem(cfg.data.unsupervised_dataset_name)  # a local path that is not there
        if ptx_problem:
            out.append(ptx_problem)
    chosen = [f"--{role}_quantization" for role in ("actor", "reference", "reward")
              if getattr(ds, f"{role}_quantization") != "none"]
    missing = missing_quantization_packages() if chosen else []
    if missing:
        out.append(f"{' and '.join(chosen)} {'need' if len(chosen) > 1 else 'needs'} {' and '.join(missing)}, "
                   f"which {'are' if len(missing) > 1 else 'is'} not installed: pip install {' '.join(missing)}")
    return out
