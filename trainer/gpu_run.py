"""One GPU machine, one call: every demo stage trained in a fixed wall-time budget, packaged, measured and packed.

On a lent GPU machine (one H200, 16 CPU cores; diffusers carried as wheels, see docs/training.md):

    python -m trainer.gpu_run train --out "$OUT"     # <= 8 minutes: train, package, measure, pack into $OUT
    python -m trainer.gpu_run bench --out "$OUT"     # <= 3 minutes: the full-size benchmark rows (docs/benchmarks.md)

Back here, with the files that came back:

    python -m trainer.gpu_run unpack FOLDER          # the packed demo models -> assets/models/demo

``train`` continues every trained stage from where it stands (runs/ where it survived, else the shipped demo models:
``make_demo --from-shipped --continue-steps``) with the wall-time budget of ``trainer/configs/h200_profile.yaml``
per stage (``max_train_seconds``), rebuilds the Stage II pairs with the new Stage I, packages and measures
(``make_demo``'s package stage), and writes the packaged demo folder as a tar split into parts of at most 15 MiB,
with the model card and timings: at most 8 files. ``--dry-run`` rehearses the whole call on the CPU with tiny
budgets, in a temporary folder (runs/ and assets/ untouched).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PART_BYTES = 15 * 2**20
MAX_FILES = 8
PACK_NAME = "demo-models.tar"
TRAIN_STAGES = "clip,base,standardize,pairs,personalizer,package"
# The full-size rows of docs/benchmarks.md (random weights, 512x768, bf16, next to stock diffusers), low-VRAM row.
BENCH_COMMANDS = [
    ["benchmarks/bench_standardize.py", "--model", "random-full", "--device", "cuda", "--dtype", "bfloat16"],
    ["benchmarks/bench_personalize.py", "--model", "random-full", "--device", "cuda", "--dtype", "bfloat16",
     "--panels", "4"],
    ["benchmarks/bench_personalize.py", "--model", "random-full", "--device", "cuda", "--dtype", "bfloat16",
     "--panels", "4", "--low-vram"],
]
# The dry run: every trainer at CPU size (over the profile), and the benchmarks' same code paths at CPU size.
DRY_RUN_SETTINGS = ["--set", "train_batch_size=2", "--set", "dataloader_num_workers=0", "--set",
                    "max_train_seconds=null", "--set", "num_validation_samples=1", "--set", "num_reading_samples=2"]
DRY_BENCH_COMMANDS = [
    ["benchmarks/bench_standardize.py", "--model", "random-small", "--width", "64", "--height", "96", "--steps", "2",
     "--repeats", "1"],
    ["benchmarks/bench_personalize.py", "--model", "random-small", "--width", "64", "--height", "96", "--steps", "2",
     "--panels", "1", "--repeats", "1"],
]


def pack(folder: Path, out: Path, extra: dict[str, bytes] | None = None) -> list[Path]:
    """``folder`` as a tar split into parts of at most 15 MiB (``demo-models.tar.partNN``), plus ``extra`` files;
    refuses to write more than 8 files (what comes back from the machine)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(folder)))
    data = buffer.getvalue()
    parts = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]
    if len(parts) + len(extra or {}) > MAX_FILES:
        raise ValueError(f"{folder} packs into {len(parts)} parts of 15 MiB; with {len(extra or {})} other files that "
                         f"is more than the {MAX_FILES} files a machine sends back")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, part in enumerate(parts):
        written.append(out / f"{PACK_NAME}.part{i:02d}")
        written[-1].write_bytes(part)
    for name, content in (extra or {}).items():
        written.append(out / name)
        written[-1].write_bytes(content)
    return written


def unpack(folder: Path, target: Path) -> list[str]:
    """Joins ``demo-models.tar.part*`` from ``folder`` and extracts it into ``target`` (replacing what is there);
    every member must be a plain file or folder inside ``target``."""
    parts = sorted(folder.glob(f"{PACK_NAME}.part*"))
    if not parts:
        raise ValueError(f"no {PACK_NAME}.partNN files in {folder}: give the folder the GPU run's files came back to")
    data = b"".join(p.read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        members = tar.getmembers()
        for member in members:
            path = Path(member.name)
            if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
                raise ValueError(f"refusing {member.name!r} in the pack: not a plain file inside the demo folder")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        target.mkdir(parents=True)
        tar.extractall(target, members=members, filter="data")
    return [m.name for m in members if m.isfile()]


def _make_demo(argv: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "-m", "trainer.make_demo", *argv], cwd=ROOT, env=env, check=True)


def train(out: Path, dry_run: bool = False) -> list[Path]:
    """Train every stage within its budget, package and measure, pack into ``out``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    profile = ["--profile", "h200"]
    scratch = None
    if dry_run:  # everything in a temporary folder, tiny budgets
        scratch = Path(tempfile.mkdtemp(prefix="serialgen-dry-"))
        env.update(SERIALGEN_RUNS=str(scratch / "runs"), SERIALGEN_DEMO_DIR=str(scratch / "demo"),
                   SERIALGEN_EVALUATION_DIR=str(scratch / "evaluation"))
        profile = ["--profile", "h200", "--pairs", "2", "--eval-n", "8", "--eval-steps", "2", *DRY_RUN_SETTINGS]
    demo = Path(env.get("SERIALGEN_DEMO_DIR") or ROOT / "assets" / "models" / "demo")
    started = time.perf_counter()
    _make_demo([*profile, "--from-shipped", "--continue-steps", "2" if dry_run else "1000000", "--force-stages",
                "pairs", "--stages", TRAIN_STAGES], env)
    wall = round(time.perf_counter() - started, 1)
    runs = Path(env.get("SERIALGEN_RUNS") or ROOT / "runs" / "demo")
    timings = json.loads((runs / "timings.json").read_text()) if (runs / "timings.json").is_file() else {}
    extra = {"README.md": (demo / "README.md").read_bytes(),
             "gpu_run.json": json.dumps({"wall_s": wall, "timings": timings, "dry_run": dry_run}, indent=2).encode()}
    return pack(demo, out, extra)


def bench(out: Path, dry_run: bool = False) -> Path:
    """The benchmark rows, one after another, their output in ``out/bench.txt``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    lines = []
    for command in DRY_BENCH_COMMANDS if dry_run else BENCH_COMMANDS:
        result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                                check=False)  # a failing row is reported, the others still run
        lines += [f"$ python {' '.join(command)}", result.stdout.strip(), result.stderr.strip()[-2000:]
                  if result.returncode else "", f"(exit {result.returncode})", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.txt").write_text("\n".join(lines))
    print("\n".join(lines))
    return out / "bench.txt"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.gpu_run", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "bench"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, help="the folder whose files come back ($OUT on the device machine)")
        p.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: tiny budgets, a temporary folder")
    up = sub.add_parser("unpack", help="the packed demo models into assets/models/demo")
    up.add_argument("folder")
    up.add_argument("--target", default=str(ROOT / "assets" / "models" / "demo"))
    args = parser.parse_args(argv)
    if args.command == "unpack":
        try:
            names = unpack(Path(args.folder), Path(args.target))
        except (ValueError, tarfile.TarError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"unpacked {len(names)} files into {args.target}")
        return 0
    if args.command == "train":
        for path in train(Path(args.out), args.dry_run):
            print(path, path.stat().st_size)
        return 0
    bench(Path(args.out), args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
