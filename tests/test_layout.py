import numpy as np
import pytest
from PIL import Image

from studio.layout import LAYOUTS, PAGE_SIZES, PanelArt, paginate, panel_rects, render_page


def panel(color=(120, 160, 200), figure_left=True, speech=(), caption=None):
    img = Image.new("RGB", (128, 192), color)
    mask = np.zeros((192, 128), np.float32)
    if figure_left:
        mask[30:190, 10:60] = 1  # the character stands on the left
        img.paste((200, 60, 60), (10, 30, 60, 190))
    return PanelArt(image=img, mask=mask, speech=list(speech), caption=caption)


def inside(inner, outer, tol=0):
    return inner[0] >= outer[0] - tol and inner[1] >= outer[1] - tol and inner[2] <= outer[2] + tol \
        and inner[3] <= outer[3] + tol


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("page_size", list(PAGE_SIZES))
def test_panels_lie_inside_the_page_without_overlap(layout, page_size):
    rects = panel_rects(layout, PAGE_SIZES[page_size], margin=48, gutter=24)
    w, h = PAGE_SIZES[page_size]
    for i, r in enumerate(rects):
        assert 0 <= r[0] < r[2] <= w and 0 <= r[1] < r[3] <= h
        for other in rects[i + 1:]:
            assert r[2] <= other[0] or other[2] <= r[0] or r[3] <= other[1] or other[3] <= r[1]
    assert min(r[2] - r[0] for r in rects) > 200


def test_required_layouts_and_pagination():
    assert {"4-panel grid", "2x3", "3-row strip", "classic"} <= set(LAYOUTS)
    assert paginate(7, "4-panel grid") == [[0, 1, 2, 3], [4, 5, 6]]
    assert paginate(5, "classic") == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="unknown layout"):
        paginate(3, "spiral")


def test_bubbles_and_captions_stay_inside_their_panels_and_text_fits():
    long = "This is a rather long line of dialogue that will have to wrap over several lines to fit. " * 2
    arts = [panel(speech=["Wait for me!"], caption="The storm broke at noon."),
            panel(speech=[long, "Two!"]), panel(caption="x" * 500), panel(figure_left=False, speech=["Hi"])]
    page, geo = render_page(arts, "4-panel grid", "A4")
    assert page.size == PAGE_SIZES["A4"] and len(geo.panels) == 4
    assert len(geo.bubbles) == 4 and len(geo.captions) == 2
    for box, i in zip(geo.bubbles, geo.bubble_panel):
        assert inside(box, geo.panels[i])
    for box in geo.captions:
        assert any(inside(box, r) for r in geo.panels)
    for text_box, box in geo.texts:
        assert inside(text_box, box, tol=2)  # text lies within its bubble/caption box


def test_bubble_avoids_the_character_and_its_tail_points_at_the_head():
    page, geo = render_page([panel(speech=["Hello there!"])], "single", "square")
    rect, bubble = geo.panels[0], geo.bubbles[0]
    assert geo.covered[0] < 0.02  # the bubble hides (almost) none of the figure
    (tx, ty), (hx, hy) = geo.tails[0]
    cx, cy = (bubble[0] + bubble[2]) / 2, (bubble[1] + bubble[3]) / 2
    assert np.hypot(tx - hx, ty - hy) < np.hypot(cx - hx, cy - hy)  # the tail reaches towards the head
    # the head is the top of the figure (left side of the panel)
    assert hx < (rect[0] + rect[2]) / 2
    # without a mask the bubble still fits, pointing at the panel centre
    plain = PanelArt(image=Image.new("RGB", (128, 192), (90, 90, 90)), speech=["Hm."])
    _, geo2 = render_page([plain], "single", "square")
    assert len(geo2.bubbles) == 1


def test_too_many_panels_for_a_layout():
    with pytest.raises(ValueError, match="do not fit"):
        render_page([panel()] * 4, "3-row strip")


def test_each_bubble_tail_points_at_its_speakers_figure():
    from studio.script import parse_script
    from studio.service import panel_art
    from studio.story import Panel

    img = Image.new("RGB", (192, 128), (120, 160, 200))
    mask = np.zeros((128, 192), np.float32)
    mask[40:128, 15:60] = 1  # Mia on the left, her head at y=40
    mask[20:128, 130:175] = 1  # Kai on the right, taller
    (spec,) = parse_script('[Mia][Kai] on a bench Kai: "Hello." Mia: "Hi!" "(unsaid)"', ["Mia", "Kai"])
    art = panel_art(Panel(spec, image=img, mask=mask))
    _, geo = render_page([art], "single", "square")
    rect = geo.panels[0]
    middle = (rect[0] + rect[2]) / 2
    (_, kai_head), (_, mia_head), (_, both) = geo.tails
    assert kai_head[0] > middle and mia_head[0] < middle  # Kai's line points right, Mia's left
    assert kai_head[1] < mia_head[1]  # at each one's own head: Kai's is higher
    assert both == kai_head  # an unattributed line points at the top of all the figures (Kai is the taller)
