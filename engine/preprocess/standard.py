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


def _segment_log_lengths(keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the (18, 3) keypoints as float64, each ``PROPORTION_SEGMENTS`` segment's log length, whether both its ends
    are visible) of OpenPose-18 ``keypoints``: what ``proportion_features`` and ``width_features`` measure against."""
    kp = np.asarray(keypoints, np.float64)[:18]
    if kp.shape != (18, 3):
        raise ValueError(f"keypoints should be (18, 3) OpenPose points (x, y, visible); got {kp.shape}")
    a, b = np.array(PROPORTION_SEGMENTS).T
    visible = (kp[a, 2] > 0) & (kp[b, 2] > 0)
    return kp, np.log(np.hypot(kp[a, 0] - kp[b, 0], kp[a, 1] - kp[b, 1]) + 1e-3), visible


def proportion_features(keypoints: np.ndarray) -> np.ndarray:
    """Scale- and position-free features of a figure's proportions from its OpenPose-18 ``keypoints`` (x, y,
    visible): each visible segment's log length relative to the mean over all visible segments and to the mean over
    the head's, the difference of those two means, and which segments are visible (an invisible one reads 0).
    ``engine.models.StandardPoseEstimator`` reads them to draw a character's own standard pose."""
    _, length, visible = _segment_log_lengths(keypoints)
    mean = length[visible].mean() if visible.any() else 0.0
    head = visible & _HEAD_SEGMENTS
    head_mean = length[head].mean() if head.any() else mean
    return np.concatenate([np.where(visible, length - mean, 0.0), np.where(visible, length - head_mean, 0.0),
                           [mean - head_mean], visible.astype(np.float64)]).astype(np.float32)


# Segments whose thickness across the figure's mask tells its build (the synthetic world's limbs and torso are
# wider by the same factor, 0.82-1.28, that widens the standard pose's shoulders and hips): arms, legs and the
# torso's sides; width_features adds the torso across the neck -> mid-hip line and the head across neck -> nose.
WIDTH_SEGMENTS = ((2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (11, 12), (12, 13), (1, 8), (1, 11))
WIDTH_FEATURES = 2 * (len(WIDTH_SEGMENTS) + 2)
_WIDTH_STEP = 0.25
_WIDTH_STEPS = np.arange(0.0, 64.0, _WIDTH_STEP) + _WIDTH_STEP / 2


def _width_across(mask: np.ndarray, point: np.ndarray, normal: np.ndarray) -> float:
    """The mask's extent (pixels) through ``point`` along ``normal``, to a fraction of a pixel: the bilinearly
    sampled mask integrated from the point to where it first falls to zero each way (across a pixel edge the
    samples ramp linearly, so the integral ends at the edge's half-way crossing). 0 where the point is off the
    figure. A limb at 128x192 is 5-10 pixels wide and the builds differ by +-25%: whole pixels would not do."""
    h, w = mask.shape
    if not 0 <= point[0] <= w - 1 or not 0 <= point[1] <= h - 1:
        return 0.0
    total = 0.0
    for sign in (1.0, -1.0):
        q = point[None] + sign * _WIDTH_STEPS[:, None] * normal[None]
        x, y = q[:, 0].clip(0, w - 1), q[:, 1].clip(0, h - 1)
        x0, y0 = np.minimum(x.astype(int), w - 2).clip(0), np.minimum(y.astype(int), h - 2).clip(0)
        fx, fy = x - x0, y - y0
        x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
        value = (mask[y0, x0] * (1 - fx) * (1 - fy) + mask[y0, x1] * fx * (1 - fy) + mask[y1, x0] * (1 - fx) * fy
                 + mask[y1, x1] * fx * fy)
        value[(q[:, 0] < 0) | (q[:, 0] > w - 1) | (q[:, 1] < 0) | (q[:, 1] > h - 1)] = 0.0
        end = len(value) if (value > 0).all() else int(np.argmin(value > 0))
        total += float(value[:end].sum()) * _WIDTH_STEP
    return total if total >= 0.5 else 0.0


def width_features(keypoints: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Scale-free features of a figure's build from its foreground ``mask`` (H, W) in [0, 1] along its OpenPose-18
    ``keypoints`` (same pixels): for each of ``WIDTH_SEGMENTS`` (and the torso and the head) the log of the mask's
    width across it (the least of three places along it, so a limb crossing another reads its own width) relative
    to the mean log length of the visible ``PROPORTION_SEGMENTS``, then which of them were measured. No mask: zeros
    (nothing measured). Read beside ``proportion_features`` by ``StandardPoseEstimator(reads_mask=True)``."""
    kp, length, visible = _segment_log_lengths(keypoints)
    out = np.zeros(WIDTH_FEATURES, np.float32)
    if mask is None or not visible.any():
        return out
    mask = np.asarray(mask, np.float32)
    mask = mask / 255.0 if mask.max() > 1.0 else mask
    mean = length[visible].mean()
    hips = kp[8, :2] / 2 + kp[11, :2] / 2
    lines = [(kp[i, :2], kp[j, :2], (0.3, 0.5, 0.7), kp[i, 2] > 0 and kp[j, 2] > 0) for i, j in WIDTH_SEGMENTS]
    lines.append((kp[1, :2], hips, (0.4, 0.6), kp[1, 2] > 0 and kp[8, 2] > 0 and kp[11, 2] > 0))  # torso
    lines.append((kp[1, :2], kp[0, :2], (1.0,), kp[1, 2] > 0 and kp[0, 2] > 0))  # head, at the nose
    n = len(lines)
    for k, (start, end, places, seen) in enumerate(lines):
        direction = end - start
        span = float(np.hypot(*direction))
        if not seen or span < 1.0:
            continue
        normal = np.array([-direction[1], direction[0]]) / span
        width = min(_width_across(mask, start + t * direction, normal) for t in places)
        if width > 0:
            out[k], out[n + k] = np.log(width) - mean, 1.0
    return out


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
