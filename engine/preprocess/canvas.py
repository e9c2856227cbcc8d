"""Fitting a reference onto the Stage I canvas (default 512x768 portrait).

The person is scaled to fit; where a head is found (from keypoints) it goes to the standard head place and size
(the sheet's), unless that would push the person off the canvas. Padding is white and counts as background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .standard import standard_head

MIN_SIDE = 64


@dataclass
class Canvas:
    image: Image.Image  # RGB, canvas size
    mask: np.ndarray | None  # (H, W) float32 foreground in [0, 1] (None: unknown)
    keypoints: np.ndarray | None  # (18, 3) on the canvas
    scale: float  # canvas = scale * original + offset
    offset: tuple[float, float]
    head: tuple[float, float, float] | None  # head centre x, y and height on the canvas, where found


def head_from_keypoints(kp: np.ndarray | None) -> tuple[float, float, float] | None:
    """(x, y, head height) in the keypoints' pixels, from OpenPose-18 face points and the neck; None if no face."""
    if kp is None:
        return None
    kp = np.asarray(kp, float)
    vis = kp[:, 2] > 0
    eyes = [i for i in (14, 15) if vis[i]]
    ears = [i for i in (16, 17) if vis[i]]
    if not (vis[0] or eyes or ears):
        return None
    center_pts = eyes or ([0] if vis[0] else ears)
    cx, cy = kp[center_pts, 0].mean(), kp[center_pts, 1].mean()
    estimates = []
    if vis[1] and (vis[0] or eyes):  # nose/eyes to neck: about 0.6 head heights in the standard body
        face = kp[0, :2] if vis[0] else kp[eyes, :2].mean(0)
        estimates.append(np.hypot(*(face - kp[1, :2])) / 0.6)
    if len(ears) == 2:
        estimates.append(np.hypot(*(kp[16, :2] - kp[17, :2])) / 0.86)
    if len(eyes) == 2:
        estimates.append(np.hypot(*(kp[14, :2] - kp[15, :2])) / 0.31)
    if not estimates:
        return None
    return float(cx), float(cy), float(max(estimates))


def _person_box(size, mask, kp) -> tuple[float, float, float, float]:
    w, h = size
    if mask is not None and (mask > 0.5).any():
        ys, xs = np.nonzero(mask > 0.5)
        return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    if kp is not None and (kp[:, 2] > 0).sum() >= 2:
        pts = kp[kp[:, 2] > 0, :2]
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        pad = 0.15 * max(x1 - x0, y1 - y0)
        return max(0.0, x0 - pad), max(0.0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    return 0.0, 0.0, float(w), float(h)


def fit_to_canvas(image: Image.Image, size=(512, 768), mask: np.ndarray | None = None,
                  keypoints: np.ndarray | None = None, margin: float = 0.03) -> Canvas:
    """Places ``image`` (RGB) on a white canvas of ``size`` as described in the module docstring."""
    iw, ih = image.size
    if min(iw, ih) < MIN_SIDE:
        raise ValueError(f"reference is {iw}x{ih}: too small, give a picture at least {MIN_SIDE} px on each side")
    W, H = size
    kp = None if keypoints is None else np.asarray(keypoints, float)
    bx0, by0, bx1, by1 = _person_box((iw, ih), mask, kp)
    bw, bh = max(1.0, bx1 - bx0), max(1.0, by1 - by0)
    s_fit = min((1 - 2 * margin) * W / bw, (1 - 2 * margin) * H / bh)
    head = head_from_keypoints(kp)
    if head is not None:
        hx, hy, hh = head
        tx_head, ty_head, th_head = standard_head(size)
        s = min(s_fit, th_head / max(hh, 1e-6))
        ox, oy = tx_head - s * hx, ty_head - s * hy
        # keep the person on the canvas (where it fits)
        ox = float(np.clip(ox, margin * W - s * bx0, (1 - margin) * W - s * bx1)) if s * bw <= W else ox
        oy = float(np.clip(oy, margin * H - s * by0, (1 - margin) * H - s * by1)) if s * bh <= H else oy
    else:
        s = s_fit
        ox = W / 2 - s * (bx0 + bx1) / 2
        oy = H / 2 - s * (by0 + by1) / 2
    new_size = (max(1, round(iw * s)), max(1, round(ih * s)))
    resized = image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0 if s < 0.5 else None)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    pos = (int(round(ox)), int(round(oy)))
    canvas.paste(resized, pos)
    canvas_mask = None
    if mask is not None:
        m = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8)).resize(new_size, Image.Resampling.BILINEAR)
        full = Image.new("L", (W, H), 0)
        full.paste(m, pos)
        canvas_mask = np.asarray(full, np.float32) / 255.0
    canvas_kp = None
    if kp is not None:
        canvas_kp = kp.copy()
        canvas_kp[:, 0] = kp[:, 0] * s + pos[0]
        canvas_kp[:, 1] = kp[:, 1] * s + pos[1]
        inside = (canvas_kp[:, 0] >= 0) & (canvas_kp[:, 0] < W) & (canvas_kp[:, 1] >= 0) & (canvas_kp[:, 1] < H)
        canvas_kp[:, 2] = canvas_kp[:, 2] * inside
    canvas_head = None if head is None else (head[0] * s + pos[0], head[1] * s + pos[1], head[2] * s)
    return Canvas(canvas, canvas_mask, canvas_kp, float(s), (float(pos[0]), float(pos[1])), canvas_head)
