"""The studio through gradio_client against a locally launched app (tiny models): the named API, the UI flow per
session, bad input, and session isolation."""

import json
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from studio import build_demo

EXAMPLE = str(Path(__file__).resolve().parent.parent / "assets" / "examples" / "mia.png")


@pytest.fixture(scope="module")
def app(tiny_full_engine):
    demo = build_demo(tiny_full_engine)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield demo
    demo.close()


@pytest.fixture
def client(app):
    return Client(app.local_url, verbose=False)


def test_named_api_standardize_panels_page_export(client, tmp_path):
    sheet, review, target, info = client.predict(handle_file(EXAMPLE), 3, 2, 3.5, api_name="/standardize")
    assert Image.open(sheet).size == (64, 96) and info["seed"] == 3
    assert Image.open(review).size == (64, 96) and Image.open(target).size == (64, 96)

    script = '[Mia] running "Wait for me!" # Noon\n[NC] an empty street'
    gallery, info = client.predict([handle_file(sheet)], "Mia", script, 10, {"steps": 2}, api_name="/panels")
    assert len(gallery) == 2 and [p["seed"] for p in info["panels"]] == [10, 11]
    assert [p["character"] for p in info["panels"]] == ["Mia", None]

    panel_files = [handle_file(item["image"]) for item in gallery]
    pages = client.predict(panel_files, script, "4-panel grid", "square", 20, 4, api_name="/page")
    assert len(pages) == 1 and Image.open(pages[0]["image"]).size == (1500, 1500)

    pdf = client.predict([handle_file(pages[0]["image"])], "pdf", "Rain", api_name="/export")
    assert Path(pdf).read_bytes().startswith(b"%PDF")
    cbz = client.predict([handle_file(pages[0]["image"])], "cbz", "Rain", api_name="/export")
    assert zipfile.ZipFile(cbz).namelist() == ["001.png", "ComicInfo.xml"]


def test_api_errors_are_clear_messages(client, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(Exception, match="not a readable image"):
        client.predict(handle_file(str(text)), 1, 2, 3.5, api_name="/standardize")
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 40)).save(small)
    with pytest.raises(Exception, match="too small"):
        client.predict(handle_file(str(small)), 1, 2, 3.5, api_name="/standardize")
    with pytest.raises(Exception, match="line 1, column 2"):
        client.predict([handle_file(EXAMPLE)], "Mia", "[Max] waving", 1, {}, api_name="/panels")
    # the server keeps serving
    assert client.predict(handle_file(EXAMPLE), 3, 2, 3.5, api_name="/standardize")[3]["seed"] == 3


def test_ui_flow_in_one_session_and_isolation_between_sessions(app, tmp_path):
    alice, bob = Client(app.local_url, verbose=False), Client(app.local_url, verbose=False)
    out = alice.predict("Mia", handle_file(EXAMPLE), 5, 2, 3.5, api_name="/ui_standardize")
    assert "sheet ready" in out[4]
    table, status = alice.predict("Mia", api_name="/ui_accept")
    assert table["data"] == [["Mia", "accepted", 5]]
    # Bob sees none of Alice's characters
    with pytest.raises(Exception, match="Mia has no sheet yet"):
        bob.predict("Mia", api_name="/ui_accept")
    with pytest.raises(Exception, match='unknown character "Mia"'):
        bob.predict("[Mia] waving", "none", "", api_name="/ui_check")
    # Alice's script, panels (a failed call loses nothing), pages and archive
    with pytest.raises(Exception, match="unclosed quote"):
        alice.predict('[Mia] waving "hi', "none", "", api_name="/ui_check")
    table, gallery, status = alice.predict('[Mia] waving "Hi!" # Day one\n[NC] a street', "none", "",
                                           api_name="/ui_check")
    assert len(table["data"]) == 2 and "2 panels" in status
    *_, status = alice.predict('[Mia] waving "Hi!" # Day one\n[NC] a street', "none", "", 1, 2, 1.0,
                               api_name="/ui_draw")
    assert "2 of 2 panels drawn" in status
    pages = alice.predict("4-panel grid", "A4", 24, 5, api_name="/ui_pages")
    assert len(pages) == 1
    archive = alice.predict("project archive", api_name="/ui_export")
    meta = json.loads(zipfile.ZipFile(archive).read("story.json"))
    assert [c["name"] for c in meta["characters"]] == ["Mia"] and len(meta["panels"]) == 2
    # Bob opens Alice's archive and gets exactly her story
    opened = bob.predict(handle_file(archive), api_name="/ui_load")
    assert opened[0]["data"] == [["Mia", "accepted", 5]] and "2 panels" in opened[-1]
    fake = tmp_path / "broken.zip"
    fake.write_bytes(b"PK not really a zip")
    with pytest.raises(Exception, match="not a project archive"):
        bob.predict(handle_file(str(fake)), api_name="/ui_load")
    with pytest.raises(Exception, match="Invalid file type"):  # Gradio refuses non-zip uploads there itself
        bob.predict(handle_file(EXAMPLE), api_name="/ui_load")
    assert bob.predict("Mia", api_name="/ui_accept")[0]["data"] == [["Mia", "accepted", 5]]  # nothing was lost
