import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from studio.export import pages_to_cbz, pages_to_pdf
from studio.script import parse_script
from studio.story import ArchiveError, Character, Panel, Story, load_archive, save_archive


def make_story():
    story = Story(title="Rain", script='[Mia] running "Wait!" # Noon\n[NC] a street', style="manga",
                  negative_prompt="blurry", layout="2x3", page_size="square", gutter=30, border=4)
    ref = Image.new("RGB", (80, 120), (10, 200, 30))
    story.characters["Mia"] = Character("Mia", ref, sheet=Image.new("RGB", (64, 96), (200, 10, 10)), accepted=True,
                                        seed=7, steps=20, guidance=3.5, colour=0.3, review=Image.new("RGB", (64, 96), (1, 2, 3)))
    story.characters["Leo"] = Character("Leo", Image.new("RGB", (70, 70), (5, 5, 250)))
    mask = np.zeros((96, 64), np.float32)
    mask[10:50, 20:40] = 1
    for spec in parse_script(story.script, ["Mia"]):
        story.panels.append(Panel(spec, seed=spec.index + 3, locked=spec.index == 0, prompt=None if spec.index else
                                  "running fast", image=Image.new("RGB", (64, 96), (spec.index * 90, 0, 0)), mask=mask))
    return story


def test_archive_round_trip_is_identical():
    story = make_story()
    data = save_archive(story)
    loaded = load_archive(data)
    assert save_archive(loaded) == data  # the same story, characters, sheets and panels, byte for byte
    assert loaded.panels[0].text == "running fast" and loaded.panels[1].spec.character is None
    assert np.array_equal(np.asarray(loaded.characters["Mia"].sheet), np.asarray(story.characters["Mia"].sheet))
    np.testing.assert_array_equal(loaded.panels[0].mask, story.panels[0].mask)
    assert loaded.characters["Leo"].sheet is None and not loaded.characters["Leo"].accepted
    assert loaded.characters["Mia"].colour == 0.3 and loaded.characters["Leo"].colour is None


def _zip(entries: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"not a zip", "not a zip file"),
        (_zip({"readme.txt": "x"}), "unexpected entry"),
        (_zip({"../../etc/passwd": "x", "story.json": "{}"}), "unexpected entry '../../etc/passwd'"),
        (_zip({"/abs/path.png": "x"}), "unexpected entry"),
        (_zip({"characters/0/reference.png": "x"}), "no story.json"),
        (_zip({"story.json": "{not json"}), "not valid JSON"),
        (_zip({"story.json": json.dumps({"format": "other"})}), "not a SerialGen Studio project"),
        (_zip({"story.json": json.dumps({"format": "serialgen-studio-project", "version": 99})}), "version 99"),
        (_zip({"story.json": json.dumps({"format": "serialgen-studio-project", "version": 1, "characters": [
            {"name": "A", "files": {"reference": "characters/0/reference.png"}}]})}), "does not contain it"),
        (_zip({"story.json": json.dumps({"format": "serialgen-studio-project", "version": 1, "characters": [
            {"name": "A", "files": {"reference": "../x.png"}}]})}), "refusing the archive entry"),
        (_zip({"story.json": json.dumps({"format": "serialgen-studio-project", "version": 1, "title": 5})}),
         "title should be str"),
        (_zip({"story.json": json.dumps({"format": "serialgen-studio-project", "version": 1,
                                         "characters": [{"name": "A", "files": {"reference":
                                                                                "characters/0/reference.png"}}]}),
               "characters/0/reference.png": b"garbage"}), "not a readable PNG"),
    ],
)
def test_malformed_archives_are_refused_clearly(data, message):
    with pytest.raises(ArchiveError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_archive(data)


def test_pdf_and_cbz():
    pages = [Image.new("RGB", (300, 400), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    pdf = pages_to_pdf(pages, "Rain")
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ") + \
        pdf.count(b"/Type/Page") >= 3
    cbz = zipfile.ZipFile(io.BytesIO(pages_to_cbz(pages, "Rain & Sun")))
    assert cbz.namelist() == ["001.png", "002.png", "003.png", "ComicInfo.xml"]
    assert Image.open(io.BytesIO(cbz.read("002.png"))).getpixel((5, 5)) == (0, 255, 0)
    assert b"Rain &amp; Sun" in cbz.read("ComicInfo.xml")
    with pytest.raises(ValueError, match="no pages"):
        pages_to_pdf([])


def test_archives_from_before_group_panels_still_open():
    story = make_story()
    data = save_archive(story)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(entries["story.json"])
    for panel in meta["panels"]:  # the single-character layout of archive version 1 as first written
        spec = panel["spec"]
        spec["character"] = spec.pop("characters")[0] if spec["characters"] else None
        del spec["positions"], spec["speakers"]
        panel["consistency"] = panel.pop("scores").get("Mia", 0.7 if spec["character"] else None)
        panel["sheet_revision"] = panel.pop("sheet_revisions").get("Mia")
    entries["story.json"] = json.dumps(meta)
    old = load_archive(_zip(entries))
    assert old.panels[0].spec.characters == ["Mia"] and old.panels[0].spec.speakers == ["Mia"]
    assert old.panels[0].scores == {"Mia": 0.7} and old.panels[1].spec.characters == []
    assert old.panels[1].scores == {} and save_archive(old) != data


@pytest.mark.parametrize("change, message", [
    (lambda spec: spec.update(characters=["Mia", "Mia"]), "at most 3 different characters"),
    (lambda spec: spec.update(characters=["Ghost"]), "'Ghost', who is not one of the project's characters"),
    (lambda spec: spec.update(positions=["top"]), "positions are malformed"),
    (lambda spec: spec.update(speakers=["Leo"]), "speakers are not its characters"),
    (lambda spec: spec.update(characters=[["Mia"]]), "at most 3 different characters"),
])
def test_group_fields_of_an_archive_are_checked(change, message):
    data = save_archive(make_story())
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(entries["story.json"])
    change(meta["panels"][0]["spec"])
    entries["story.json"] = json.dumps(meta)
    with pytest.raises(ArchiveError, match=message):
        load_archive(_zip(entries))
