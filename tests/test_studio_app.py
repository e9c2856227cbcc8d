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
    assert [p["characters"] for p in info["panels"]] == [["Mia"], []] and set(info["panels"][0]["scores"]) == {"Mia"}

    panel_files = [handle_file(item["image"]) for item in gallery]
    pages = client.predict(panel_files, script, "4-panel grid", "square", 20, 4, api_name="/page")
    assert len(pages) == 1 and Image.open(pages[0]["image"]).size == (1500, 1500)

    pdf = client.predict([handle_file(pages[0]["image"])], "pdf", "Rain", api_name="/export")
    assert Path(pdf).read_bytes().startswith(b"%PDF")
    cbz = client.predict([handle_file(pages[0]["image"])], "cbz", "Rain", api_name="/export")
    assert zipfile.ZipFile(cbz).namelist() == ["001.png", "ComicInfo.xml"]


def test_named_api_draws_several_characters_in_one_panel(client):
    script = '[Mia][Kai:left] on a bench Kai: "Hi!" Mia: "Hello."\n[Kai] waving'
    sheets = [handle_file(EXAMPLE), handle_file(str(Path(EXAMPLE).with_name("kai.png")))]
    gallery, info = client.predict(sheets, "Mia, Kai", script, 4, {"steps": 2}, api_name="/panels")
    assert [p["characters"] for p in info["panels"]] == [["Mia", "Kai"], ["Kai"]]
    assert set(info["panels"][0]["scores"]) == {"Mia", "Kai"} and "[Mia][Kai:left]" in gallery[0]["caption"]
    pages = client.predict([handle_file(item["image"]) for item in gallery], script, "single", "square", 20, 4,
                           api_name="/page")
    assert len(pages) == 2
    with pytest.raises(Exception, match="line 1, column 12: Mia is tagged twice in this panel"):
        client.predict(sheets, "Mia, Kai", "[Mia][Kai][Mia] x", 1, {}, api_name="/panels")


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
    out = alice.predict("Mia", handle_file(EXAMPLE), 5, 2, 3.5, 0.5, api_name="/ui_standardize")
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


# ---------------------------------------------------------------------------------------------------------------
# A careless or hostile client (issue 15): limits, clear messages in the studio's words, PNG outputs, stale panels.

def _png(path, size=(96, 128), color=(200, 40, 40)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def _sheet(client):
    return client.predict(handle_file(EXAMPLE), 3, 2, 3.5, api_name="/standardize")[0]


def test_every_endpoint_caps_what_one_request_may_cost(client, tmp_path):
    with pytest.raises(Exception, match="steps 900 is out of range: choose 1 to 50"):
        client.predict(handle_file(EXAMPLE), 1, 900, 3.5, api_name="/standardize")
    with pytest.raises(Exception, match="guidance 1000 is out of range: choose 1 to 10"):
        client.predict(handle_file(EXAMPLE), 1, 2, 1000, api_name="/standardize")
    with pytest.raises(Exception, match="colour correction 2 is out of range: choose 0 to 1"):
        client.predict(handle_file(EXAMPLE), 1, 2, 3.5, 2, api_name="/standardize")
    sheet = _sheet(client)
    with pytest.raises(Exception, match="steps 999 is out of range"):
        client.predict([handle_file(sheet)], "Mia", "[Mia] waving", 1, {"steps": 999}, api_name="/panels")
    script = "\n".join(f"[Mia] waving {i}" for i in range(25))
    with pytest.raises(Exception, match="25 panels in one request; draw at most 24"):
        client.predict([handle_file(sheet)], "Mia", script, 1, {"steps": 1}, api_name="/panels")


def test_uploads_have_a_size_limit_and_a_format_allowlist(client, tmp_path, monkeypatch):
    from studio import service

    big = Image.new("L", (7000, 6000))  # 42 MP: over the limit, refused from the header before decoding
    big.save(tmp_path / "poster.png")
    with pytest.raises(Exception, match=r"page 'poster.png' is 7000x6000, over the 40 MP limit"):
        client.predict([handle_file(str(tmp_path / "poster.png"))], "pdf", "t", api_name="/export")
    monkeypatch.setattr(service, "MAX_UPLOAD_BYTES", 1000)  # the app serves from this process
    noisy = tmp_path / "noisy.png"
    Image.effect_noise((64, 96), 60).convert("RGB").save(noisy)
    with pytest.raises(Exception, match=r"reference 'noisy.png' is 0.0 MB; uploads are limited to 0 MB"):
        client.predict(handle_file(str(noisy)), 1, 2, 3.5, api_name="/standardize")


def test_refusals_name_the_persons_file_not_the_servers_temp_path(client, tmp_path):
    photo = tmp_path / "holiday_photo.png"
    photo.write_text("this is text, not a picture")
    with pytest.raises(Exception) as info:
        client.predict(handle_file(str(photo)), 1, 2, 3.5, api_name="/standardize")
    text = str(info.value)
    assert "'holiday_photo.png' is not a readable image" in text and "/tmp" not in text and "gradio" not in text
    empty = tmp_path / "page.png"
    empty.write_bytes(b"")
    with pytest.raises(Exception, match=r"page 'page.png' is an empty file \(0 bytes\)"):
        client.predict([handle_file(str(empty))], "pdf", "t", api_name="/export")


def test_bad_arguments_get_answers_in_the_studios_words(client, tmp_path):
    panel = _png(tmp_path / "panel.png")
    with pytest.raises(Exception, match="unknown page size 'A0': choose one of A4, US letter, square"):
        client.predict([handle_file(panel)], "", "4-panel grid", "A0", 24, 5, api_name="/page")
    with pytest.raises(Exception, match="border 10000 is out of range: choose 0 to 16"):
        client.predict([handle_file(panel)], "", "4-panel grid", "A4", 24, 10000, api_name="/page")
    with pytest.raises(Exception, match="gutter 100000 is out of range: choose 0 to 80"):
        client.predict([handle_file(panel)], "", "4-panel grid", "A4", 100000, 5, api_name="/page")
    sheet = _sheet(client)
    with pytest.raises(Exception, match="options should be an object"):
        client.predict([handle_file(sheet)], "Mia", "[Mia] waving", 1, [1, 2], api_name="/panels")
    with pytest.raises(Exception, match="unknown option 'stpes'"):
        client.predict([handle_file(sheet)], "Mia", "[Mia] waving", 1, {"stpes": 2}, api_name="/panels")
    with pytest.raises(Exception, match="format 'gif': choose one of pdf, cbz, png, archive"):
        client.predict([handle_file(panel)], "gif", "t", api_name="/export")


def test_unexpected_failures_and_out_of_memory_get_a_message_and_keep_the_story(app, tiny_full_engine, monkeypatch,
                                                                                caplog):
    alice = Client(app.local_url, verbose=False)
    alice.predict("Mia", handle_file(EXAMPLE), 5, 2, 3.5, 0.5, api_name="/ui_standardize")
    alice.predict("Mia", api_name="/ui_accept")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    def no_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tiny_full_engine, "generate_panels", broken)
    with caplog.at_level("INFO", logger="serialgen.studio"):
        with pytest.raises(Exception, match=r"Something went wrong inside the studio \(RuntimeError\)\. Your story "
                                            "is kept"):
            alice.predict("[Mia] waving", "none", "", 1, 2, 1.0, api_name="/ui_draw")
        monkeypatch.setattr(tiny_full_engine, "generate_panels", no_memory)
        with pytest.raises(Exception, match="The GPU ran out of memory. Your story is kept. Try fewer steps"):
            alice.predict("[Mia] waving", "none", "", 1, 2, 1.0, api_name="/ui_draw")
        with pytest.raises(Exception, match="Give the character a name"):
            alice.predict("", api_name="/ui_accept")
    # a fault is logged with its traceback; a person's mistake as one line
    fault = [r for r in caplog.records if "ui_draw" in r.getMessage() or "draw failed" in r.getMessage()]
    assert any(r.exc_info for r in fault)
    mistake = [r for r in caplog.records if "refused" in r.getMessage()]
    assert mistake and all(r.exc_info is None for r in mistake) and "\n" not in mistake[-1].getMessage()
    monkeypatch.undo()
    assert alice.predict("Mia", api_name="/ui_accept")[0]["data"] == [["Mia", "accepted", 5]]  # the story is intact
    *_, status = alice.predict("[Mia] waving", "none", "", 1, 2, 1.0, api_name="/ui_draw")
    assert "1 of 1 panels drawn" in status


def test_api_outputs_are_named_pngs_and_export_matches_the_ui(client, tmp_path):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [r["label"] for r in api["/standardize"]["returns"]] == ["sheet", "review", "target_pose", "info"]
    assert [r["label"] for r in api["/panels"]["returns"]] == ["panels", "info"]
    assert [p["label"] for p in api["/export"]["parameters"]] == ["pages", "format", "title"]
    sheet, review, target, info = client.predict(handle_file(EXAMPLE), -1, 2, 3.5, api_name="/standardize")
    assert Image.open(sheet).format == "PNG" and info["seed"] >= 0  # -1: a random seed, as in the UI
    gallery, info = client.predict([handle_file(sheet)], "Mia", "[Mia] waving", -1, {"steps": 1}, api_name="/panels")
    assert Image.open(gallery[0]["image"]).format == "PNG" and info["panels"][0]["seed"] >= 0
    page = client.predict([handle_file(gallery[0]["image"])], "", "4-panel grid", "A4", 24, 5, api_name="/page")
    page_file = handle_file(page[0]["image"])
    assert Image.open(page[0]["image"]).format == "PNG"
    pngs = client.predict([page_file], "png", "Rain", api_name="/export")
    assert zipfile.ZipFile(pngs).namelist() == ["page-001.png"]
    from studio.story import load_archive

    project = load_archive(Path(client.predict([page_file], "archive", "Rain", api_name="/export")).read_bytes())
    assert project.title == "Rain" and len(project.panels) == 1 and project.panels[0].image.size == (1240, 1754)


def test_archives_are_held_to_the_studios_own_rules(app, tmp_path):
    from studio.story import Character, Story, save_archive

    bob = Client(app.local_url, verbose=False)
    face = Image.open(EXAMPLE).convert("RGB")
    evil = tmp_path / "evil.zip"
    evil.write_bytes(save_archive(Story(characters={"[Evil]": Character("[Evil]", face)})))
    with pytest.raises(Exception, match=r"Cannot open 'evil.zip'.*name is refused.*'\[Evil\]' is not a usable name"):
        bob.predict(handle_file(str(evil)), api_name="/ui_load")
    long_script = tmp_path / "long.zip"
    long_script.write_bytes(save_archive(Story(script="\n".join(f"[NC] street {i}" for i in range(500)))))
    with pytest.raises(Exception, match=r"(?s)the project.s script is refused.*too many panels: at most 200"):
        bob.predict(handle_file(str(long_script)), api_name="/ui_load")
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested, "w") as z:
        z.writestr("story.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(Exception, match="nested too deeply"):
        bob.predict(handle_file(str(nested)), api_name="/ui_load")
    with pytest.raises(Exception, match="There are no panels yet: write the script and press Check script first"):
        bob.predict(1, "", False, 2, 1.0, api_name="/ui_redraw")


def test_a_new_accepted_sheet_makes_its_panels_stale_and_draw_redraws_them(app):
    alice = Client(app.local_url, verbose=False)
    script = "[Mia] waving\n[NC] a street"
    alice.predict("Mia", handle_file(EXAMPLE), 5, 2, 3.5, 0.5, api_name="/ui_standardize")
    alice.predict("Mia", api_name="/ui_accept")
    *_, status = alice.predict(script, "none", "", 1, 2, 1.0, api_name="/ui_draw")
    assert "2 of 2 panels drawn" in status
    *_, status = alice.predict(script, "none", "", 1, 2, 1.0, api_name="/ui_draw")
    assert "All panels are drawn" in status
    out = alice.predict("Mia", handle_file(EXAMPLE), 6, 2, 3.5, 0.5, api_name="/ui_standardize")
    assert "seed 6" in out[-1]
    assert len(out) == 5  # reference, review, sheet, table, status: the seed box is not written (-1 stays random)
    _, status = alice.predict("Mia", api_name="/ui_accept")
    assert "1 panel drawn from Mia's earlier sheet will be redrawn" in status
    _, gallery, _ = alice.predict(script, "none", "", api_name="/ui_check")
    assert "drawn from an older sheet" in gallery[0]["caption"] and "older" not in gallery[1]["caption"]
    *_, status = alice.predict(script, "none", "", 1, 2, 1.0, api_name="/ui_draw")
    assert "1 of 1 panels drawn" in status  # only Mia's panel
    *_, status = alice.predict(script, "none", "", 1, 2, 1.0, api_name="/ui_draw")
    assert "All panels are drawn" in status


def test_cancel_stops_a_running_draw(app):
    import time

    alice = Client(app.local_url, verbose=False)
    script = "\n".join(f"[NC] a street {i}" for i in range(24))
    job = alice.submit(script, "none", "", 1, 50, 1.0, api_name="/ui_draw")
    deadline = time.time() + 60
    while not job.status().progress_data and time.time() < deadline:
        time.sleep(0.05)  # until sampling has started
    alice.predict(api_name="/ui_cancel_draw")
    try:
        job.result(timeout=60)
    except Exception:  # noqa: BLE001 - a cancelled job may end with a cancellation
        pass
    # the run stopped part-way (24 panels of 50 steps take far longer), the session keeps what was drawn
    archive = alice.predict("project archive", api_name="/ui_export")
    drawn = [p for p in json.loads(zipfile.ZipFile(archive).read("story.json"))["panels"] if "image" in p["files"]]
    assert len(drawn) < 24 and len(drawn) % 4 == 0
    table, gallery, status = alice.predict(script, "none", "", api_name="/ui_check")
    assert len(gallery) == 24


def test_examples_show_whole_names(app):
    datasets = [b for b in app.blocks.values() if type(b).__name__ == "Dataset"]
    labels = [d.sample_labels for d in datasets if getattr(d, "sample_labels", None)]
    assert labels and labels[0][:3] == ["Kai", "Leo", "Mia"]


def test_app_prints_where_it_runs_not_gradios_share_hint(monkeypatch, capsys):
    import app as studio_app
    import engine
    import studio

    launched = {}

    class FakeDemo:
        local_url, share_url = "http://127.0.0.1:7861/", None

        def launch(self, **kwargs):
            launched.update(kwargs)

        def block_thread(self):
            pass

    def no_engine(*args, **kwargs):
        raise ValueError("no weights here")

    monkeypatch.setattr(engine, "load_engine", no_engine)
    monkeypatch.setattr(studio, "build_demo", lambda engine, status: FakeDemo())
    studio_app.main(["--port", "7861"])
    out = capsys.readouterr().out
    assert launched["quiet"] is True and launched["max_file_size"] == studio.LAUNCH_OPTIONS["max_file_size"]
    assert "SerialGen Studio is running at http://127.0.0.1:7861/" in out and "share=True" not in out
