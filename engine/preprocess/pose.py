"""OpenPose-18 keypoints and pose maps in the OpenPose colour convention (numpy + Pillow only).

Keypoint order (OpenPose COCO-18): 0 nose, 1 neck, 2 r_shoulder, 3 r_elbow, 4 r_wrist, 5 l_shoulder, 6 l_elbow,
7 l_wrist, 8 r_hip, 9 r_knee, 10 r_ankle, 11 l_hip, 12 l_knee, 13 l_ankle, 14 r_eye, 15 l_eye, 16 r_ear, 17 l_ear.
Keypoints are an (18, 3) float array of (x, y, visible) in pixels; invisible points are not drawn. The drawing
matches the maps Animate Anyone / ControlNet were trained on: limbs as filled ellipses in 60% of the limb colour,
joints as full-colour discs, on black, widths scaled with the canvas (4 px at 512 wide).

Whole-body keypoints (DWPose, what the Animate Anyone weights learned from) are (128, 3): the 18 body points, then
the left and the right hand (21 points each: wrist, then thumb, index, middle, ring and little finger from base to
tip) and 68 face landmarks (the iBUG 300-W layout). They are drawn as DWPose draws them: hand bones in 20 hues, hand
joints as blue discs, face landmarks as white dots (2 / 4 / 3 px at 512 wide).
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
BODY, WHOLE_BODY = 18, 128
HANDS = (slice(18, 39), slice(39, 60))
FACE = slice(60, 128)
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
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


def _hue(h: float) -> tuple[int, int, int]:
    """HSV (h, 1, 1) -> RGB 0-255 (matplotlib's hsv_to_rgb, which DWPose colours its hand bones with)."""
    i, f = int(h * 6.0) % 6, h * 6.0 - int(h * 6.0)
    q, t = 1.0 - f, f
    r, g, b = ((1, t, 0), (q, 1, 0), (0, 1, t), (0, q, 1), (t, 0, 1), (1, 0, q))[i]
    return int(r * 255), int(g * 255), int(b * 255)


def draw_pose_map(keypoints: np.ndarray, size: tuple[int, int], stick_width: float | None = None) -> Image.Image:
    """Draws (18, 3) body or (128, 3) whole-body keypoints on a black RGB canvas of ``size`` = (width, height)."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.shape not in ((BODY, 3), (WHOLE_BODY, 3)):
        raise ValueError(f"keypoints must have shape (18, 3) or (128, 3) (x, y, visible); got {keypoints.shape}")
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
    if len(keypoints) == WHOLE_BODY:
        line, joint, dot = max(1, round(2 * scale)), max(1.0, 4.0 * scale), max(1.0, 3.0 * scale)
        for hand in HANDS:
            points, seen = keypoints[hand, :2], visible[hand]
            for k, (a, b) in enumerate(HAND_EDGES):
                if seen[a] and seen[b]:
                    draw.line([tuple(points[a]), tuple(points[b])], fill=_hue(k / len(HAND_EDGES)), width=line)
            for (x, y), ok in zip(points, seen):
                if ok:
                    draw.ellipse((x - joint, y - joint, x + joint, y + joint), fill=(0, 0, 255))
        for (x, y), ok in zip(keypoints[FACE, :2], visible[FACE]):
            if ok:
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=(255, 255, 255))
    return canvas


def flip_keypoints(keypoints: np.ndarray, width: int) -> np.ndarray:
    """Mirrors keypoints horizontally (x -> width - 1 - x) and swaps left/right names."""
    out = np.asarray(keypoints, dtype=np.float64)[list(FLIP_INDEX)].copy()
    out[:, 0] = np.where(out[:, 2] > 0, width - 1 - out[:, 0], out[:, 0])
    return out
