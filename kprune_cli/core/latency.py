"""Latency and throughput of a model's forward pass at a batch size and sequence length."""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from torch import nn

from kprune_cli.runtime.timing import time_in_turns

DEFAULT_WARMUP = 3


def forward_call(model: nn.Module, batch_size: int, seq_len: int, device: torch.device | str,
                 dtype: torch.dtype | None = None, seed: int = 0) -> Callable[[], None]:
    """A call that runs one forward pass of ``model`` (moved to ``device``, eval mode) on a random batch
    ``(batch_size, seq_len)`` without padding, under ``torch.inference_mode`` (and :func:`torch.autocast`
    in ``dtype`` if given), and returns once it is done (a CUDA device is synchronised)."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: batch_size and seq_len must be positive")
    device = torch.device(device)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    vocab_size = int(model.config.vocab_size)
    inputs = {
        "input_ids": torch.randint(min(5, vocab_size - 1), vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
    }
    inputs = {key: value.to(device) for key, value in inputs.items()}

    def call() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return call


def time_forward(model: nn.Module, batch_size: int, seq_len: int, device: torch.device | str, repeats: int,
                 warmup: int = DEFAULT_WARMUP, dtype: torch.dtype | None = None, seed: int = 0) -> list[float]:
    """Milliseconds of each of ``repeats`` forward passes of ``model`` (:func:`forward_call`) after
    ``warmup`` untimed ones."""
    if repeats < 0 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: must be non-negative")
    return time_in_turns([forward_call(model, batch_size, seq_len, device, dtype, seed)], repeats, warmup)[0]


def latency_figures(times: Sequence[float], batch_size: int, seq_len: int, device: torch.device | str,
                    dtype: torch.dtype | None = None) -> dict:
    """Milliseconds per batch (``median_ms``, ``min_ms``, ``max_ms``, ``iqr_ms``: the spread between
    the quartiles), ``sequences_per_s`` and ``tokens_per_s`` at the median, and the settings."""
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [median, median, median]
    return {
        "batch_size": batch_size, "seq_len": seq_len, "device": str(torch.device(device)), "repeats": len(times),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else "float32",
        "median_ms": median, "min_ms": min(times), "max_ms": max(times), "iqr_ms": quartiles[2] - quartiles[0],
        "sequences_per_s": 1000.0 * batch_size / median, "tokens_per_s": 1000.0 * batch_size * seq_len / median,
    }


def measure_latency(model: nn.Module, batch_size: int, seq_len: int, device: torch.device | str, repeats: int = 10,
                    warmup: int = DEFAULT_WARMUP, dtype: torch.dtype | None = None, seed: int = 0) -> dict:
    """Latency figures (:func:`latency_figures`) of ``repeats`` timed forward passes of ``model``
    on a random ``(batch_size, seq_len)`` batch after ``warmup`` untimed ones (:func:`time_forward`)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be positive")
    times = time_forward(model, batch_size, seq_len, device, repeats, warmup, dtype, seed)
    return latency_figures(times, batch_size, seq_len, device, dtype)


def interleaved_latency(models: Sequence[nn.Module], batch_size: int, seq_len: int, device: torch.device | str,
                        repeats: int = 10, warmup: int = DEFAULT_WARMUP, dtype: torch.dtype | None = None
                        ) -> list[dict]:
    """:func:`measure_latency` of several models timed in turns (one pass of each per round), so
    that a change in the machine's load during the measurement affects them all alike."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be positive")
    calls = [forward_call(model, batch_size, seq_len, device, dtype) for model in models]
    return [latency_figures(kept, batch_size, seq_len, device, dtype) for kept in time_in_turns(calls, repeats, warmup)]
