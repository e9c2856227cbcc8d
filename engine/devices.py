"""Where and in what precision each stage runs: the device and dtype policy of ``load_engine``."""

from __future__ import annotations

import torch

from .engine import EngineLoadError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(policy: str | None, requires_gpu: bool, preset_name: str) -> tuple[torch.device, str]:
    if policy not in (None, "auto"):
        return torch.device(policy), f"device {policy} was asked for"
    if torch.cuda.is_available():
        return torch.device("cuda"), "a CUDA GPU is available"
    if requires_gpu:
        raise EngineLoadError(
            f"preset {preset_name!r} needs a GPU and none was found; use --preset demo for the CPU models,"
            " or pass --device cpu to run it (very slowly) anyway"
        )
    return torch.device("cpu"), "no GPU found, running on the CPU"


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(policy: str | None, device: torch.device, stage: str = "personalize",
                  bf16_supported: bool | None = None) -> torch.dtype:
    """The dtype a stage runs in, chosen for the weights it runs.

    ``auto``: float32 on the CPU. On a GPU, Stage I (standardize) runs in float16: the Animate Anyone weights were
    trained and are run in fp16 by their reference code, and on the same weights bf16 deviates about 7 times more
    from the reference output than fp16 (the review's measurement). Stage II (SDXL) runs in bfloat16 where the GPU
    has it, else float16 (the SDXL VAE then decodes in float32: ``force_upcast``, as stock diffusers does). An
    explicit bfloat16 on a GPU without it falls back to float16.
    """
    if policy not in (None, "auto") and policy not in _DTYPES:
        raise EngineLoadError(f"dtype {policy!r} is not one of {sorted(_DTYPES)} or 'auto'")
    if device.type != "cuda":
        return torch.float32 if policy in (None, "auto") else _DTYPES[policy]
    bf16 = _bf16_supported(device) if bf16_supported is None else bf16_supported
    if policy in (None, "auto"):
        dtype = torch.float16 if stage == "standardize" else torch.bfloat16
    else:
        dtype = _DTYPES[policy]
    return torch.float16 if dtype == torch.bfloat16 and not bf16 else dtype
