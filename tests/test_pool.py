"""The sample pool (trainer/pool.py): pay once per sample, reuse over epochs, refresh, resume; and the base trainer on
it, whose pooled latents are the VAE's own latent distribution."""

import itertools
from types import SimpleNamespace

import pytest
import torch

from test_trainers import save_tiny_base, spy_pixel_weights, write_config
from trainer.pool import SamplePool


def numbered_batches(counter, size=3):
    while True:
        ids = [next(counter) for _ in range(size)]
        yield {"x": torch.tensor(ids, dtype=torch.float32)[:, None], "caption": [f"c{i}" for i in ids]}


def test_pool_encodes_each_sample_once_draws_at_random_refreshes_and_resumes(tmp_path):
    calls = []

    def encode(batch):
        calls.append(len(batch["x"]))
        return {"value": batch["x"] * 2}

    pool = SamplePool(tmp_path, numbered_batches(itertools.count()), encode, size=8, shard_size=4, batch_size=5,
                      refresh_steps=3, strings=("caption",), seed=0)
    # batches of 3 fill shards of 4: the sample a shard leaves over starts the next one (9 encoded, 1 spare)
    assert len(pool) == 8 and pool.encoded == 9 and len(list(tmp_path.glob("shard-*.safetensors"))) == 2
    encoded_at_start = sum(calls)
    seen = set()
    for _ in range(3):  # drawn from the pool: nothing more is encoded
        batch = next(pool)
        assert batch["value"].shape == (5, 1) and batch["value"].dtype == torch.float32
        # each drawn sample's tensors and strings belong together
        assert [2 * int(c[1:]) for c in batch["caption"]] == batch["value"][:, 0].int().tolist()
        seen |= set(batch["caption"])
    assert sum(calls) == encoded_at_start and seen <= {f"c{i}" for i in range(8)}
    first = sorted(tmp_path.glob("shard-*.safetensors"))
    next(pool)  # the 4th draw refreshes: the oldest shard is replaced by freshly encoded samples
    now = sorted(tmp_path.glob("shard-*.safetensors"))
    assert len(now) == 2 and first[0] not in now and first[1] in now and pool.encoded == 12
    assert set(pool.string_values["caption"]).isdisjoint({"c0", "c1", "c2", "c3"})
    values = pool.tensors["value"].clone()

    resumed = SamplePool(tmp_path, numbered_batches(itertools.count(1000)), encode, size=8, shard_size=4,
                         batch_size=5, strings=("caption",), seed=1)
    assert resumed.encoded == 0 and torch.equal(resumed.tensors["value"], values)
    assert resumed.string_values == pool.string_values
    with pytest.raises(ValueError, match="at least one shard"):
        SamplePool(tmp_path / "x", numbered_batches(itertools.count()), encode, size=2, shard_size=4, batch_size=1)


@pytest.mark.filterwarnings("ignore")
def test_base_trains_from_the_pool_with_the_vaes_latent_distribution(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from trainer import train_text_to_image
    from trainer.common import synthetic_batches
    from trainer.synthetic.figure import LABELS

    weights = spy_pixel_weights(monkeypatch, train_text_to_image)

    base = save_tiny_base(tmp_path / "tiny") / "sdxl"
    config = {"output_dir": str(tmp_path / "run"), "resolution": [64, 64], "num_characters": 10,
              "train_batch_size": 2, "max_train_steps": 3, "checkpointing_steps": 3, "validation_steps": 100,
              "log_steps": 1, "vae": str(base / "vae"), "text_encoder": str(base / "text_encoder"),
              "text_encoder_2": str(base / "text_encoder_2"), "tokenizer": str(base / "tokenizer"),
              "tokenizer_2": str(base / "tokenizer_2"), "init_unet": str(base / "unet"),
              "pool_size": 4, "pool_shard_size": 4, "figure_loss_weight": 3.0, "lower_loss_weight": 6.0}
    out = train_text_to_image.main(train_text_to_image.parse_args(["--config", write_config(tmp_path / "b.yaml",
                                                                                             config)]))
    assert (out / "unet").is_dir()
    shards = list((tmp_path / "run" / "pool-rank0").glob("shard-*.safetensors"))
    assert len(shards) == 1  # 3 steps of 2 drew 6 samples from a pool of 4, each encoded once
    # the shard holds the stream's first 4 samples as the VAE encodes them: re-render them and compare
    stream = synthetic_batches(SimpleNamespace(process_index=0), {**train_text_to_image.DEFAULTS, **config}, 0)
    batches = [next(stream) for _ in range(2)]
    vae = AutoencoderKL.from_pretrained(base / "vae")
    with torch.no_grad():
        dist = vae.encode(torch.cat([b["image"] for b in batches])).latent_dist
    shard = load_file(str(shards[0]))
    torch.testing.assert_close(shard["latent_mean"].float(), dist.mean, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(shard["latent_std"].float(), dist.std, atol=2e-3, rtol=2e-3)
    # ... and each sample's figure mask as the share of each latent pixel it covers, for figure_loss_weight
    masks = torch.cat([b["mask"] for b in batches])
    torch.testing.assert_close(shard["figure"].float(), torch.nn.functional.avg_pool2d(masks, 2), atol=1e-3, rtol=0)
    assert 0 < float(shard["figure"].float().mean()) < 1
    # ... and its lower body's (lower_loss_weight): each step's loss weighted 1 + 3 x figure + 6 x lower body, sample
    # by sample as the pool holds them
    labels = torch.cat([b["labels"] for b in batches])
    lower = torch.nn.functional.avg_pool2d((labels == LABELS["lower"]).float()[:, None], 2)
    torch.testing.assert_close(shard["lower"].float(), lower, atol=1e-3, rtol=0)
    assert float(lower.sum()) > 0
    expected = 1 + 3 * shard["figure"].float() + 6 * shard["lower"].float()
    assert len(weights) == 3
    for w in weights:
        for one in w:
            assert min(float((one - e).abs().max()) for e in expected) < 1e-6
    pool = SamplePool(shards[0].parent, iter(()), None, size=4, shard_size=4, batch_size=1,
                      strings=("caption", "appearance"))  # resumed: nothing to encode
    assert pool.string_values["caption"] == [c for b in batches for c in b["caption"]]


@pytest.mark.filterwarnings("ignore")
def test_base_refuses_a_pool_without_figure_masks_when_the_figure_is_weighted(tmp_path):
    from safetensors.torch import save_file

    from trainer import train_text_to_image

    base = save_tiny_base(tmp_path / "tiny") / "sdxl"
    pool = tmp_path / "run" / "pool-rank0"
    pool.mkdir(parents=True)  # a pool made before figure masks were kept: latents only
    save_file({"latent_mean": torch.zeros(4, 4, 32, 32, dtype=torch.float16),
               "latent_std": torch.ones(4, 4, 32, 32, dtype=torch.float16)}, str(pool / "shard-000000.safetensors"),
              metadata={"strings": '{"caption": ["a", "b", "c", "d"], "appearance": ["", "", "", ""]}'})
    config = {"output_dir": str(tmp_path / "run"), "resolution": [64, 64], "num_characters": 10,
              "train_batch_size": 2, "max_train_steps": 1, "vae": str(base / "vae"),
              "text_encoder": str(base / "text_encoder"), "text_encoder_2": str(base / "text_encoder_2"),
              "tokenizer": str(base / "tokenizer"), "tokenizer_2": str(base / "tokenizer_2"),
              "init_unet": str(base / "unet"), "pool_size": 4, "pool_shard_size": 4, "figure_loss_weight": 3.0}
    with pytest.raises(ValueError, match="without figure masks.*delete its pool-rank"):
        train_text_to_image.main(train_text_to_image.parse_args(["--config", write_config(tmp_path / "b.yaml",
                                                                                           config)]))
    # a pool with figure masks but not the lower body's, when the lower body is weighted
    save_file({"latent_mean": torch.zeros(4, 4, 32, 32, dtype=torch.float16),
               "latent_std": torch.ones(4, 4, 32, 32, dtype=torch.float16),
               "figure": torch.zeros(4, 1, 32, 32, dtype=torch.float16)}, str(pool / "shard-000000.safetensors"),
              metadata={"strings": '{"caption": ["a", "b", "c", "d"], "appearance": ["", "", "", ""]}'})
    with pytest.raises(ValueError, match="without lower masks, which lower_loss_weight needs: delete its pool-rank"):
        train_text_to_image.main(train_text_to_image.parse_args(["--config", write_config(
            tmp_path / "c.yaml", {**config, "lower_loss_weight": 6.0})]))
