"""The character's own standard pose: its proportions read from the reference's keypoints.

The standard sheet fixes the pose, the view and the head's place and size; the body below the head keeps the
character's proportions (the synthetic world's characters differ in leg and torso length by +-12% and in width by
+-25%, so their standard renders' feet lie 108 to 146 px below the head at 128x192). The demo Stage I is trained with
each character's own standard pose map, so a pipeline that always gives it the average body's map draws every
character at the average height (sheets 127 +- 5 px tall against the truth's 128 +- 11, uncorrelated: measured
2026-12-05, docs/training.md). ``StandardPoseEstimator`` estimates the character's standard pose from
``proportion_features`` of the reference's keypoints: a small MLP predicts the coordinates of the standard poses'
principal directions (height and build hold 99.9% of their variance), added to the mean standard pose. With
``reads_mask`` it also reads ``width_features``, the limbs' and torso's thickness across the reference's foreground
mask, which tell the build that keypoints alone barely show (measured 2026-12-06, docs/training.md).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..preprocess.standard import (
    PROPORTION_FEATURES,
    WIDTH_FEATURES,
    keypoints_from_standard_units,
    proportion_features,
    standard_units,
    width_features,
)


class StandardPoseEstimator(ModelMixin, ConfigMixin):
    """Proportion features (``engine.preprocess.standard.proportion_features``) -> the character's standard pose
    (18, 2) in units of the canvas height (``standard_units``).

    Buffers: ``mean`` (the standard pose, (18, 2)), ``basis`` (``num_components`` principal directions of the
    standard poses, each (18, 2)), ``scale`` (each direction's standard deviation) and ``limit`` (the predicted
    coordinates are clamped to the fitted poses' range, in standard deviations). The MLP's last layer starts at
    zero, so an untrained estimator returns ``mean``, the average body's pose of ``assets/standard_pose.json``.
    ``reads_mask``: the features are ``proportion_features`` then ``width_features`` (``features``)."""

    @register_to_config
    def __init__(self, num_features: int | None = None, hidden_size: int = 64, num_components: int = 2,
                 reads_mask: bool = False):
        super().__init__()
        num_features = num_features or PROPORTION_FEATURES + (WIDTH_FEATURES if reads_mask else 0)
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

    def features(self, reference_keypoints: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """What the MLP reads of a figure: its keypoints' ``proportion_features``, and with ``reads_mask`` the
        ``width_features`` of its foreground ``mask`` (in the keypoints' pixels; None: none measured)."""
        features = proportion_features(reference_keypoints)
        if self.config.reads_mask:
            features = np.concatenate([features, width_features(reference_keypoints, mask)])
        return features

    @torch.no_grad()
    def keypoints(self, reference_keypoints: np.ndarray, size: tuple[int, int],
                  mask: np.ndarray | None = None) -> np.ndarray:
        """The standard pose, (18, 3) pixels of a canvas of ``size`` = (W, H), for the figure whose OpenPose-18
        keypoints are ``reference_keypoints`` (in any picture's pixels) and, where the estimator reads one, whose
        foreground ``mask`` (H, W) in [0, 1] is given in the same pixels."""
        features = torch.from_numpy(self.features(reference_keypoints, mask))[None].to(self.device)
        return keypoints_from_standard_units(self(features)[0].float().cpu().numpy(), size)
