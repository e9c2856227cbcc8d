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

from .pose import draw_pose_map

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
    w, h = size
    out = kp.copy()
    out[:, 0] = w / 2 + kp[:, 0] * h
    out[:, 1] = kp[:, 1] * h
    return out


def standard_pose_map(size: tuple[int, int], path: str | Path = STANDARD_POSE_FILE,
                      whole_body: bool = False) -> Image.Image:
    return draw_pose_map(standard_keypoints(size, path, whole_body), size)
