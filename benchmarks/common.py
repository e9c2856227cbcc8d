"""Shared benchmark helpers: random-weight models of real architectures (no download) and timing/memory."""

from __future__ import annotations

import resource
import statistics
import time

import torch


def random_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fills weights in place (fast on a GPU; avoids minutes of CPU init for 2.6B parameters)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p))
    return module


def build_random(cls, config, device, dtype, seed):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls(config) if not hasattr(cls, "from_config") else cls.from_config(config)
    model = model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, buf in model.named_buffers():  # position ids etc. must be real values
        if "position_ids" in name:
            buf.copy_(torch.arange(buf.shape[-1], device=device).expand_as(buf))
    return random_init_(model, seed).to(dtype).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)


def timed(fn, device, repeats: int) -> tuple[float, float]:
    peak_reset(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_gb(device)


def add_model_args(parser, guidance: float) -> None:
    """The options both stage benchmarks take: which model, where, at what size, steps and guidance."""
    parser.add_argument("--model", choices=["random-full", "random-small", "preset"], default="random-small")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=guidance)
