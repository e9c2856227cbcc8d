"""Attribute probes: small CNNs that read a synthetic render's appearance (hair, clothes) and non-appearance elements
(pose, expression, view, background). In the synthetic world, where no pretrained CLIP exists, they stand in for the
paper's CLIP-I / CLIP-T / AP-CLIP-I: appearance accuracy against the reference character, text accuracy against the
panel prompt, and feature cosine across panels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

APPEARANCE_HEADS = ("hair_style", "hair_color", "skin", "top", "top_color", "pattern", "bottom", "bottom_color")
SCENE_HEADS = ("pose", "expression", "view", "background")
HIDDEN = "hidden"  # the element is not visible in the image (e.g. the bottom under a dress, the face from the back)


class AttributeProbe(ModelMixin, ConfigMixin):
    """A small CNN: image -> shared feature -> one classification head per attribute. ``labels`` maps each head to
    its class names (saved in the config, so predictions read back without the trainer).

    The last feature map is average-pooled to a coarse ``pool_grid`` (rows, columns), not to one vector: which colour
    is the hair's and which the trousers' is a matter of where it is, and a global mean throws that away (measured:
    with a 1x1 pool the probe could not even fit 64 renders in 40 steps; with 4x3 it did).
    """

    @register_to_config
    def __init__(self, labels: dict[str, list[str]], channels: tuple[int, ...] = (32, 64, 128, 256),
                 feature_dim: int = 256, image_size: tuple[int, int] = (128, 192),
                 pool_grid: tuple[int, int] = (4, 3)):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.backbone = nn.Sequential(*layers)
        self.pool_grid = tuple(pool_grid)
        self.feature = nn.Linear(c_in * self.pool_grid[0] * self.pool_grid[1], feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(classes)) for name, classes in labels.items()})

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, 3, H, W) in [-1, 1] -> (features (B, D), {head: logits})."""
        x = self.backbone(images)
        feature = self.feature(F.adaptive_avg_pool2d(x, self.pool_grid).flatten(1))
        return feature, {name: head(F.silu(feature)) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images) -> tuple[np.ndarray, dict[str, list[str]]]:
        """PIL images -> (features, {head: predicted labels})."""
        w, h = self.config.image_size
        batch = np.stack([np.asarray(im.convert("RGB").resize((w, h)), np.float32) / 127.5 - 1 for im in images])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device, self.dtype)
        feature, logits = self(x)
        labels = {name: [self.config.labels[name][i] for i in out.argmax(-1).tolist()] for name, out in logits.items()}
        return feature.float().cpu().numpy(), labels
