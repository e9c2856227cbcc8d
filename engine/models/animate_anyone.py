"""Loading the public Animate Anyone weights (Moore-AnimateAnyone) into our Stage I classes, with a strict key check.

Moore-AnimateAnyone ships ``reference_unet.pth`` (a diffusers SD1.5 ``UNet2DConditionModel`` state dict),
``denoising_unet.pth`` (their ``UNet3DConditionModel`` without motion modules: the same keys as the 2D UNet, its
InflatedConv3d layers being Conv2d subclasses) and ``pose_guider.pth`` (``conv_in``, ``blocks.*``, ``conv_out``,
the layout of our ``PoseGuider``). The UNets use the SD1.5 config with cross_attention_dim 768 (the
sd-image-variations CLIP projection), the VAE is sd-vae-ft-mse. Checkpoints saved from DDP may prefix keys with
``module.``; temporal / motion-module keys (stage 2) are not part of Stage I and are reported as ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

FILES = {"reference_unet": "reference_unet.pth", "denoising_unet": "denoising_unet.pth",
         "pose_guider": "pose_guider.pth"}
IGNORED_MARKERS = ("motion_modules.", "temporal_transformer", "attn_temp", "norm_temp")
# Moore's reference UNet class drops the output head (only the self-attention inputs of the reference pass are read),
# so the released reference_unet.pth lacks these four tensors, and only these may be absent: our UNet keeps its own
# values for them, which shape an output nobody reads.
OPTIONAL_KEYS = {"reference_unet": ("conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias")}


@dataclass
class LoadReport:
    name: str
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.name}: {self.loaded} tensors"
        return text + (f", {len(self.ignored)} stage-2 keys ignored" if self.ignored else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .pth/.bin/.ckpt (torch.load with weights_only=True) or .safetensors state dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def convert_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Moore layout -> ours: drops a DDP ``module.`` prefix and sets stage-2 (temporal) keys aside."""
    out, ignored = {}, []
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if any(marker in key for marker in IGNORED_MARKERS):
            ignored.append(key)
            continue
        out[key] = value
    return out, ignored


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> LoadReport:
    """Loads ``state`` into ``model``; any missing, unexpected or mis-shaped key raises a ValueError naming them."""
    converted, ignored = convert_keys(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(converted) - set(OPTIONAL_KEYS.get(name, ())))
    unexpected = sorted(set(converted) - set(own))
    shapes = sorted(k for k in set(own) & set(converted) if tuple(own[k].shape) != tuple(converted[k].shape))
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shapes:
            parts.append("shape mismatches: " + show([f"{k} {tuple(converted[k].shape)} vs {tuple(own[k].shape)}"
                                                      for k in shapes]))
        raise ValueError(f"{name}: the checkpoint does not match the model ({'; '.join(parts)})")
    model.load_state_dict({**{k: own[k] for k in OPTIONAL_KEYS.get(name, ()) if k in own}, **converted}, strict=True)
    return LoadReport(name, loaded=len(converted), ignored=ignored)


def load_animate_anyone(folder: str | os.PathLike, reference_unet, denoising_unet, pose_guider) -> list[LoadReport]:
    """Loads the three Moore-AnimateAnyone files from ``folder`` into the given (SD1.5-config) models."""
    folder = Path(folder)
    reports = []
    for name, model in (("reference_unet", reference_unet), ("denoising_unet", denoising_unet),
                        ("pose_guider", pose_guider)):
        reports.append(load_strict(model, read_state_dict(folder / FILES[name]), name))
    return reports
