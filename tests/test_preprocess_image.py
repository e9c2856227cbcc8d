import io

import numpy as np
import pytest
from PIL import Image

from engine.preprocess import image as image_mod
from engine.preprocess import load_image, pad_to_square


def test_modes_become_rgb():
    base = Image.new("RGB", (20, 30), (10, 20, 30))
    for mode in ("RGBA", "L", "P", "CMYK", "LA", "I", "F", "1"):
        out = load_image(base.convert(mode))
        assert out.mode == "RGB" and out.size == (20, 30)


def test_transparency_goes_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_arrays():
    assert load_image(np.zeros((5, 6), np.uint8)).size == (6, 5)
    assert load_image(np.ones((5, 6, 4), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="NaN"):
        load_image(np.full((5, 6, 3), np.nan))
    with pytest.raises(ValueError, match=r"shape \(5,\) is not an image"):
        load_image(np.zeros(5))


def test_bad_things_are_named(tmp_path):
    with pytest.raises(ValueError, match="sheet must be an image.*got dict"):
        load_image({"a": 1}, name="sheet")
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(bad)
    truncated = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:40])
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(truncated)
    with pytest.raises(ValueError, match="too small"):
        load_image(Image.new("RGB", (30, 100)), min_side=64)


def test_pixel_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(image_mod, "MAX_PIXELS", 1000)
    with pytest.raises(ValueError, match="over the"):
        load_image(Image.new("RGB", (100, 100)))


def test_decompression_bomb_file_is_refused(monkeypatch, tmp_path):
    path = tmp_path / "big.png"
    Image.new("1", (4000, 4000)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ValueError, match="too large to decode safely"):
        load_image(path)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(path).getpixel((0, 0)) == (255, 0, 0)


def test_pad_to_square_keeps_the_whole_figure():
    img = Image.new("RGB", (20, 30), (0, 0, 0))
    sq = pad_to_square(img)
    assert sq.size == (30, 30) and sq.getpixel((0, 0)) == (255, 255, 255) and sq.getpixel((15, 15)) == (0, 0, 0)


@pytest.mark.parametrize("size, aspect, padded", [((30, 10), (2, 3), (30, 45)), ((20, 30), (3, 1), (90, 30)),
                                                  ((20, 30), (2, 3), (20, 30))])
def test_pad_to_aspect_centres_the_image_on_white(size, aspect, padded):
    from engine.preprocess.image import pad_to_aspect

    img = Image.new("RGB", size, (0, 0, 0))
    out = np.asarray(pad_to_aspect(img, *aspect))
    assert out.shape[1::-1] == padded
    x0, y0 = (padded[0] - size[0]) // 2, (padded[1] - size[1]) // 2
    assert (out[y0:y0 + size[1], x0:x0 + size[0]] == 0).all()  # the whole image, where it was centred
    assert (out == 255).all(axis=2).sum() == padded[0] * padded[1] - size[0] * size[1]  # white everywhere else
