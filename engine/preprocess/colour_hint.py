"""Stage I's colour hint: the reference's colours, read along its skeleton and painted along the target pose.

The demo Stage I reads a posed, cluttered reference through its bank attention, and at the CPU's model size it loses
the garments' colours on the way (docs/training.md: from a perfect reference the top's green is drawn 22 of 255 too
low; the probe reads 0.42 of top colours against 0.93 on the truth). The pose already tells where each body part is in
both pictures, so the colours can be carried across directly: for each part (torso, upper arms, forearms, thighs,
shins, face, hair) the median foreground colour along that part in the reference is painted, as a thick stroke, along
the same part of the target pose. The result is 4 channels at the canvas size: RGB in [0, 1] and a mask of where a
colour was painted. Stage I's pose guider reads it beside the pose map (``PoseGuider(hint_channels=4)``): a model
whose pose guider reads a hint gets it from StandardizePipeline, one without (the published Animate Anyone weights,
Stage I models before 2026-12) does not. It is a property of the reference, so CFG's
unconditional half gets zeros in its place, as it gets no bank and no image embedding.

Keypoints are OpenPose-18 (x, y, visible) in pixels of their picture (engine.preprocess.pose); a part whose keypoints
are not visible, fall outside the picture or land on no foreground pixel is left unpainted (mask 0): a head-only
reference gives a face and hair and nothing else.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

HINT_CHANNELS = 4  # RGB + painted mask
# (name, keypoints of the part): a part is a segment between two keypoints; the torso is the shoulders-hips quad.
SEGMENTS = (
    ("r_upper_arm", (2, 3)), ("r_forearm", (3, 4)), ("l_upper_arm", (5, 6)), ("l_forearm", (6, 7)),
    ("r_thigh", (8, 9)), ("r_shin", (9, 10)), ("l_thigh", (11, 12)), ("l_shin", (12, 13)),
)
TORSO = (2, 5, 11, 8)
NOSE, NECK = 0, 1


def _visible(kp: np.ndarray, idx, size) -> bool:
    w, h = size
    return all(kp[i, 2] > 0 and 0 <= kp[i, 0] < w and 0 <= kp[i, 1] < h for i in idx)


def _median_colour(image: np.ndarray, mask: np.ndarray | None, points: np.ndarray, radius: float):
    """Median colour of the foreground pixels within ``radius`` of ``points`` (None where there are none)."""
    h, w = image.shape[:2]
    r = max(1, int(round(radius)))
    picked = []
    for x, y in points:
        x0, x1 = max(0, int(round(x)) - r), min(w, int(round(x)) + r + 1)
        y0, y1 = max(0, int(round(y)) - r), min(h, int(round(y)) + r + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        window = image[y0:y1, x0:x1].reshape(-1, 3)
        if mask is not None:
            window = window[mask[y0:y1, x0:x1].reshape(-1) > 0.5]
        picked.append(window)
    picked = np.concatenate(picked) if picked else np.zeros((0, 3))
    return np.median(picked, axis=0) if len(picked) else None


def _scale(kp: np.ndarray, size) -> float:
    """The figure's scale in pixels: shoulder width, else neck-nose distance, else a tenth of the picture's width."""
    if _visible(kp, (2, 5), size):
        return float(np.hypot(*(kp[2, :2] - kp[5, :2])))
    if _visible(kp, (NOSE, NECK), size):
        return 1.6 * float(np.hypot(*(kp[NOSE, :2] - kp[NECK, :2])))
    return size[0] / 10


def _head_points(kp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(face points, hair points): the face around the nose, the hair above it (away from the neck)."""
    nose, neck = kp[NOSE, :2], kp[NECK, :2]
    up = nose - neck
    face = np.stack([nose, nose + 0.15 * up])
    hair = np.stack([nose + 0.75 * up, nose + 0.9 * up])
    return face, hair


def part_colours(image: np.ndarray, mask: np.ndarray | None, keypoints: np.ndarray) -> dict[str, np.ndarray]:
    """Per part, the reference's median foreground colour (uint8-range floats) where the part can be read."""
    size = (image.shape[1], image.shape[0])
    kp = np.asarray(keypoints, np.float64)[:18]
    radius = 0.12 * _scale(kp, size)
    colours = {}
    if _visible(kp, TORSO, size):
        corners = kp[list(TORSO), :2]
        u, v = np.meshgrid(np.linspace(0.25, 0.75, 4), np.linspace(0.2, 0.8, 5))
        top = corners[0] + (corners[1] - corners[0]) * u[..., None]
        bottom = corners[3] + (corners[2] - corners[3]) * u[..., None]
        points = (top + (bottom - top) * v[..., None]).reshape(-1, 2)
        colours["torso"] = _median_colour(image, mask, points, radius)
    for name, (a, b) in SEGMENTS:
        if _visible(kp, (a, b), size):
            points = kp[a, :2] + (kp[b, :2] - kp[a, :2]) * np.linspace(0.25, 0.75, 5)[:, None]
            colours[name] = _median_colour(image, mask, points, radius)
    if _visible(kp, (NOSE, NECK), size):
        face, hair = _head_points(kp)
        colours["face"] = _median_colour(image, mask, face, radius)
        colours["hair"] = _median_colour(image, mask, hair, radius)
    return {name: colour for name, colour in colours.items() if colour is not None}


def paint_hint(colours: dict[str, np.ndarray], keypoints: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The parts' colours painted along ``keypoints`` (the target pose) -> (4, H, W) float32: RGB in [0, 1], mask."""
    w, h = size
    kp = np.asarray(keypoints, np.float64)[:18]
    scale = _scale(kp, (w, h))
    canvas = Image.new("RGB", size, (0, 0, 0))
    painted = Image.new("L", size, 0)
    draws = (ImageDraw.Draw(canvas), ImageDraw.Draw(painted))

    def stroke(points, colour, width):
        fill = tuple(int(round(c)) for c in colour)
        for draw, value in zip(draws, (fill, 255)):
            if len(points) > 2:
                draw.polygon([tuple(p) for p in points], fill=value)
            else:
                draw.line([tuple(p) for p in points], fill=value, width=max(1, int(round(width))))

    if "torso" in colours and _visible(kp, TORSO, (w, h)):
        stroke(kp[list(TORSO), :2], colours["torso"], 0)
    for name, (a, b) in SEGMENTS:
        if name in colours and _visible(kp, (a, b), (w, h)):
            stroke(kp[[a, b], :2], colours[name], 0.3 * scale)
    if _visible(kp, (NOSE, NECK), (w, h)):
        face, hair = _head_points(kp)
        r = 0.16 * scale
        for name, points in (("hair", hair), ("face", face)):
            if name in colours:
                (x, y) = points.mean(0)
                for draw, value in zip(draws, (tuple(int(round(c)) for c in colours[name]), 255)):
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=value)
    rgb = np.asarray(canvas, np.float32).transpose(2, 0, 1) / 255.0
    mask = (np.asarray(painted, np.float32) / 255.0)[None]
    return np.concatenate([rgb * mask, mask]).astype(np.float32)


def colour_hint(image, mask: np.ndarray | None, keypoints: np.ndarray | None, target_keypoints: np.ndarray,
                size: tuple[int, int] | None = None) -> np.ndarray:
    """The hint for one reference: ``image`` (PIL or (H, W, 3) uint8) with its foreground ``mask`` ((H, W) in [0, 1],
    None: every pixel) and ``keypoints``, painted along ``target_keypoints`` at ``size`` (default: the image's).
    No reference keypoints: an empty hint (all zeros)."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    size = size or (array.shape[1], array.shape[0])
    if keypoints is None:
        return np.zeros((HINT_CHANNELS, size[1], size[0]), np.float32)
    return paint_hint(part_colours(array, mask, keypoints), target_keypoints, size)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred by a separable Gaussian (reflected borders, radius 3 sigma)."""
    radius = max(1, int(round(3 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    for pad, shape in (((radius, radius, 0, 0), (1, 1, 1, -1)), ((0, 0, radius, radius), (1, 1, -1, 1))):
        x = F.conv2d(F.pad(x, pad, mode="reflect"), kernel.view(shape).repeat(c, 1, 1, 1), groups=c)
    return x


def masked_blur(values: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """The Gaussian-weighted mean of ``values`` over the pixels of ``mask`` (blur of values x mask over the blur of
    the mask): each region's colour without spreading it onto what lies around it."""
    return gaussian_blur(values * mask, sigma) / gaussian_blur(mask, sigma).clamp_min(1e-3)


def match_colours(image: torch.Tensor, hint: torch.Tensor, strength: float) -> torch.Tensor:
    """Shifts the figure's local colour toward the reference's part colours where the hint paints them.

    ``image`` (1, 3, H, W) in [-1, 1] (a decoded sheet), ``hint`` (4, H, W) (``colour_hint`` on the sheet's pose and
    size). Around each painted part the sheet's mean colour there is moved ``strength`` of the way to the hint's (both
    taken as Gaussian-weighted means over the painted pixels, so shading and edges inside a part stay the sheet's),
    weighted by the softened paint mask; the rest of the sheet is left as it is. A colour correction after the model,
    not the model: docs/training.md (2026-12-05, seventh session) measures both.
    """
    if strength <= 0 or not bool(hint[3].any()):
        return image
    scale = image.shape[-1] / 128.0  # measured at 128x192; the blur widths follow the sheet's size
    hint = hint.to(image.device, torch.float32)[None]
    paint = hint[:, 3:]
    x = (image.float() + 1) / 2
    weight = gaussian_blur(paint, 1.5 * scale)
    target = masked_blur(hint[:, :3], paint, 2.0 * scale)
    local = masked_blur(x, paint, 2.0 * scale)
    out = (x + strength * weight * (target - local)).clamp(0, 1)
    return (out * 2 - 1).to(image.dtype)


__all__ = ["HINT_CHANNELS", "colour_hint", "gaussian_blur", "masked_blur", "match_colours", "paint_hint",
           "part_colours"]
