"""The in-process limit: how many samples/s MNISTNet's forward pass does with no server in the way.

``measure_forward(batch)`` times ``model(x)`` under ``torch.inference_mode()`` on a ready float tensor,
so it is an upper bound for any served number (no HTTP, no JSON, no IPC). Defaults: PyTorch's own
thread count (all cores), 0.3 s warm-up, at least 2 s of timed calls.
"""
from __future__ import annotations

import time

import torch

from models.registry import get_spec


def load_model(weights: str | None = None, model_name: str = "mnistnet") -> torch.nn.Module:
    """The registry's network in eval mode, with ``weights`` (a state_dict file) loaded if given."""
    model = get_spec(model_name).build()
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def measure_forward(
    model: torch.nn.Module, batch: int, seconds: float = 2.0, warmup: float = 0.3, threads: int | None = None
) -> dict:
    """Samples/s and mean call time of ``model`` on a ``(batch, 784)`` input.

    ``threads`` sets ``torch.set_num_threads`` for the measurement (default: leave PyTorch's choice)
    and restores the previous value afterwards.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        x = torch.randn(batch, 784)
        with torch.inference_mode():
            _run_for(model, x, warmup)
            calls, elapsed = _run_for(model, x, seconds)
    finally:
        torch.set_num_threads(previous)
    return {
        "batch": batch,
        "threads": threads if threads is not None else previous,
        "calls": calls,
        "seconds": elapsed,
        "samples_per_s": calls * batch / elapsed,
        "call_us": elapsed / calls * 1e6,
    }


def measure_calls(model: torch.nn.Module, x: torch.Tensor, seconds: float = 2.0, warmup: float = 0.2,
                  threads: int | None = 1) -> dict:
    """:func:`measure_forward` on a given input ``x`` (e.g. real digits, normalised), timing each call:
    samples/s, calls and the p50/p99 call time (µs); ``threads`` as there (default 1, as one server worker)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    times: list[float] = []
    try:
        with torch.inference_mode():
            _run_for(model, x, warmup)
            start = time.perf_counter()
            while not times or time.perf_counter() - start < seconds:
                began = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - began)
            elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    times.sort()
    return {"batch": len(x), "threads": threads if threads is not None else previous, "calls": len(times),
            "seconds": elapsed, "samples_per_s": len(times) * len(x) / elapsed,
            "p50_us": times[len(times) // 2] * 1e6, "p99_us": times[min(len(times) - 1, int(0.99 * len(times)))] * 1e6}


def _run_for(model: torch.nn.Module, x: torch.Tensor, seconds: float) -> tuple[int, float]:
    """Call ``model(x)`` repeatedly for at least ``seconds``; returns (calls, elapsed seconds)."""
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(20):  # check the clock every 20 calls so timing overhead stays small
            model(x)
        calls += 20
        now = time.perf_counter()
        if now >= deadline:
            return calls, now - start


if __name__ == "__main__":
    net = load_model()
    for b in (1, 256):
        for t in (None, 1):
            r = measure_forward(net, b, threads=t)
            print(f"batch {b:4d} threads {r['threads']}: {r['samples_per_s']:12,.0f} samples/s  {r['call_us']:8.1f} us/call")
