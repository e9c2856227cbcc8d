import json

import numpy as np
import pytest
import torch
from components import tiny_stage1_components
from test_detectors import constant_model, simcc_for, yolox_output

from engine import EngineLoadError, Preset, StandardizePipeline, load_engine
from engine.__main__ import main as cli_main
from engine.presets import ComponentSource
from trainer.synthetic import render_sample

SIZE = {"height": 96, "width": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def saved_standardize(tmp_path_factory):
    root = tmp_path_factory.mktemp("std")
    StandardizePipeline(**tiny_stage1_components()).save_pretrained(root / "standardize")
    return root / "standardize"


def test_demo_layout_standardize_folder_loads_and_runs(saved_standardize):
    engine = load_engine("demo", overrides={"standardize": str(saved_standardize)}, device="cpu",
                         stages=("standardize",))
    assert engine.personalize is None and isinstance(engine.standardize, StandardizePipeline)
    report = {c.name: c for c in engine.components}
    assert "FBDM/RPIM" in report["standardize"].kind
    assert report["pose_detector"].location.endswith("detectors/pose.onnx")  # the shipped demo detector
    engine.preset.standardize_defaults.update(SIZE)
    out = engine.standardize_reference(render_sample(3, 1, (128, 192)).image, seed=2)
    assert out.sheet.size == (64, 96) and out.seed == 2
    with pytest.raises(ValueError, match="without Stage II"):
        engine.generate_panels(["x"])


def _tiny_dwpose(folder):
    folder.mkdir(parents=True, exist_ok=True)
    r = 640 / 192
    constant_model(folder / "yolox_l.onnx", "images", [1, 3, 640, 640],
                   {"output": yolox_output([(64 * r, 96 * r, 40 * r, 150 * r)])})
    points = np.stack([np.linspace(100, 190, 17), np.linspace(60, 330, 17)], 1)
    sx, sy = simcc_for(points)
    constant_model(folder / "dw-ll_ucoco_384.onnx", "input", [1, 3, 384, 288], {"simcc_x": sx, "simcc_y": sy})
    return folder


def test_full_layout_from_parts_with_animate_anyone_files_and_detectors(tmp_path):
    """The full preset's code path, offline: UNet config + Moore .pth files + VAE + CLIP + FBDM/RPIM + DWPose."""
    c = tiny_stage1_components(seed=4)
    c["reference_unet"].save_config(tmp_path / "unet")
    torch.save(c["reference_unet"].state_dict(), tmp_path / "reference_unet.pth")
    torch.save({f"module.{k}": v for k, v in c["denoising_unet"].state_dict().items()}, tmp_path / "denoising_unet.pth")
    c["vae"].save_pretrained(tmp_path / "vae")
    c["image_encoder"].save_pretrained(tmp_path / "image_encoder")
    c["reference_conditioner"].save_pretrained(tmp_path / "modules")
    pose_guider_state = c["pose_guider"].state_dict()
    # the loader builds the pose guider with SD's channel layout from the UNet config (32 here) and (16,32,96,256)
    from engine.models import PoseGuider

    pg = PoseGuider(conditioning_embedding_channels=32)
    torch.save(pg.state_dict(), tmp_path / "pose_guider.pth")
    assert set(pose_guider_state) == set(pg.state_dict())
    dwpose = _tiny_dwpose(tmp_path / "dwpose")
    preset = Preset(
        name="local-full", description="full layout from local parts", requires_gpu=False, dtype="float32",
        components={
            "stage1_unet_config": ComponentSource(str(tmp_path / "unet"), filename="config.json"),
            "stage1_vae": ComponentSource(str(tmp_path / "vae")),
            "stage1_image_encoder": ComponentSource(str(tmp_path / "image_encoder")),
            "animate_anyone": ComponentSource(str(tmp_path)),
            "stage1_modules": ComponentSource(str(tmp_path / "modules")),
            "pose_detector": ComponentSource(str(dwpose)),
        },
        standardize_defaults=SIZE,
        stage1_scheduler={"beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                          "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    )
    engine = load_engine(preset, device="cpu", stages=("standardize",))
    report = {x.name: x for x in engine.components}
    assert "reference_unet" in report["animate_anyone"].kind and report["pose_detector"].kind == "DWPoseDetector"
    assert report["stage1_modules"].kind == "FBDM/RPIM"
    assert engine.standardize.scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(engine.standardize.reference_unet.conv_in.weight, c["reference_unet"].conv_in.weight)
    out = engine.standardize_reference(render_sample(3, 1, (128, 192)).image, seed=1)
    assert out.sheet.size == (64, 96) and out.reference_pose_map is not None  # DWPose found the (tiny) person
    # the Animate Anyone weights learned from DWPose's whole-body maps: the standard target has hands and a face
    from engine.preprocess.standard import standard_pose_map

    assert engine.standardize.config.whole_body_pose
    assert np.array_equal(np.asarray(out.target_pose_map), np.asarray(standard_pose_map((64, 96), whole_body=True)))


def test_full_preset_stage1_offline_names_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineLoadError) as info:
        load_engine("full", device="cpu", stages=("standardize",))
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in str(info.value) and "hf download" in str(info.value)


def test_unknown_stage():
    with pytest.raises(ValueError, match="choose from"):
        load_engine("demo", stages=("draw",))


def test_cli_standardize(tmp_path, saved_standardize, capsys):
    ref = tmp_path / "ref.png"
    render_sample(3, 1, (128, 192)).image.save(ref)
    out = tmp_path / "sheet.png"
    code = cli_main(["standardize", str(ref), "--out", str(out), "--seed", "5", "--override",
                     f"standardize={saved_standardize}", "--device", "cpu", "--width", "64", "--height", "96",
                     "--steps", "2", "--intermediates", str(tmp_path / "inter")])
    assert code == 0, capsys.readouterr().err
    from PIL import Image

    assert Image.open(out).size == (64, 96)
    assert {p.name for p in (tmp_path / "inter").iterdir()} >= {"canvas.png", "target_pose_map.png"}
    assert "seed=5" in capsys.readouterr().out
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (20, 20)).save(tiny)
    code = cli_main(["standardize", str(tiny), "--out", str(out), "--override", f"standardize={saved_standardize}",
                     "--device", "cpu"])
    assert code == 2 and "too small" in capsys.readouterr().err
    json.dumps({"ok": True})
