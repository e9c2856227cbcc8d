"""Procedural backgrounds: 10 scene types with random layouts, times of day and lighting (numpy + Pillow)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SCENES = ("park", "street", "beach", "forest", "room", "classroom", "night sky", "snow", "desert", "studio")
# caption phrase per scene (time of day appended for outdoor scenes)
PHRASES = {
    "park": "in a park", "street": "on a city street", "beach": "on a beach", "forest": "in a forest",
    "room": "in a room", "classroom": "in a classroom", "night sky": "under a starry night sky",
    "snow": "in the snow", "desert": "in a desert", "studio": "in a photo studio",
}
TIMES = ("day", "sunset", "night")
OUTDOOR = ("park", "street", "beach", "forest", "snow", "desert")
LIGHTING = {"neutral": (1.0, 1.0, 1.0), "warm": (1.05, 0.93, 0.8), "cool": (0.86, 0.94, 1.06),
            "dim": (0.72, 0.72, 0.8)}
SKIES = {"day": ((110, 170, 240), (200, 225, 250)), "sunset": ((250, 140, 90), (255, 210, 150)),
         "night": ((15, 20, 50), (40, 50, 90))}


def _gradient(size, top, bottom, y0=0, y1=None) -> np.ndarray:
    w, h = size
    y1 = h if y1 is None else y1
    t = np.clip((np.arange(h) - y0) / max(1, y1 - y0), 0, 1)[:, None, None]
    return (np.array(top, float) * (1 - t) + np.array(bottom, float) * t) * np.ones((1, w, 1))


def _jitter(rng, color, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _trees(draw, rng, w, horizon, n, dark=1.0, pine=False):
    for _ in range(n):
        x = rng.uniform(-0.05, 1.05) * w
        base = horizon + rng.uniform(0.0, 0.08) * w
        height = rng.uniform(0.25, 0.5) * w
        trunk = (int(90 * dark), int(60 * dark), int(35 * dark))
        draw.rectangle((x - 0.02 * w, base - height * 0.45, x + 0.02 * w, base), fill=trunk)
        green = (int(rng.integers(30, 70) * dark), int(rng.integers(110, 170) * dark), int(rng.integers(40, 80) * dark))
        if pine:
            for k in range(3):
                top = base - height * (0.35 + 0.22 * k)
                half = 0.13 * w * (1 - 0.25 * k)
                draw.polygon([(x - half, top + 0.25 * height), (x + half, top + 0.25 * height), (x, top - 0.1 * height)],
                             fill=green)
        else:
            r = rng.uniform(0.09, 0.16) * w
            draw.ellipse((x - r, base - height - r * 0.4, x + r, base - height + r * 1.6), fill=green)


def draw_background(kind: str, size: tuple[int, int], rng: np.random.Generator, time: str = "day") -> Image.Image:
    if kind not in SCENES:
        raise ValueError(f"unknown scene {kind!r}; known: {SCENES}")
    w, h = size
    horizon = int(h * rng.uniform(0.45, 0.7))
    sky_top, sky_bottom = SKIES[time]
    if kind in OUTDOOR:
        arr = _gradient(size, sky_top, sky_bottom, 0, horizon)
    elif kind == "night sky":
        arr = _gradient(size, (5, 8, 30), (30, 35, 80))
    elif kind == "studio":
        top = _jitter(rng, (200, 200, 210), 50)
        arr = _gradient(size, top, tuple(int(c * 0.55) for c in top))
    else:  # indoor
        wall = _jitter(rng, [(230, 220, 200), (200, 220, 230), (235, 205, 205), (210, 230, 200)][rng.integers(4)], 15)
        arr = _gradient(size, wall, tuple(int(c * 0.9) for c in wall))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    night = time == "night"
    dark = 0.45 if night else 1.0

    if kind in OUTDOOR and time != "night" and rng.random() < 0.7:
        for _ in range(rng.integers(1, 4)):  # clouds
            cx, cy, r = rng.uniform(0, w), rng.uniform(0.05, 0.3) * h, rng.uniform(0.05, 0.12) * w
            for k in range(3):
                draw.ellipse((cx + (k - 1) * r - r, cy - r * 0.6, cx + (k - 1) * r + r, cy + r * 0.6), fill=(245, 245, 250))
    if kind in OUTDOOR and night:
        for _ in range(30):
            x, y = rng.uniform(0, w), rng.uniform(0, horizon)
            draw.point((x, y), fill=(230, 230, 200))

    if kind == "park":
        draw.rectangle((0, horizon, w, h), fill=_jitter(rng, (int(90 * dark), int(170 * dark), int(80 * dark))))
        _trees(draw, rng, w, horizon, int(rng.integers(2, 5)), dark)
        py = horizon + rng.uniform(0.15, 0.3) * (h - horizon)
        draw.polygon([(w * 0.3, h), (w * 0.7, h), (w * 0.55, py), (w * 0.45, py)], fill=(int(200 * dark), int(180 * dark), int(140 * dark)))
    elif kind == "street":
        x = 0.0
        while x < w:
            bw, bh = rng.uniform(0.15, 0.35) * w, rng.uniform(0.25, 0.6) * h
            color = tuple(int(c * dark) for c in _jitter(rng, (150, 140, 135), 40))
            draw.rectangle((x, horizon - bh, x + bw, horizon), fill=color)
            for wy in np.arange(horizon - bh + 0.04 * h, horizon - 0.05 * h, 0.07 * h):
                for wx in np.arange(x + 0.03 * w, x + bw - 0.05 * w, 0.07 * w):
                    lit = (250, 220, 120) if night and rng.random() < 0.5 else (int(90 * dark), int(120 * dark), int(160 * dark))
                    draw.rectangle((wx, wy, wx + 0.035 * w, wy + 0.035 * h), fill=lit)
            x += bw
        draw.rectangle((0, horizon, w, h), fill=(int(70 * dark), int(70 * dark), int(75 * dark)))
        draw.rectangle((0, horizon, w, horizon + 0.04 * h), fill=(int(160 * dark), int(160 * dark), int(160 * dark)))
        for lx in np.arange(rng.uniform(0, 0.2) * w, w, 0.3 * w):
            draw.rectangle((lx, (horizon + h) / 2, lx + 0.12 * w, (horizon + h) / 2 + 0.012 * h), fill=(230, 230, 230))
    elif kind == "beach":
        sea_y = horizon + 0.12 * (h - horizon)
        draw.rectangle((0, horizon, w, sea_y), fill=(int(40 * dark), int(120 * dark), int(190 * dark)))
        draw.rectangle((0, sea_y, w, h), fill=_jitter(rng, (int(235 * dark), int(210 * dark), int(150 * dark))))
        if time != "night":
            sx, r = rng.uniform(0.1, 0.9) * w, 0.06 * w
            draw.ellipse((sx - r, horizon - 2.5 * r, sx + r, horizon - 0.5 * r), fill=(255, 230, 120))
    elif kind == "forest":
        draw.rectangle((0, horizon, w, h), fill=(int(60 * dark), int(110 * dark), int(50 * dark)))
        _trees(draw, rng, w, horizon, int(rng.integers(6, 10)), 0.8 * dark)
    elif kind == "snow":
        draw.rectangle((0, horizon, w, h), fill=(int(240 * dark), int(244 * dark), int(250 * dark)))
        _trees(draw, rng, w, horizon, int(rng.integers(2, 5)), dark, pine=True)
        for _ in range(40):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), 0.006 * w
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(250, 250, 255))
    elif kind == "desert":
        draw.rectangle((0, horizon, w, h), fill=_jitter(rng, (int(225 * dark), int(185 * dark), int(120 * dark))))
        for _ in range(3):
            cx, r = rng.uniform(0, w), rng.uniform(0.3, 0.6) * w
            draw.ellipse((cx - r, horizon - 0.05 * h, cx + r, horizon + 0.12 * h), fill=(int(210 * dark), int(165 * dark), int(105 * dark)))
        for _ in range(rng.integers(1, 3)):
            x, base = rng.uniform(0, w), horizon + rng.uniform(0.02, 0.1) * h
            green = (int(60 * dark), int(130 * dark), int(70 * dark))
            draw.rounded_rectangle((x - 0.02 * w, base - 0.2 * h, x + 0.02 * w, base), radius=0.02 * w, fill=green)
            draw.rounded_rectangle((x - 0.07 * w, base - 0.14 * h, x - 0.04 * w, base - 0.07 * h), radius=0.015 * w, fill=green)
    elif kind == "room":
        floor = _jitter(rng, (150, 110, 70))
        draw.rectangle((0, horizon, w, h), fill=floor)
        wx, wy = rng.uniform(0.05, 0.6) * w, rng.uniform(0.1, 0.25) * h
        sky = SKIES[time][0]
        draw.rectangle((wx, wy, wx + 0.3 * w, wy + 0.22 * h), fill=sky, outline=(240, 240, 240), width=max(1, w // 80))
        fx = rng.uniform(0.05, 0.75) * w
        draw.rectangle((fx, 0.2 * h, fx + 0.18 * w, 0.32 * h), fill=_jitter(rng, (120, 160, 120), 60),
                       outline=(90, 60, 30), width=max(1, w // 100))
    elif kind == "classroom":
        draw.rectangle((0, horizon, w, h), fill=(170, 150, 120))
        bx = rng.uniform(0.05, 0.3) * w
        draw.rectangle((bx, 0.12 * h, bx + 0.6 * w, horizon - 0.12 * h), fill=(40, 80, 60), outline=(120, 90, 60),
                       width=max(1, w // 60))
        for _ in range(3):
            lx, ly = bx + rng.uniform(0.05, 0.4) * w, rng.uniform(0.18, 0.3) * h
            draw.line((lx, ly, lx + 0.15 * w, ly), fill=(230, 230, 230), width=max(1, w // 150))
        for dx in np.arange(rng.uniform(0, 0.2) * w, w, 0.35 * w):
            dy = horizon + 0.1 * (h - horizon)
            draw.rectangle((dx, dy, dx + 0.22 * w, dy + 0.05 * h), fill=(160, 110, 60))
    elif kind == "night sky":
        for _ in range(60):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h * 0.8), rng.uniform(0.002, 0.006) * w
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 220))
        mx, my, r = rng.uniform(0.1, 0.9) * w, rng.uniform(0.08, 0.3) * h, 0.07 * w
        draw.ellipse((mx - r, my - r, mx + r, my + r), fill=(245, 240, 200))
        draw.rectangle((0, h * 0.85, w, h), fill=(15, 25, 20))
    elif kind == "studio":
        pass  # the gradient is the whole scene
    return img
