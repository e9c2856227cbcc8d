"""The one-call GPU script (trainer/gpu_run.py), rehearsed on the CPU: it trains every stage from the shipped demo
models, packages, measures and packs at most 8 files of at most 15 MiB; unpacking gives a demo folder the engine runs."""

import io
import json
import tarfile

import numpy as np
import pytest

from trainer import gpu_run


def test_pack_and_unpack_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_run, "PART_BYTES", 4096)
    demo = tmp_path / "demo"
    (demo / "standardize").mkdir(parents=True)
    payload = np.random.default_rng(0).bytes(10_000)
    (demo / "standardize" / "weights.bin").write_bytes(payload)
    (demo / "README.md").write_text("card")
    files = gpu_run.pack(demo, tmp_path / "out", {"README.md": b"card"})
    assert len([f for f in files if ".part" in f.name]) >= 3 and all(f.stat().st_size <= 4096 for f in files)
    names = gpu_run.unpack(tmp_path / "out", tmp_path / "unpacked")
    assert sorted(names) == ["README.md", "standardize/weights.bin"]
    assert (tmp_path / "unpacked" / "standardize" / "weights.bin").read_bytes() == payload
    with pytest.raises(ValueError, match="more than the 8 files"):
        gpu_run.pack(demo, tmp_path / "many", {f"f{i}": b"" for i in range(5)})


def test_unpack_refuses_paths_outside_the_demo_folder(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"{gpu_run.PACK_NAME}.part00").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="refusing"):
        gpu_run.unpack(tmp_path / "in", tmp_path / "target")
    assert not (tmp_path / "evil.txt").exists()
    assert gpu_run.main(["unpack", str(tmp_path / "empty")]) == 2


def test_dry_run_trains_packages_and_the_engine_runs_what_comes_back(tmp_path):
    from engine import load_engine
    from trainer.make_demo import packaged_overrides
    from trainer.synthetic import render_sample

    files = gpu_run.train(tmp_path / "out", dry_run=True)
    assert len(files) <= 8 and all(f.stat().st_size <= 15 * 2**20 for f in files)
    report = json.loads((tmp_path / "out" / "gpu_run.json").read_text())
    assert report["dry_run"] and {"clip", "base", "standardize", "pairs", "personalizer"} <= set(report["timings"])
    card = (tmp_path / "out" / "README.md").read_text()
    # measured at the dry run's 2 sampling steps (make_demo --eval-steps), and the card says so
    assert "Stage I on 8 held-out test characters (128x192, 2 DDIM steps)" in card
    assert "One panel at 128x192, 2 DDIM steps with CFG" in card
    gpu_run.unpack(tmp_path / "out", tmp_path / "demo")
    engine = load_engine("demo", device="cpu", overrides=packaged_overrides(tmp_path / "demo"))
    sheet = engine.standardize_reference(render_sample(3, 1, (128, 192)).image, num_inference_steps=2, seed=0).sheet
    panels = engine.generate_panels(["running on a beach"], sheet=sheet, seeds=0, num_inference_steps=2)
    assert sheet.size == (128, 192) and np.asarray(panels.images[0]).std() > 0


def test_bench_dry_run_runs_the_benchmark_code_paths(tmp_path):
    text = gpu_run.bench(tmp_path, dry_run=True).read_text()
    assert text.count("(exit 0)") == len(gpu_run.DRY_BENCH_COMMANDS)
