import pytest
from components import make_sheet

from engine import load_engine
from studio import build_demo


@pytest.fixture(scope="module")
def served(tiny_overrides):
    engine = load_engine("demo", overrides=tiny_overrides, device="cpu", stages=("personalize",))
    engine.preset.defaults.update({"height": 64, "width": 64, "num_inference_steps": 2})
    demo = build_demo(engine)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield demo
    demo.close()


def test_panels_endpoint_through_gradio_client(served, tmp_path):
    from gradio_client import Client, handle_file

    sheet = tmp_path / "sheet.png"
    make_sheet().save(sheet)
    client = Client(served.local_url, verbose=False)
    gallery, info = client.predict(handle_file(str(sheet)), "running\nwaving", 5, 2, 1.0, api_name="/panels")
    assert len(gallery) == 2 and info == {"prompts": ["running", "waving"], "seeds": [5, 6]}
    with pytest.raises(Exception, match="at least one panel prompt"):
        client.predict(handle_file(str(sheet)), "   ", 5, 2, 1.0, api_name="/panels")


def test_page_without_models_says_why():
    demo = build_demo(None, "component 'sdxl' could not be loaded")
    text = str(demo.config)
    assert "could not be loaded" in text
