"""The standard target: pose (OpenPose-18) and head placement of a character sheet, at any canvas size.

``assets/standard_pose.json`` stores keypoints as (dx, y, visible) in units of the canvas height, dx measured from
the vertical centre line, so the head keeps its place and size on any canvas: x = W/2 + dx*H, y = y*H. It is made by
``python -m trainer.synthetic standard-pose`` from the synthetic world's A-pose of an average body.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .pose import LIMBS, draw_pose_map

STANDARD_POSE_FILE = Path(__file__).resolve().parents[2] / "assets" / "standard_pose.json"


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"standard pose file {file} is missing; regenerate it with "
                         f"`python -m trainer.synthetic standard-pose --out {file}`")
    return json.loads(file.read_text())


def standard_head(size: tuple[int, int], path: str | Path = STANDARD_POSE_FILE) -> tuple[float, float, float]:
    """(x, y, height) in pixels of the head centre and head height on a canvas of ``size`` = (W, H)."""
    data = _load(str(path))
    w, h = size
    return w / 2 + data["head"][0] * h, data["head"][1] * h, data["head"][2] * h


def standard_keypoints(size: tuple[int, int], path: str | Path = STANDARD_POSE_FILE,
                       whole_body: bool = False) -> np.ndarray:
    """(18, 3) keypoints of the standard pose on a canvas of ``size`` = (W, H); ``whole_body``: (128, 3) with the
    hands and the face (DWPose's layout, ``engine.preprocess.pose``), for weights trained on whole-body maps."""
    data = _load(str(path))
    kp = np.array(data["keypoints"], dtype=np.float64)
    if whole_body:
        if "hands" not in data or "face" not in data:
            raise ValueError(f"{path} has no hand and face points; regenerate it with "
                             "`python -m trainer.synthetic standard-pose`")
        kp = np.concatenate([kp, np.array(data["hands"], np.float64), np.array(data["face"], np.float64)])
    out = kp.copy()
    out[:, :2] = keypoints_from_standard_units(kp[:, :2], size)[:, :2]
    return out


def standard_pose_map(size: tuple[int, int], path: str | Path = STANDARD_POSE_FILE,
                      whole_body: bool = False) -> Image.Image:
    return draw_pose_map(standard_keypoints(size, path, whole_body), size)


# Segments whose lengths, relative to one another, carry a figure's proportions: the OpenPose limbs, the shoulder and
# hip widths, the torso's sides and diagonals, the eyes' and ears' spans. Those with both ends on the head (nose,
# neck, eyes, ears) give the head's size, which the standard sheet fixes: a long-legged character has long legs
# relative to its head, whatever the picture's scale.
PROPORTION_SEGMENTS = LIMBS + ((2, 5), (8, 11), (1, 8), (1, 11), (2, 8), (5, 11), (16, 17), (14, 15))
_HEAD_POINTS = {0, 1, 14, 15, 16, 17}
_HEAD_SEGMENTS = np.array([a in _HEAD_POINTS and b in _HEAD_POINTS for a, b in PROPORTION_SEGMENTS])
PROPORTION_FEATURES = 3 * len(PROPORTION_SEGMENTS) + 1


def proportion_features(keypoints: np.ndarray) -> np.ndarray:
    """Scale- and position-free features of a figure's proportions from its OpenPose-18 ``keypoints`` (x, y,
    visible): each visible segment's log length relative to the mean over all visible segments and to the mean over
    the head's, the difference of those two means, and which segments are visible (an invisible one reads 0).
    ``engine.models.StandardPoseEstimator`` reads them to draw a character's own standard pose."""
    kp = np.asarray(keypoints, np.float64)[:18]
    if kp.shape != (18, 3):
        raise ValueError(f"keypoints should be (18, 3) OpenPose points (x, y, visible); got {kp.shape}")
    a, b = np.array(PROPORTION_SEGMENTS).T
    visible = (kp[a, 2] > 0) & (kp[b, 2] > 0)
    length = np.log(np.hypot(kp[a, 0] - kp[b, 0], kp[a, 1] - kp[b, 1]) + 1e-3)
    mean = length[visible].mean() if visible.any() else 0.0
    head = visible & _HEAD_SEGMENTS
    head_mean = length[head].mean() if head.any() else mean
    return np.concatenate([np.where(visible, length - mean, 0.0), np.where(visible, length - head_mean, 0.0),
                           [mean - head_mean], visible.astype(np.float64)]).astype(np.float32)


def keypoints_from_standard_units(units: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, 2) standard-pose coordinates in units of the canvas height (dx from the centre line, y; as
    ``assets/standard_pose.json``) -> (N, 3) visible keypoints in pixels of a canvas of ``size`` = (W, H)."""
    w, h = size
    units = np.asarray(units, np.float64).reshape(-1, 2)
    return np.stack([w / 2 + units[:, 0] * h, units[:, 1] * h, np.ones(len(units))], 1)


def standard_units(size: tuple[int, int] = (1, 1), keypoints: np.ndarray | None = None) -> np.ndarray:
    """(18, 2) ``keypoints`` on a canvas of ``size`` (default: the standard pose) in units of the canvas height."""
    w, h = size
    kp = standard_keypoints((w, h)) if keypoints is None else np.asarray(keypoints, np.float64)
    return np.stack([(kp[:18, 0] - w / 2) / h, kp[:18, 1] / h], 1)
