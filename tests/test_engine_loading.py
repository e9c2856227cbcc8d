import json

import numpy as np
import pytest
import torch
from components import make_sheet

from engine import EngineLoadError, Preset, get_preset, load_engine
from engine.__main__ import main as cli_main
from engine.presets import DEMO, FULL


def test_presets_name_every_component_and_the_full_fallback_adapter():
    for preset in (FULL, DEMO):
        assert {"sdxl", "image_encoder", "adapter", "pose_detector", "mask_detector"} <= set(preset.components)
    assert {"stage1_unet_config", "stage1_vae", "stage1_image_encoder", "animate_anyone"} <= set(FULL.components)
    assert "standardize" in DEMO.components
    assert FULL.components["sdxl"].source == "stabilityai/stable-diffusion-xl-base-1.0"
    assert FULL.components["adapter"].filename == "ip-adapter-plus_sdxl_vit-h.safetensors"
    assert FULL.requires_gpu and not DEMO.requires_gpu
    assert FULL.defaults["num_inference_steps"] == 20 and (FULL.defaults["width"], FULL.defaults["height"]) == (512, 768)


def test_unknown_preset_and_component_are_named():
    with pytest.raises(ValueError, match="unknown preset 'large'.*'demo'.*'full'"):
        get_preset("large")
    with pytest.raises(ValueError, match="unknown component 'vae'"):
        load_engine("demo", overrides={"vae": "/tmp"})


def test_demo_preset_without_models_says_what_is_missing(monkeypatch, tmp_path):
    empty = DEMO.with_overrides({"sdxl": str(tmp_path / "none")})
    with pytest.raises(EngineLoadError) as info:
        load_engine(empty)
    text = str(info.value)
    assert "component 'sdxl'" in text and str(tmp_path / "none") in text and "--override sdxl=" in text


def test_demo_preset_message_points_at_the_trainer(tmp_path):
    import dataclasses

    missing = dataclasses.replace(DEMO, components={  # the shipped layout, moved somewhere empty
        name: dataclasses.replace(spec, source=str(tmp_path / "none")) for name, spec in DEMO.components.items()})
    with pytest.raises(EngineLoadError, match="trainer.make_demo"):
        load_engine(missing)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_full_preset_without_gpu_says_so():
    with pytest.raises(EngineLoadError, match="needs a GPU.*--preset demo"):
        load_engine("full")


def test_full_preset_offline_names_the_hub_repo_and_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineLoadError) as info:
        load_engine("full", device="cpu", stages=("personalize",))
    text = str(info.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in text and "HF_HUB_OFFLINE=1" in text
    assert "hf download" in text and "--override sdxl=" in text


def test_engine_from_local_overrides_reports_sources_and_generates(tiny_overrides):
    engine = load_engine("demo", overrides=tiny_overrides, device="cpu", stages=("personalize",))
    report = {c.name: c for c in engine.components}
    assert set(report) == {"sdxl", "image_encoder", "adapter"}
    assert report["sdxl"].location == tiny_overrides["sdxl"]
    assert report["adapter"].location.endswith("ip-adapter.safetensors")
    assert "IPAdapterFullImageProjection" in report["adapter"].kind
    assert type(engine.personalize.scheduler).__name__ == "DDIMScheduler"
    assert "preset demo on cpu" in engine.describe()
    out = engine.generate_panels(["a", "b"], sheet=make_sheet(), seeds=[1, 2], height=64, width=64,
                                 num_inference_steps=2, output_type="np")
    assert out.images.shape == (2, 64, 64, 3)


def test_adapter_override_by_folder_finds_the_weight_file(tiny_engine_dir, tiny_overrides):
    overrides = {**tiny_overrides, "adapter": str(tiny_engine_dir / "adapter")}
    engine = load_engine("demo", overrides=overrides, device="cpu", stages=("personalize",))
    assert engine.personalize.has_adapter


def test_preset_json_round_trip(tmp_path, tiny_overrides):
    preset = DEMO.with_overrides(tiny_overrides)
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(preset.to_dict()))
    assert get_preset(str(path)) == preset
    assert isinstance(get_preset(preset), Preset)


def _cli_args(tiny_overrides):
    args = []
    for name, path in tiny_overrides.items():
        args += ["--override", f"{name}={path}"]
    return args + ["--device", "cpu", "--width", "64", "--height", "64", "--steps", "2"]


def test_cli_panels_writes_images_and_manifest(tmp_path, tiny_overrides, capsys):
    sheet = tmp_path / "sheet.png"
    make_sheet().save(sheet)
    out = tmp_path / "out"
    code = cli_main(["panels", "--sheet", str(sheet), "--prompt", "running", "--prompt", "waving",
                     "--seed", "7", "--out", str(out), *_cli_args(tiny_overrides)])
    assert code == 0
    manifest = json.loads((out / "panels.json").read_text())
    assert [p["seed"] for p in manifest["panels"]] == [7, 8]
    assert [p["prompt"] for p in manifest["panels"]] == ["running", "waving"]
    from PIL import Image

    first = np.asarray(Image.open(out / "panel_000.png"))
    assert first.shape == (64, 64, 3) and first.std() > 0
    assert "2 panels in" in capsys.readouterr().out
    # same seed -> same file content; alone instead of in a batch of two, the same picture up to 8-bit rounding
    # (the CPU's kernels may sum in another order for another batch size)
    out2 = tmp_path / "out2"
    cli_main(["panels", "--sheet", str(sheet), "--prompt", "running", "--prompt", "waving", "--seed", "7",
              "--out", str(out2), *_cli_args(tiny_overrides)])
    np.testing.assert_array_equal(np.asarray(Image.open(out2 / "panel_000.png")), first)
    out3 = tmp_path / "out3"
    cli_main(["panels", "--sheet", str(sheet), "--prompt", "running", "--seed", "7", "--out", str(out3),
              *_cli_args(tiny_overrides)])
    alone = np.asarray(Image.open(out3 / "panel_000.png")).astype(int)
    assert np.abs(alone - first).max() <= 1


@pytest.mark.parametrize("flag, key, value, message", [
    ("--image-guidance", "image_guidance_scale", 9.0, "image_guidance_scale=-1.0 must be None or a number >= 0"),
    ("--reference-scale", "reference_scale", 20.0, "reference_scale=-1.0 must be a number >= 0"),
    ("--guidance-rescale", "guidance_rescale", 1.0, "guidance_rescale=-1.0 must be a number between 0 and 1"),
])
def test_cli_panel_options_reach_the_panels(tmp_path, tiny_overrides, capsys, flag, key, value, message):
    from PIL import Image

    sheet = tmp_path / "sheet.png"
    make_sheet().save(sheet)
    drawn = {}
    for name, extra in (("plain", []), ("option", [flag, str(value)])):
        code = cli_main(["panels", "--sheet", str(sheet), "--prompt", "running", "--seed", "7", "--out",
                         str(tmp_path / name), *_cli_args(tiny_overrides), *extra])
        assert code == 0
        drawn[name] = np.asarray(Image.open(tmp_path / name / "panel_000.png")).astype(int)
    manifest = json.loads((tmp_path / "option" / "panels.json").read_text())
    assert manifest["options"][key] == value
    assert np.abs(drawn["option"] - drawn["plain"]).max() > 2
    code = cli_main(["panels", "--sheet", str(sheet), "--prompt", "x", "--out", str(tmp_path / "bad"),
                     *_cli_args(tiny_overrides), flag, "-1"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_named_sheets_draw_group_panels_from_script_tags(tmp_path, tiny_overrides, capsys):
    from PIL import Image

    mia, kai = tmp_path / "mia.png", tmp_path / "kai.png"
    make_sheet((200, 40, 40)).save(mia)
    make_sheet((40, 40, 200), seed=1).save(kai)
    out = tmp_path / "out"
    code = cli_main(["panels", "--sheet", f"Mia={mia}", "--sheet", f"Kai={kai}", "--prompt",
                     '[Mia][Kai] talking on a bench Mia: "Hi!"', "--prompt", "[Kai] waving", "--prompt", "[NC] a street",
                     "--seed", "7", "--out", str(out), *_cli_args(tiny_overrides)])
    assert code == 0
    manifest = json.loads((out / "panels.json").read_text())
    assert [p["characters"] for p in manifest["panels"]] == [["Mia", "Kai"], ["Kai"], []]
    assert [p["prompt"] for p in manifest["panels"]] == ["two people, talking on a bench", "waving", "a street"]
    group = np.asarray(Image.open(out / "panel_000.png"))
    # the same panel with the characters swapped is another picture: each sheet acts in its own region
    cli_main(["panels", "--sheet", f"Mia={mia}", "--sheet", f"Kai={kai}", "--prompt", "[Kai][Mia] talking on a bench",
              "--seed", "7", "--out", str(tmp_path / "swapped"), *_cli_args(tiny_overrides)])
    swapped = np.asarray(Image.open(tmp_path / "swapped" / "panel_000.png"))
    assert np.abs(group.astype(int) - swapped).max() > 0
    for sheets, prompt, message in (
        ([f"Mia={mia}", str(kai)], "[Mia] x", "give every --sheet a name"),
        ([str(mia), str(kai)], "x", "2 unnamed --sheet files"),
        ([f"Mia={mia}"], "[Kai] x", '--prompt 1: line 1, column 2: unknown character "Kai"'),
        ([f"Mia={mia}"], "waving", "--prompt 1: line 1, column 1: expected a [Character] tag"),
    ):
        args = [x for s in sheets for x in ("--sheet", s)]
        code = cli_main(["panels", *args, "--prompt", prompt, "--out", str(tmp_path / "bad"), *_cli_args(tiny_overrides)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err


def test_cli_errors_are_one_clear_line(tmp_path, tiny_overrides, capsys):
    code = cli_main(["panels", "--sheet", str(tmp_path / "missing.png"), "--prompt", "x", "--out", str(tmp_path),
                     *_cli_args(tiny_overrides)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --sheet: file") and "Traceback" not in err
    code = cli_main(["panels", "--prompt", "x", "--out", str(tmp_path), "--preset", "nope"])
    assert code == 2 and "unknown preset 'nope'" in capsys.readouterr().err
    code = cli_main(["panels", "--prompt", "x", "--out", str(tmp_path), *_cli_args(tiny_overrides)[:-6],
                     "--width", "63", "--height", "64", "--steps", "2"])
    assert code == 2 and "width=63" in capsys.readouterr().err


def test_an_engine_tuning_its_preset_leaves_the_module_presets_alone():
    before, before_std = dict(DEMO.defaults), dict(DEMO.standardize_defaults)
    copy = DEMO.with_overrides({})
    copy.defaults.update(height=8)
    copy.standardize_defaults.update(width=8)
    assert DEMO.defaults == before and DEMO.standardize_defaults == before_std


def test_info_lists_every_component_without_loading_and_names_all_missing(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    aa = tmp_path / "aa"
    aa.mkdir()
    assert cli_main(["info", "--preset", "full", "--override", f"animate_anyone={aa}"]) == 2
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert set(rows) == {"sdxl", "image_encoder", "adapter", "stage1_unet_config", "stage1_vae",
                         "stage1_image_encoder", "animate_anyone", "pose_detector", "mask_detector"}
    assert rows["animate_anyone"] == "ok" and sum(v == "MISSING" for v in rows.values()) == 8
    assert err.count("could not be loaded") == 8 and "hf download stabilityai/stable-diffusion-xl-base-1.0" in err
    assert cli_main(["info", "--preset", "demo"]) == 0  # the shipped demo models are all there


@pytest.mark.parametrize("policy, device, bf16, stage, expected", [
    ("auto", "cpu", False, "personalize", torch.float32),
    ("auto", "cpu", False, "standardize", torch.float32),
    ("auto", "cuda", True, "standardize", torch.float16),  # Animate Anyone's weights run in fp16
    ("auto", "cuda", True, "personalize", torch.bfloat16),
    ("auto", "cuda", False, "personalize", torch.float16),  # no bf16 on this GPU: fp16 (VAE decodes in fp32)
    ("bfloat16", "cuda", False, "standardize", torch.float16),
    ("bfloat16", "cuda", True, "standardize", torch.bfloat16),  # asked for and available
    ("float32", "cuda", True, "personalize", torch.float32),
])
def test_each_stage_runs_in_the_dtype_of_its_weights(policy, device, bf16, stage, expected):
    from engine.devices import resolve_dtype

    assert resolve_dtype(policy, torch.device(device), stage, bf16_supported=bf16) == expected


def _fp16_sdxl_watching(method: str):
    """A tiny PersonalizePipeline with an fp16 VAE that overflows (``force_upcast``, as SDXL's), and the list of
    (input dtype, VAE dtype) each call of ``vae.<method>`` sees."""
    from components import tiny_sdxl_components

    from engine.pipelines import PersonalizePipeline

    pipe = PersonalizePipeline(**tiny_sdxl_components(0))
    pipe.vae.register_to_config(force_upcast=True)
    pipe.vae.to(torch.float16)
    seen = []
    call = getattr(pipe.vae, method)
    setattr(pipe.vae, method, lambda x, **kw: (seen.append((x.dtype, pipe.vae.dtype)), call(x, **kw))[1])
    return pipe, seen


def test_fp16_sdxl_decodes_in_float32():
    """SDXL's VAE overflows in fp16 (force_upcast): our __call__ decodes in float32 and leaves the VAE in fp16."""
    pipe, seen = _fp16_sdxl_watching("decode")
    pipe._decode(torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert seen == [(torch.float32, torch.float32)] and pipe.vae.dtype == torch.float16


def test_fp16_sdxl_encodes_a_sheet_for_reference_attention_in_float32():
    from components import make_sheet

    from engine.pipelines import SheetEmbeds

    pipe, seen = _fp16_sdxl_watching("encode")
    empty = torch.zeros(1, 1, 4)
    latents, figure = pipe._sheet_latents(SheetEmbeds(cond=empty, uncond=empty, key="k", image=make_sheet()), 64, 64)
    assert seen == [(torch.float32, torch.float32)] and pipe.vae.dtype == torch.float16
    assert latents.shape[-2:] == figure.shape[-2:] == (32, 32) and torch.isfinite(latents).all()


@pytest.mark.parametrize("dtype, variant", [(torch.float16, "fp16"), (torch.bfloat16, "fp16"), (torch.float32, None)])
def test_full_fetches_sdxls_fp16_weights_in_half_precision(monkeypatch, dtype, variant):
    from engine.loading import load_personalize
    from engine.pipelines import PersonalizePipeline

    asked = {}

    def fake(source, **kwargs):
        asked.update(kwargs, source=source)
        raise OSError("stop here")

    monkeypatch.setattr(PersonalizePipeline, "from_pretrained", fake)
    with pytest.raises(EngineLoadError, match="sdxl"):
        load_personalize(FULL, torch.device("cpu"), dtype)
    assert asked["source"] == "stabilityai/stable-diffusion-xl-base-1.0" and asked.get("variant") == variant
