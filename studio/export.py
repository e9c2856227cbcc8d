"""Exports: PNG per page, a multi-page PDF, a CBZ (comic book zip), all from rendered pages (Pillow only)."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
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


def pages_to_png_zip(pages: list[Image.Image]) -> bytes:
    """Pages as page-001.png, page-002.png, ... in a zip."""
    if not pages:
        raise ValueError("there are no pages to export: make pages first")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, png in enumerate(page_pngs(pages), start=1):
            z.writestr(f"page-{i:03d}.png", png)
    return buf.getvalue()


class TempFiles:
    """Where downloads are written before Gradio serves them: one folder, and each write first deletes the files
    older than ``max_age`` seconds (Gradio copies a returned file into its own cache, which ``gr.Blocks(
    delete_cache=...)`` cleans), so exports do not pile up on the server."""

    def __init__(self, folder: str | os.PathLike | None = None, max_age: float = 600.0):
        self.folder = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / "serialgen-exports"
        self.max_age = max_age

    def clean(self) -> None:
        now = time.time()
        if not self.folder.is_dir():
            return
        for entry in self.folder.iterdir():
            try:
                if now - entry.stat().st_mtime > self.max_age:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            except OSError:
                pass  # another process cleaned it

    def write(self, name: str, data: bytes) -> str:
        """``data`` as a file called ``name`` (in a folder of its own, so two downloads never collide)."""
        self.clean()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=self.folder)) / name
        path.write_bytes(data)
        return str(path)
