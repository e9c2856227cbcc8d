"""Exports: PNG per page, a multi-page PDF, a CBZ (comic book zip), all from rendered pages (Pillow only)."""

from __future__ import annotations

import io
import zipfile
from xml.sax.saxutils import escape

from PIL import Image


def pages_to_pdf(pages: list[Image.Image], title: str = "SerialGen story", dpi: int = 150) -> bytes:
    if not pages:
        raise ValueError("there are no pages to export: make pages first")
    buf = io.BytesIO()
    rgb = [p.convert("RGB") for p in pages]
    rgb[0].save(buf, format="PDF", save_all=True, append_images=rgb[1:], resolution=dpi, title=title)
    return buf.getvalue()


def pages_to_cbz(pages: list[Image.Image], title: str = "SerialGen story") -> bytes:
    """Pages as 001.png, 002.png, ... plus ComicInfo.xml, the layout comic readers expect."""
    if not pages:
        raise ValueError("there are no pages to export: make pages first")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i, page in enumerate(pages, start=1):
            png = io.BytesIO()
            page.convert("RGB").save(png, format="PNG")
            z.writestr(f"{i:03d}.png", png.getvalue())
        z.writestr("ComicInfo.xml", '<?xml version="1.0" encoding="utf-8"?>\n<ComicInfo>'
                   f"<Title>{escape(title)}</Title><PageCount>{len(pages)}</PageCount>"
                   "<Notes>Made with SerialGen Studio</Notes></ComicInfo>\n")
    return buf.getvalue()


def page_pngs(pages: list[Image.Image]) -> list[bytes]:
    out = []
    for page in pages:
        buf = io.BytesIO()
        page.convert("RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
