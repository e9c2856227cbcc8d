"""The character's own standard pose: its proportions read from the reference's keypoints.

The standard sheet fixes the pose, the view and the head's place and size; the body below the head keeps the
character's proportions (the synthetic world's characters differ in leg and torso length by +-12% and in width by
+-25%, so their standard renders' feet lie 108 to 146 px below the head at 128x192). The demo Stage I is trained with
each character's own standard pose map, so a pipeline that always gives it the average body's map draws every
character at the average height (sheets 127 +- 5 px tall against the truth's 128 +- 11, uncorrelated: measured
2026-12-05, docs/training.md). ``StandardPoseEstimator`` estimates the character's standard pose from
``proportion_features`` of the reference's keypoints: a small MLP predicts the coordinates of the standard poses'
principal directions (height and build hold 99.9% of their variance), added to the mean standard pose.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..preprocess.standard import (
    PROPORTION_FEATURES,
    keypoints_from_standard_units,
    proportion_features,
    standard_units,
)


class StandardPoseEstimator(ModelMixin, ConfigMixin):
    """Proportion features (``engine.preprocess.standard.proportion_features``) -> the character's standard pose
    (18, 2) in units of the canvas height (``standard_units``).

    Buffers: ``mean`` (the standard pose, (18, 2)), ``basis`` (``num_components`` principal directions of the
    standard poses, each (18, 2)), ``scale`` (each direction's standard deviation) and ``limit`` (the predicted
    coordinates are clamped to the fitted poses' range, in standard deviations). The MLP's last layer starts at
    zero, so an untrained estimator returns ``mean``, the average body's pose of ``assets/standard_pose.json``."""

    @register_to_config
    def __init__(self, num_features: int = PROPORTION_FEATURES, hidden_size: int = 64, num_components: int = 2):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size),
                                 nn.SiLU(), nn.Linear(hidden_size, num_components))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.register_buffer("mean", torch.from_numpy(standard_units()).float())
        self.register_buffer("basis", torch.zeros(num_components, 18, 2))
        self.register_buffer("scale", torch.ones(num_components))
        # the largest coordinate (in standard deviations) the fitted poses had: a reference unlike the training
        # ones (a noisy detector, a strange pose) gets at most the most extreme body, not an impossible one
        self.register_buffer("limit", torch.full((num_components,), 1e4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, num_features) -> (B, 18, 2) standard poses in units of the canvas height."""
        coefficients = torch.minimum(torch.maximum(self.mlp(features.to(self.mean.dtype)), -self.limit), self.limit)
        coefficients = coefficients * self.scale
        return self.mean + torch.einsum("bk,kpc->bpc", coefficients, self.basis)

    @torch.no_grad()
    def keypoints(self, reference_keypoints: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The standard pose, (18, 3) pixels of a canvas of ``size`` = (W, H), for the figure whose OpenPose-18
        keypoints are ``reference_keypoints`` (in any picture's pixels)."""
        features = torch.from_numpy(proportion_features(reference_keypoints))[None].to(self.device)
        return keypoints_from_standard_units(self(features)[0].float().cpu().numpy(), size)
