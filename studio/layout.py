"""Pages: layouts, panel placement, captions in boxes and speech bubbles with tails (Pillow only).

Bubbles go where they cover the character least: each candidate position is scored by how much of the panel's
figure mask it would hide, and the tail points from the bubble to the character's head (the top of the mask).
Text is wrapped and, where needed, shrunk to fit, in Comic Neue (assets/fonts, SIL Open Font License).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONTS = Path(__file__).resolve().parent.parent / "assets" / "fonts"
FONT_REGULAR, FONT_BOLD = FONTS / "ComicNeue-Regular.otf", FONTS / "ComicNeue-Bold.otf"

# Pages at 150 dpi.
PAGE_SIZES = {"A4": (1240, 1754), "US letter": (1275, 1650), "square": (1500, 1500)}
GUTTER_RANGE = (0, 80)  # px between panels: wider would leave no room for the panels of a 6-panel page
BORDER_RANGE = (0, 16)  # px of panel border

# Panel rectangles in the page's content box, (x0, y0, x1, y1) in [0, 1], reading order.
LAYOUTS = {
    "4-panel grid": [(0, 0, .5, .5), (.5, 0, 1, .5), (0, .5, .5, 1), (.5, .5, 1, 1)],
    "2x3": [(0, 0, .5, 1 / 3), (.5, 0, 1, 1 / 3), (0, 1 / 3, .5, 2 / 3), (.5, 1 / 3, 1, 2 / 3),
            (0, 2 / 3, .5, 1), (.5, 2 / 3, 1, 1)],
    "3-row strip": [(0, 0, 1, 1 / 3), (0, 1 / 3, 1, 2 / 3), (0, 2 / 3, 1, 1)],
    "classic": [(0, 0, 1, .36), (0, .36, .45, .68), (.45, .36, 1, .68), (0, .68, .62, 1), (.62, .68, 1, 1)],
    "single": [(0, 0, 1, 1)],
}


@dataclass
class PanelArt:
    image: Image.Image
    mask: np.ndarray | None = None  # (H, W) figure mask of ``image`` in [0, 1], where known
    speech: list[str] = field(default_factory=list)
    caption: str | None = None
    speakers: list[np.ndarray | None] = field(default_factory=list)  # per speech line: the speaker's figure mask


@dataclass
class PageGeometry:
    size: tuple[int, int]
    panels: list[tuple[int, int, int, int]] = field(default_factory=list)
    captions: list[tuple[int, int, int, int]] = field(default_factory=list)  # boxes
    bubbles: list[tuple[int, int, int, int]] = field(default_factory=list)
    texts: list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]] = field(default_factory=list)  # (text, box)
    bubble_panel: list[int] = field(default_factory=list)  # which panel each bubble belongs to
    covered: list[float] = field(default_factory=list)  # share of the figure each bubble hides
    tails: list[tuple[tuple[float, float], tuple[float, float]]] = field(default_factory=list)  # (tip, head)


def capacity(layout: str) -> int:
    return len(LAYOUTS[layout])


def paginate(num_panels: int, layout: str) -> list[list[int]]:
    """Panel indices per page."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    per_page = capacity(layout)
    return [list(range(i, min(i + per_page, num_panels))) for i in range(0, num_panels, per_page)]


def panel_rects(layout: str, page_size: tuple[int, int], margin: int, gutter: int) -> list[tuple[int, int, int, int]]:
    w, h = page_size
    cw, ch = w - 2 * margin, h - 2 * margin
    rects = []
    for x0, y0, x1, y1 in LAYOUTS[layout]:
        rects.append((round(margin + x0 * cw + (gutter / 2 if x0 > 0 else 0)),
                      round(margin + y0 * ch + (gutter / 2 if y0 > 0 else 0)),
                      round(margin + x1 * cw - (gutter / 2 if x1 < 1 else 0)),
                      round(margin + y1 * ch - (gutter / 2 if y1 < 1 else 0))))
    return rects


def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_BOLD if bold else FONT_REGULAR), max(6, int(size)))


def wrap(text: str, fnt: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """Greedy word wrap; a word longer than the width is broken by characters."""
    lines, current = [], ""
    for word in text.split():
        while fnt.getlength(word) > max_width and len(word) > 1:
            cut = max(1, next((i for i in range(len(word), 0, -1) if fnt.getlength(word[:i] + "-") <= max_width), 1))
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:cut] + "-")
            word = word[cut:]
        candidate = f"{current} {word}".strip()
        if fnt.getlength(candidate) <= max_width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def fit_text(text: str, max_width: float, max_height: float, size: int, bold=False, min_size: int = 9):
    """(font, lines, text width, text height): the largest size <= ``size`` whose wrapped text fits the box;
    at the smallest size, lines that still do not fit are dropped and the last one ends with an ellipsis."""
    while True:
        fnt = font(size, bold)
        lines = wrap(text, fnt, max_width)
        line_h = fnt.getbbox("Hg")[3] + max(2, size // 6)
        if line_h * len(lines) <= max_height or size <= min_size:
            break
        size = max(min_size, int(size * 0.88))
    if line_h * len(lines) > max_height:
        keep = max(1, int(max_height // line_h))
        lines = lines[:keep]
        while lines[-1] and fnt.getlength(lines[-1] + "...") > max_width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    width = max(fnt.getlength(line) for line in lines)
    return fnt, lines, width, line_h * len(lines)


def _cover(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[float, float, float]]:
    """Scale to cover ``size`` and crop: centred across, near the top down the image (heads stay in the panel).
    Returns the image and (scale, crop x, crop y)."""
    w, h = size
    s = max(w / image.width, h / image.height)
    resized = image.resize((max(w, round(image.width * s)), max(h, round(image.height * s))), Image.Resampling.LANCZOS)
    ox, oy = (resized.width - w) // 2, (resized.height - h) // 4
    return resized.crop((ox, oy, ox + w, oy + h)), (s, ox, oy)


def _draw_text(draw, lines, fnt, box, line_h, fill=(20, 20, 20)):
    x0, y0, x1, y1 = box
    total = line_h * len(lines)
    y = y0 + (y1 - y0 - total) / 2
    bounds = [x1, y1, x0, y0]
    for line in lines:
        lw = fnt.getlength(line)
        x = x0 + (x1 - x0 - lw) / 2
        draw.text((x, y), line, font=fnt, fill=fill)
        bb = draw.textbbox((x, y), line, font=fnt)
        bounds = [min(bounds[0], bb[0]), min(bounds[1], bb[1]), max(bounds[2], bb[2]), max(bounds[3], bb[3])]
        y += line_h
    return tuple(int(round(v)) for v in bounds)


def render_page(panels: list[PanelArt], layout: str = "4-panel grid", page_size="A4", gutter: int = 24,
                border: int = 5, margin: int = 48, background=(255, 255, 255)) -> tuple[Image.Image, PageGeometry]:
    """Draws one page: the panels of ``panels`` in ``layout`` order, with captions and bubbles."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if isinstance(page_size, str) and page_size not in PAGE_SIZES:
        raise ValueError(f"unknown page size {page_size!r}: choose one of {', '.join(PAGE_SIZES)}")
    size = PAGE_SIZES[page_size] if isinstance(page_size, str) else tuple(page_size)
    for what, value, (low, high) in (("gutter", gutter, GUTTER_RANGE), ("border", border, BORDER_RANGE)):
        if not low <= value <= high:
            raise ValueError(f"{what} {value} is out of range: choose {low} to {high} px")
    if len(panels) > capacity(layout):
        raise ValueError(f"{len(panels)} panels do not fit the {layout!r} layout ({capacity(layout)} per page)")
    page = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(page)
    geometry = PageGeometry(size=size)
    for index, (art, rect) in enumerate(zip(panels, panel_rects(layout, size, margin, gutter))):
        x0, y0, x1, y1 = rect
        pw, ph = x1 - x0, y1 - y0
        tile, (s, ox, oy) = _cover(art.image.convert("RGB"), (pw, ph))
        page.paste(tile, (x0, y0))
        mask = _cover_mask(art.mask, (pw, ph)) if art.mask is not None else None
        geometry.panels.append(rect)
        occupied = []
        text_size = max(14, int(min(size) / 48))
        pad = max(6, text_size // 2)
        if art.caption:
            fnt, lines, tw, th = fit_text(art.caption, pw * 0.86 - 2 * pad, ph * 0.3 - 2 * pad, text_size)
            box = (x0 + border + 4, y0 + border + 4, int(x0 + border + 4 + tw + 2 * pad),
                   int(y0 + border + 4 + th + 2 * pad))
            draw.rectangle(box, fill=(255, 246, 200), outline=(20, 20, 20), width=2)
            text_box = _draw_text(draw, lines, fnt, (box[0] + pad, box[1] + pad, box[2] - pad, box[3] - pad),
                                  th / len(lines))
            geometry.captions.append(box)
            geometry.texts.append((text_box, box))
            occupied.append(box)
        speakers = [_cover_mask(m, (pw, ph)) if m is not None else None for m in art.speakers]
        for k, said in enumerate(art.speech):
            speaker = speakers[k] if k < len(speakers) else None
            placed = _place_bubble(draw, said, rect, mask, occupied, text_size, border, speaker)
            if placed is None:
                continue
            box, text_box, covered, tail = placed
            geometry.tails.append(tail)
            geometry.bubbles.append(box)
            geometry.texts.append((text_box, box))
            geometry.bubble_panel.append(index)
            geometry.covered.append(covered)
            occupied.append(box)
        draw.rectangle(rect, outline=(15, 15, 15), width=border)
    return page, geometry


def _cover_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask cropped and scaled as its panel's picture is."""
    m = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8))
    return np.asarray(_cover(m, size)[0], np.float32) / 255.0


def _head(mask: np.ndarray | None, pw: int, ph: int) -> tuple[float, float]:
    """Where the tail points: the top of the figure (its head), or the panel centre without a mask."""
    if mask is None or mask.max() < 0.5:
        return pw / 2, ph * 0.45
    ys, xs = np.nonzero(mask > 0.5)
    top = ys.min()
    band = xs[ys < top + max(4, (ys.max() - top) // 8)]
    return float(band.mean()), float(top + (ys.max() - top) * 0.06)


def _place_bubble(draw, text, rect, mask, occupied, text_size, border, speaker=None):
    """A bubble where it hides little of the figures (``mask``), its tail aimed at the speaker's head (``speaker``,
    the speaker's own figure; the figures' head without one)."""
    x0, y0, x1, y1 = rect
    pw, ph = x1 - x0, y1 - y0
    pad = max(8, text_size // 2)
    fnt, lines, tw, th = fit_text(text, pw * 0.42, ph * 0.26, text_size, bold=True)
    # an ellipse holds a text rectangle when its axes are sqrt(2) times the text's sides
    bw, bh = int(tw * 1.42 + 2 * pad), int(th * 1.42 + 2 * pad)
    inset = border + 6
    if bw > pw - 2 * inset or bh > ph - 2 * inset:
        return None
    hx, hy = _head(speaker if speaker is not None else mask, pw, ph)
    best = None
    for fx in np.linspace(0, 1, 5):
        for fy in np.linspace(0, 1, 5):
            bx = int(inset + fx * (pw - 2 * inset - bw))
            by = int(inset + fy * (ph - 2 * inset - bh))
            box = (x0 + bx, y0 + by, x0 + bx + bw, y0 + by + bh)
            if any(not (box[2] < o[0] or box[0] > o[2] or box[3] < o[1] or box[1] > o[3]) for o in occupied):
                continue
            covered = float(mask[by:by + bh, bx:bx + bw].sum() / max(1.0, mask.sum())) if mask is not None else 0.0
            # prefer covering little, then being high in the panel and near the speaker
            score = covered * 10 + fy * 0.6 + abs((bx + bw / 2) - hx) / pw * 0.3
            if best is None or score < best[0]:
                best = (score, box, covered)
    if best is None:
        return None
    _, box, covered = best
    bx0, by0, bx1, by1 = box
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    head = (x0 + hx, y0 + hy)
    # the tail: from the bubble's edge towards the head, stopping short of it
    dx, dy = head[0] - cx, head[1] - cy
    dist = max(1.0, (dx * dx + dy * dy) ** 0.5)
    reach = min(dist * 0.8, max(bh * 1.2, text_size * 3))
    tip = (cx + dx / dist * (bh / 2 + reach), cy + dy / dist * (bh / 2 + reach))
    tip = (min(max(tip[0], x0 + border + 2), x1 - border - 2), min(max(tip[1], y0 + border + 2), y1 - border - 2))
    nx, ny = -dy / dist, dx / dist
    base = max(8, min(bw, bh) // 4)
    draw.polygon([(cx + nx * base, cy + ny * base), (cx - nx * base, cy - ny * base), tip], fill=(255, 255, 255),
                 outline=(20, 20, 20), width=2)
    draw.ellipse(box, fill=(255, 255, 255), outline=(20, 20, 20), width=3)
    inner = (cx - tw / 2, cy - th / 2, cx + tw / 2, cy + th / 2)
    text_box = _draw_text(draw, lines, fnt, inner, th / len(lines))
    return box, text_box, covered, (tip, head)
