"""Throughput (samples/s, TFLOPs) and memory numbers, as DeepSpeed-Chat reports them, with two fixes.

The FLOPs count is the one DeepSpeed-Chat takes from the Megatron-LM paper (Narayanan et al. 2021,
"Efficient Large-Scale Language Model Training on GPU Clusters", eq. 3), see `calculate_flops`.

Where our numbers differ from DeepSpeed-Chat's `print_throughput` (dschat/utils/perf.py):
  * TFLOPs: DeepSpeed-Chat counts the FLOPs of the *per-device* batch and then divides by
    `step_time * world_size` as well, which under-reports by a factor of the world size. We report
    per-device TFLOPs: flops(per-device batch) / step_time. On one device the two agree.
  * samples/s: DeepSpeed-Chat's is per device (per-device batch / step_time); ours is global
    (per-device batch * world_size / step_time). Divide by the world size to compare.

The math functions import only the standard library; the memory helpers use torch (and psutil for
the current RSS on CPU).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def calculate_flops(checkpoint_activations_factor: float, batch_size: int, seq_length: int, num_layers: int,
                    hidden_size: int, vocab_size: int) -> float:
    """Training FLOPs of one forward + backward over `batch_size` sequences of `seq_length` tokens.

        F = 24 k B s L h^2 (1 + s / (6 h) + V / (16 L h))

    24 B s L h^2 (1 + s/(6h)) is one forward of the L layers: 24 B s h^2 for the weight matmuls and
    4 B s^2 h for the attention scores, per layer. k counts forward-equivalents: 3 (forward + a backward
    twice as costly), 4 with activation checkpointing (one more forward); see `activation_factor`.
    V/(16 L h) is the logit layer, written for k = 4 where it comes to 6 B s h V (it is not recomputed).
    """
    k, b, s, n_layers, h, v = checkpoint_activations_factor, batch_size, seq_length, num_layers, hidden_size, vocab_size
    return 24.0 * k * b * s * n_layers * h**2 * (1.0 + s / (6.0 * h) + v / (16.0 * n_layers * h))


def activation_factor(gradient_checkpointing: bool, lora_dim: int, hidden_size: int) -> float:
    """The k of `calculate_flops`: passes over the weights per step (1 forward + 2 backward, +1 re-forward).

    With LoRA (lora_dim > 0) the frozen weights need no weight gradient, so DeepSpeed-Chat removes that
    pass and adds back the adapters' share of it: k -= 1 - 2 * lora_dim / hidden_size.
    """
    if lora_dim < 0:
        raise ValueError(f"lora_dim must be >= 0, got {lora_dim}")
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be > 0, got {hidden_size}")
    k = 4.0 if gradient_checkpointing else 3.0
    if lora_dim > 0:
        k -= 1.0 - 2.0 * lora_dim / hidden_size
    return k


_SHAPE_FIELDS = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "vocab_size": ("vocab_size",),
}


def model_shape(hf_config) -> tuple[int, int, int]:
    """(num_layers, hidden_size, vocab_size) of a Hugging Face config, whichever names its family uses.

    Multimodal configs that nest the language model (`get_text_config()`) are read from the text part.
    """
    config = hf_config.get_text_config() if callable(getattr(hf_config, "get_text_config", None)) else hf_config
    shape = []
    for what, names in _SHAPE_FIELDS.items():
        value = next((getattr(config, name) for name in names if getattr(config, name, None) is not None), None)
        if value is None:
            raise ValueError(f"{type(config).__name__} has none of {', '.join(names)}: cannot read its {what}")
        shape.append(int(value))
    return tuple(shape)


def train_throughput(*, step_time_s: float, per_device_batch: int, world_size: int, seq_length: int, hf_config,
                     gradient_checkpointing: bool, lora_dim: int) -> dict[str, float]:
    """Throughput of one timed step in which every device trained on `per_device_batch` sequences.

    Args:
        step_time_s: wall time of the step (forward + backward + optimizer), seconds.
        per_device_batch: sequences each device processed in that time. With gradient accumulation,
            time the whole optimizer step and pass micro-batch size * accumulation steps.
        world_size: number of data-parallel devices.
        seq_length: tokens per sequence (the padded max_seq_len, as DeepSpeed-Chat counts).
        hf_config: the model's Hugging Face config (see `model_shape`).

    Returns `perf/samples_per_s` (global), `perf/tflops` (per device) and `perf/step_time_s`.
    """
    if step_time_s <= 0:
        raise ValueError(f"step_time_s must be > 0, got {step_time_s}")
    num_layers, hidden_size, vocab_size = model_shape(hf_config)
    k = activation_factor(gradient_checkpointing, lora_dim, hidden_size)
    flops = calculate_flops(k, per_device_batch, seq_length, num_layers, hidden_size, vocab_size)
    # DeepSpeed-Chat: samples/s = per_device_batch / t (per device) and TFLOPs = flops / (t * world * 1e12),
    # dividing the per-device FLOPs by the world size a second time. We report global samples/s and
    # per-device TFLOPs (see the module docstring).
    return {
        "perf/samples_per_s": per_device_batch * world_size / step_time_s,
        "perf/tflops": flops / (step_time_s * 1e12),
        "perf/step_time_s": step_time_s,
    }


def _is_cuda(device: torch.device | str | int | None) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # torch's convention: a bare index is a CUDA device
        return True
    return torch.device(device).type == "cuda"


def peak_memory_gb(device: torch.device | str | int | None) -> float:
    """Peak memory in GiB since the last `reset_peak_memory`: CUDA tensors allocated on `device`, or
    on CPU the process's peak RSS (Linux: VmHWM; elsewhere ru_maxrss, the peak since process start)."""
    if _is_cuda(device):
        return torch.cuda.max_memory_allocated(device) / 2**30
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def reset_peak_memory(device: torch.device | str | int | None) -> None:
    """Start a new peak-memory window. On CPU (Linux) writing 5 to /proc/self/clear_refs sets the
    process's peak RSS back to its current RSS; where that is not possible the CPU peak stays the
    peak since process start."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _proc_status_kib(field: str) -> int | None:
    """A KiB field of /proc/self/status (Linux), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_memory_gb(device: torch.device | str | int | None) -> float:
    """Memory in use now, GiB: CUDA tensors allocated on `device`, or on CPU the process's RSS."""
    if _is_cuda(device):
        return torch.cuda.memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class StepTimer:
    """Wall-clock timer for a step or its phases. On CUDA it synchronizes before reading the clock, so
    queued kernels are counted in the step (or phase) that launched them.

    `start()`/`stop()` time a whole step; `with timer.phase(name):` adds the phase's seconds to
    `seconds[name]` and keeps its peak memory in `peaks[name]` (the peak window starts anew per phase).

    Args:
        device: the training device; None synchronizes only if CUDA has been initialized.
        phases: names whose `seconds` start at 0, so a phase that never ran still reports 0.
    """

    def __init__(self, device: torch.device | str | int | None = None, phases: tuple[str, ...] = ()) -> None:
        self._device = device
        self._start: float | None = None
        self.seconds: dict[str, float] = dict.fromkeys(phases, 0.0)
        self.peaks: dict[str, float] = {}

    def _sync(self) -> None:
        if self._device is None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        elif _is_cuda(self._device):
            torch.cuda.synchronize(self._device)

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> float:
        """Seconds since `start()`."""
        if self._start is None:
            raise RuntimeError("StepTimer.stop() called before start()")
        self._sync()
        elapsed = time.perf_counter() - self._start
        self._start = None
        return elapsed

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        reset_peak_memory(self._device)
        self.start()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.stop()
            self.peaks[name] = max(self.peaks.get(name, 0.0), peak_memory_gb(self._device))


def step3_throughput(*, per_device_generation_batch: int, generation_batches: int, ppo_epochs: int, ptx: bool,
                     world_size: int, seq_length: int, answer_len: float, actor_config, critic_config,
                     actor_k: float, critic_k: float, generate_s: float, train_s: float, e2e_s: float,
                     actor_params: int, bytes_per_param: int) -> dict[str, float]:
    """DeepSpeed-Chat's step-3 throughput print, per device, with its PTX slip fixed.

    Args:
        per_device_generation_batch, generation_batches, ppo_epochs, ptx: the PPO step's shape. The
            samples of a step are gen batch x generation_batches x ppo_epochs, doubled with PTX
            (DeepSpeed-Chat wrote `... * 1 if no PTX else 2`, which by precedence is 2 with PTX).
        seq_length: prompt + answer tokens (max_prompt_seq_len + max_answer_seq_len, as it counts).
        answer_len: the mean answer length in tokens over every sequence of the step on all ranks
            (`rollout/response_len`), for the latency: not one rank's padded width, which the longest
            answer of that rank alone sets.
        actor_config, critic_config: Hugging Face configs (critic None: critic-free, no critic FLOPs);
            actor_k, critic_k: `activation_factor`s.
        generate_s: seconds of one generation batch; train_s: seconds of the PPO updates; e2e_s: the
            whole PPO step (generation, experience, updates).
        actor_params, bytes_per_param: for the generation's weight-read bandwidth.
    Returns perf/samples_per_s (global), perf/{train,gen,total}_tflops (per device),
    perf/gen_token_latency_s, perf/gen_bw_gb_s and perf/e2e_s.
    """
    if min(generate_s, train_s, e2e_s) <= 0:
        raise ValueError("phase times must be > 0")
    ppo_samples = per_device_generation_batch * generation_batches * ppo_epochs
    samples = ppo_samples * (2 if ptx else 1)
    # The actor also trains on the PTX batches; the critic only on the PPO ones.
    train_flops = (calculate_flops(actor_k, samples, seq_length, *model_shape(actor_config))
                   + (calculate_flops(critic_k, ppo_samples, seq_length, *model_shape(critic_config))
                      if critic_config is not None else 0.0))  # critic-free: no critic
    gen_flops = calculate_flops(1.0, per_device_generation_batch, seq_length, *model_shape(actor_config))
    token_latency = generate_s / max(answer_len, 1.0)
    return {
        "perf/samples_per_s": samples * world_size / e2e_s,
        "perf/train_tflops": train_flops / (train_s * 1e12),
        "perf/gen_tflops": gen_flops / (generate_s * 1e12),
        "perf/total_tflops": (train_flops + gen_flops * generation_batches) / (e2e_s * 1e12),
        "perf/gen_token_latency_s": token_latency,
        "perf/gen_bw_gb_s": actor_params * bytes_per_param / (token_latency * 1e9),
        "perf/e2e_s": e2e_s,
    }
