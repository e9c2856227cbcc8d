"""Every trainer in two processes for a few steps (what a multi-GPU run does): it finishes, the two processes train
on different samples, and the learning-rate schedule spans the whole run.

On the CPU ``accelerate launch --cpu --num_processes 2`` starts a single process (its multi-CPU path expects mpirun),
so the processes come from torchrun (``torch.distributed.run``, what ``accelerate launch --multi_gpu`` runs), and
accelerate sets up gloo on the CPU from its environment."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainers import TINY_CLIP, TINY_UNET, TINY_VAE, save_tiny_base, write_config, write_pair_folder

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
COMMON = {"train_batch_size": 2, "max_train_steps": STEPS, "checkpointing_steps": STEPS, "validation_steps": 100,
          "log_steps": 1, "num_characters": 20, "num_validation_samples": 1, "validation_inference_steps": 2,
          "record_batches": 2, "lr_warmup_steps": 1, "learning_rate": 1e-3, "lr_schedule": "cosine"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_or_show_the_hang(cmd: list[str], env: dict, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, except that a run still going after ``timeout`` gets SIGABRT in its whole process group, so each
    rank's faulthandler (PYTHONFAULTHANDLER, set here) prints where every thread of it stood, and the test fails with
    that."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env={**env, "PYTHONFAULTHANDLER": "1"}, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            pytest.fail(f"{' '.join(cmd[2:])} still ran after {timeout} s; where its threads stood:\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(module: str, config: dict, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    cfg = write_config(tmp_path / f"{name}.yaml", {**COMMON, **config, "output_dir": str(out)})
    # a clean launch: nothing an earlier in-process run (accelerate, torch.distributed) left in the environment
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("ACCELERATE_", "MASTER_", "TORCHELASTIC_")) and k not in
                 ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    env = {**inherited, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "ACCELERATE_USE_CPU": "true"}  # what `accelerate launch --cpu` sets: gloo on the CPU
    run = _run_or_show_the_hang([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(_free_port()), "-m", module, "--config", cfg],
                                env, cwd=ROOT)
    if run.returncode != 0:  # show each rank's own error (the last lines are only the launcher's summary)
        ranks = [line for line in run.stderr.splitlines() if "rank1]" in line or "Error" in line]
        pytest.fail("\n".join(ranks[-40:]) + "\n" + run.stderr[-1500:])
    ranks = [(out / f"batches-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2 and not set(ranks[0]) & set(ranks[1]), ranks  # different samples
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in logs] == list(range(1, STEPS + 1))
    # one schedule over the run: after warm-up the cosine has not reached 0 before the last step
    assert logs[-2]["lr"] > 0 and logs[0]["lr"] == pytest.approx(1e-3)
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp_clip")
    return launch("trainer.train_clip", {
        "resolution": [64, 96], "bpe_merges": 50, "projection_dim": 32,
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                          "num_hidden_layers": 1, "image_size": 32, "patch_size": 8}}, tmp, "clip")


def test_clip_vae_and_base(clip, tmp_path):
    vae = launch("trainer.train_vae", {"resolution": [64, 96], "vae": TINY_VAE}, tmp_path, "vae")
    launch("trainer.train_text_to_image", {
        "resolution": [64, 96], "vae": str(vae / "vae"), "text_encoder": str(clip / "text_encoder"),
        "text_encoder_2": str(clip / "text_encoder_2"), "tokenizer": str(clip / "tokenizer"),
        "unet": {"block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": [2, 4],
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 1],
                 "addition_time_embed_dim": 8, "norm_num_groups": 8, "use_linear_projection": True}},
           tmp_path, "base")


def test_standardize_with_reference_dropout(tmp_path):
    # reference dropout 0.5 drops whole batches now and then: DDP must accept a ReferenceNet without gradients
    launch("trainer.train_standardize", {
        "resolution": [64, 96], "vae": TINY_VAE, "image_encoder": TINY_CLIP, "reference_dropout": 0.5,
        "attention_loss_weight": 0.1,
        "model": {"unet": TINY_UNET, "pose_guider": {"block_out_channels": [8, 8, 16, 16]},
                  "conditioner": {"pose_block_out_channels": [8, 8, 16, 16], "pose_embedding_channels": 16}}},
           tmp_path, "std")


def test_personalizer_shards_a_pair_folder(tmp_path):
    save_tiny_base(tmp_path)
    pairs = write_pair_folder(tmp_path / "pairs", 8, 25)
    launch("trainer.train_personalizer", {
        "base": str(tmp_path / "sdxl"), "image_encoder": str(tmp_path / "image_encoder"), "resolution": [64, 64],
        "pairs": str(pairs), "text_dropout": 0.3, "image_dropout": 0.3, "both_dropout": 0.3}, tmp_path, "pers")


def test_detectors_and_probes(tmp_path):
    launch("trainer.train_detectors", {"detector": "pose", "resolution": [64, 96], "channels": [8, 16, 16, 16],
                                       "negative_fraction": 0.3}, tmp_path, "pose")
    launch("trainer.train_probes", {"resolution": [64, 96]}, tmp_path, "probe")


def test_the_schedule_counts_every_process():
    """accelerate steps a prepared scheduler N times per optimizer step; the schedule is built in those units."""
    import torch

    from trainer.common import cosine_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt.step()
    two = cosine_with_warmup(opt, 2 * 2, 10 * 2)
    lrs = []
    for _ in range(10):  # 10 steps of a 2-process run
        two.step()
        two.step()
        lrs.append(two.get_last_lr()[0])
    assert lrs[-2] > 0 and lrs[1] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0, abs=1e-9)


def test_a_pair_folder_is_split_between_processes():
    from types import SimpleNamespace

    from trainer.train_personalizer import shard

    data = list(range(11))
    parts = [list(shard(data, SimpleNamespace(num_processes=3, process_index=r))) for r in range(3)]
    assert sorted(sum(parts, [])) == data and all(not set(a) & set(b) for a in parts for b in parts if a is not b)
    assert shard(data, SimpleNamespace(num_processes=1, process_index=0)) is data


def test_a_hung_launch_fails_with_where_its_threads_stood():
    code = "import time\ndef stuck_here():\n    time.sleep(600)\nstuck_here()\n"
    with pytest.raises(pytest.fail.Exception, match="in stuck_here"):
        _run_or_show_the_hang([sys.executable, "-c", code], dict(os.environ), timeout=3)
