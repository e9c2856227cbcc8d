import os

# Nothing in a test may reach a hub: fail fast instead of ~25 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_engine_dir(tmp_path_factory):
    """A tiny SDXL + image encoder + adapter saved in the layouts the demo preset uses (sdxl/, image_encoder/, adapter/)."""
    from components import tiny_sdxl_components

    from engine.models import IPAdapterModules
    from engine.pipelines import PersonalizePipeline

    root = tmp_path_factory.mktemp("tiny_engine")
    components = tiny_sdxl_components()
    image_encoder = components.pop("image_encoder")
    components.pop("feature_extractor")
    pipe = PersonalizePipeline(**components)
    pipe.save_pretrained(root / "sdxl")
    image_encoder.save_pretrained(root / "image_encoder")
    adapter = IPAdapterModules.install(pipe.unet, image_embed_dim=image_encoder.config.hidden_size, seed=3)
    adapter.save_pretrained(root / "adapter")
    return root


@pytest.fixture(scope="session")
def tiny_overrides(tiny_engine_dir):
    return {
        "sdxl": str(tiny_engine_dir / "sdxl"),
        "image_encoder": str(tiny_engine_dir / "image_encoder"),
        "adapter": str(tiny_engine_dir / "adapter" / "ip-adapter.safetensors"),
    }


@pytest.fixture(scope="session")
def tiny_std_dir(tmp_path_factory):
    """A tiny saved StandardizePipeline (the demo preset's `standardize` layout)."""
    from components import tiny_stage1_components

    from engine.pipelines import StandardizePipeline

    root = tmp_path_factory.mktemp("tiny_std")
    StandardizePipeline(**tiny_stage1_components()).save_pretrained(root / "standardize")
    return root / "standardize"


@pytest.fixture(scope="session")
def tiny_full_engine(tiny_overrides, tiny_std_dir):
    """Both stages with tiny models and small defaults (64x96, 2 steps)."""
    from engine import load_engine

    engine = load_engine("demo", overrides={**tiny_overrides, "standardize": str(tiny_std_dir)}, device="cpu")
    engine.preset.defaults.update({"height": 96, "width": 64, "num_inference_steps": 2})
    engine.preset.standardize_defaults.update({"height": 96, "width": 64, "num_inference_steps": 2})
    return engine
