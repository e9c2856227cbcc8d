"""OpenPose-18 keypoints and pose maps in the OpenPose colour convention (numpy + Pillow only).

Keypoint order (OpenPose COCO-18): 0 nose, 1 neck, 2 r_shoulder, 3 r_elbow, 4 r_wrist, 5 l_shoulder, 6 l_elbow,
7 l_wrist, 8 r_hip, 9 r_knee, 10 r_ankle, 11 l_hip, 12 l_knee, 13 l_ankle, 14 r_eye, 15 l_eye, 16 r_ear, 17 l_ear.
Keypoints are an (18, 3) float array of (x, y, visible) in pixels; invisible points are not drawn. The drawing
matches the maps Animate Anyone / ControlNet were trained on: limbs as filled ellipses in 60% of the limb colour,
joints as full-colour discs, on black, widths scaled with the canvas (4 px at 512 wide).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "r_hip", "r_knee",
    "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)
# Limb pairs (0-based) in OpenPose's drawing order; the colour of limb i is COLORS[i].
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
# Left/right swap for mirroring a pose.
FLIP_INDEX = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)


def _ellipse_polygon(x0, y0, x1, y1, half_width, segments=16):
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    length = math.hypot(x1 - x0, y1 - y0) / 2
    angle = math.atan2(y1 - y0, x1 - x0)
    ca, sa = math.cos(angle), math.sin(angle)
    points = []
    for k in range(segments):
        t = 2 * math.pi * k / segments
        ex, ey = length * math.cos(t), half_width * math.sin(t)
        points.append((cx + ex * ca - ey * sa, cy + ex * sa + ey * ca))
    return points


def draw_pose_map(keypoints: np.ndarray, size: tuple[int, int], stick_width: float | None = None) -> Image.Image:
    """Draws (18, 3) keypoints on a black RGB canvas of ``size`` = (width, height)."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.shape != (18, 3):
        raise ValueError(f"keypoints must have shape (18, 3) (x, y, visible); got {keypoints.shape}")
    width, height = size
    scale = width / 512.0
    stick = stick_width if stick_width is not None else max(1.0, 4.0 * scale)
    radius = max(1.0, 4.0 * scale)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    visible = keypoints[:, 2] > 0
    for (a, b), color in zip(LIMBS, COLORS):
        if not (visible[a] and visible[b]):
            continue
        (x0, y0), (x1, y1) = keypoints[a, :2], keypoints[b, :2]
        draw.polygon(_ellipse_polygon(x0, y0, x1, y1, stick), fill=tuple(int(c * 0.6) for c in color))
    for i, color in enumerate(COLORS):
        if visible[i]:
            x, y = keypoints[i, :2]
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
    return canvas


def flip_keypoints(keypoints: np.ndarray, width: int) -> np.ndarray:
    """Mirrors keypoints horizontally (x -> width - 1 - x) and swaps left/right names."""
    out = np.asarray(keypoints, dtype=np.float64)[list(FLIP_INDEX)].copy()
    out[:, 0] = np.where(out[:, 2] > 0, width - 1 - out[:, 0], out[:, 0])
    return out
