"""The README's gradio_client example runs (against a locally launched studio with tiny models)."""

import os
import re
from pathlib import Path

import pytest

from studio import build_demo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def app(tiny_full_engine):
    demo = build_demo(tiny_full_engine)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield demo
    demo.close()


def test_readme_gradio_client_example_runs(app, capsys, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- gradio-client-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert "Client(\"http://127.0.0.1:7860/\")" in block
    code = block.replace("http://127.0.0.1:7860/", app.local_url).replace('{"steps": 20}', '{"steps": 2}')
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README example", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]  # Client() prints "Loaded as API: ..." first
    assert printed.endswith(".pdf") and open(printed, "rb").read(4) == b"%PDF"


def test_readme_quick_start_matches_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme  # .ci/run runs exactly the README's test command
    assert readme.startswith("---\ntitle: SerialGen Studio") and "sdk: gradio" in readme
    assert os.path.exists(ROOT / "assets" / "fonts" / "ComicNeue-LICENSE.txt")
