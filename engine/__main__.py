"""Scripting without the UI.

    python -m engine standardize REF.png --out SHEET.png [--seed N] [--preset ...] [--intermediates DIR]
    python -m engine panels --sheet SHEET.png --prompt "running in the rain" --prompt "waving" --seed 7 --out DIR
    python -m engine panels --sheet Mia=mia.png --sheet Kai=kai.png --prompt "[Mia][Kai] talking on a bench" --out DIR
    python -m engine info --preset full

Errors (bad input, missing weights) print one line saying what is wrong and what to do, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _override(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--override expects NAME=PATH, got {text!r}")
    return name, path


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="full, demo, or a preset JSON file (default: demo)")
    parser.add_argument("--override", action="append", type=_override, default=[], metavar="NAME=PATH",
                        help="load component NAME from a local path (repeatable), e.g. adapter=out/ip-adapter.safetensors")
    parser.add_argument("--device", default=None, help="torch device (default: the preset's policy)")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--low-vram", action="store_true", default=None, help="model CPU offload + VAE slicing/tiling")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list every component of a preset and where it would load from (no loading)")
    _engine_args(info)
    info.add_argument("--load", action="store_true", help="also load the engine and print what came from where")

    std = sub.add_parser("standardize", help="turn a reference picture into a standardized character sheet")
    _engine_args(std)
    std.add_argument("reference", help="the reference picture (photo or drawing, any pose, any background)")
    std.add_argument("--out", required=True, help="where to write the sheet (PNG)")
    std.add_argument("--seed", type=int, default=None)
    std.add_argument("--steps", type=int, default=None, dest="num_inference_steps")
    std.add_argument("--guidance", type=float, default=None, dest="guidance_scale")
    std.add_argument("--width", type=int, default=None)
    std.add_argument("--height", type=int, default=None)
    std.add_argument("--mask", default=None, help="a foreground mask image of the reference (else the detector's)")
    std.add_argument("--intermediates", default=None, help="also write canvas, mask and pose maps to this folder")

    panels = sub.add_parser("panels", help="generate panels of characters from their sheets and prompts")
    _engine_args(panels)
    panels.add_argument("--sheet", action="append", default=[], metavar="[NAME=]SHEET.png",
                        help="a character sheet (image file). One unnamed sheet is every panel's character; named "
                             "sheets (repeat: --sheet Mia=mia.png --sheet Kai=kai.png) are picked per prompt by its "
                             "tags, as in the studio's script: [Mia][Kai:right] ... or [NC]. Omit for no character")
    panels.add_argument("--prompt", action="append", required=True,
                        help="a panel prompt (repeat for more panels); with named sheets it starts with tags")
    panels.add_argument("--negative-prompt", default=None)
    panels.add_argument("--seed", type=int, default=None, help="seed of the first panel; panel i uses seed + i")
    panels.add_argument("--steps", type=int, default=None, dest="num_inference_steps")
    panels.add_argument("--width", type=int, default=None)
    panels.add_argument("--height", type=int, default=None)
    panels.add_argument("--guidance", type=float, default=None, dest="guidance_scale")
    panels.add_argument("--adapter-scale", type=float, default=None)
    panels.add_argument("--image-guidance", type=float, default=None, dest="image_guidance_scale",
                        help="guidance on the sheet apart from the text's (three UNet passes; default: the preset's)")
    panels.add_argument("--guidance-rescale", type=float, default=None,
                        help="0-1: pulls guided predictions back to the conditioned one's spread (default: the preset's)")
    panels.add_argument("--reference-scale", type=float, default=None,
                        help="reference attention: the panel's self-attention also reads the sheet's UNet features "
                             "(one more UNet pass per step; 0 off; default: the preset's)")
    panels.add_argument("--num-images", type=int, default=1, dest="num_images_per_prompt")
    panels.add_argument("--batch-size", type=int, default=None, dest="max_batch_size",
                        help="panels per UNet batch (default: all at once)")
    panels.add_argument("--out", required=True, help="output folder (created)")
    return parser.parse_args(argv)


def _load(args, stages=("personalize", "standardize")):
    from . import load_engine

    return load_engine(args.preset, overrides=dict(args.override), device=args.device, dtype=args.dtype,
                       low_vram=args.low_vram, stages=stages)


def run_standardize(args) -> dict:
    import numpy as np

    from .preprocess import load_image

    reference = load_image(args.reference, name="reference")
    mask = None
    if args.mask:
        mask = np.asarray(load_image(args.mask, name="--mask").convert("L"), np.float32) / 255.0
    engine = _load(args, stages=("standardize",))
    start = time.perf_counter()
    out = engine.standardize_reference(reference, mask=mask, seed=args.seed, num_inference_steps=args.num_inference_steps,
                                       guidance_scale=args.guidance_scale, width=args.width, height=args.height)
    seconds = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.sheet.save(args.out)
    if args.intermediates:
        folder = Path(args.intermediates)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("canvas", "mask", "reference_pose_map", "target_pose_map"):
            image = getattr(out, name)
            if image is not None:
                image.save(folder / f"{name}.png")
    return {"sheet": args.out, "seed": out.seed, "seconds": round(seconds, 3), "preset": engine.preset.name,
            "device": str(engine.device)}


def panel_requests(sheet_args: list[str], prompts: list[str]):
    """(prompts, sheets, regions, character names per prompt) for the pipeline from ``--sheet`` and ``--prompt`` arguments: one unnamed sheet for
    every panel, or named sheets chosen per prompt by its script tags (ValueError saying what is wrong)."""
    from .preprocess import load_image
    from .regions import describe_group

    named = [s.partition("=") for s in sheet_args]
    if not any(sep for _, sep, _ in named):
        if len(sheet_args) > 1:
            raise ValueError(f"{len(sheet_args)} unnamed --sheet files: name them (--sheet Mia=mia.png) and tag the "
                             "prompts ([Mia][Kai] ...), or give one sheet for every panel")
        sheet = load_image(sheet_args[0], name="--sheet") if sheet_args else None
        return list(prompts), sheet, None, [[] if sheet is None else ["sheet"]] * len(prompts)
    if not all(name and sep and path for name, sep, path in named):
        raise ValueError("give every --sheet a name once one has one: --sheet Mia=mia.png --sheet Kai=kai.png")
    sheets = {}
    for name, _, path in named:
        if name.casefold() in {n.casefold() for n in sheets}:
            raise ValueError(f"--sheet {name} is given twice")
        sheets[name] = load_image(path, name=f"--sheet {name}")
    from studio.script import parse_script  # the script's tag syntax, one parser for the studio and the CLI

    texts, panel_sheets, regions, names = [], [], [], []
    for i, prompt in enumerate(prompts):
        try:
            (spec,) = parse_script(prompt, list(sheets))
        except ValueError as exc:
            raise ValueError(f"--prompt {i + 1}: {str(exc).splitlines()[-1]}") from None
        texts.append(describe_group(spec.prompt, len(spec.characters)))
        panel_sheets.append([sheets[c] for c in spec.characters] or None)
        regions.append(spec.positions if len(spec.characters) > 1 else None)
        names.append(spec.characters)
    return texts, panel_sheets, regions, names


def run_panels(args) -> dict:
    prompts, sheet, regions, characters = panel_requests(args.sheet, args.prompt)
    engine = _load(args, stages=("personalize",))
    start = time.perf_counter()
    options = engine.generation_options(
        num_inference_steps=args.num_inference_steps, width=args.width, height=args.height,
        guidance_scale=args.guidance_scale, adapter_scale=args.adapter_scale,
        image_guidance_scale=args.image_guidance_scale, reference_scale=args.reference_scale,
        guidance_rescale=args.guidance_rescale,
    )
    output = engine.personalize(
        prompt=prompts, sheet=sheet, regions=regions, negative_prompt=args.negative_prompt, seeds=args.seed,
        num_images_per_prompt=args.num_images_per_prompt, max_batch_size=args.max_batch_size, **options,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    k = args.num_images_per_prompt
    records = []
    for index, image in enumerate(output.images):
        name = f"panel_{index // k:03d}" + (f"_{index % k}" if k > 1 else "") + ".png"
        image.save(out / name)
        records.append({"file": name, "prompt": output.prompts[index // k], "seed": output.seeds[index],
                        "characters": characters[index // k]})
    manifest = {
        "preset": engine.preset.name,
        "device": str(engine.device),
        "components": [vars(c) for c in engine.components],
        "options": options,
        "sheets": args.sheet,
        "seconds": round(seconds, 3),
        "panels": records,
    }
    (out / "panels.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def run_info(args) -> int:
    """Prints each component, where it would load from and whether it is there; names every missing one at once."""
    from .presets import get_preset
    from .sources import plan_sources

    presets = ["full", "demo"] if args.preset == "auto" else [args.preset]
    missing = []
    for name in presets:
        preset = get_preset(name).with_overrides(dict(args.override))
        print(f"preset {preset.name}: {preset.description}")
        for component, where, state, problem in plan_sources(preset):
            print(f"  {component:22s} {state:8s} {where}")
            if problem:
                missing.append(problem)
    if missing and args.preset != "auto":
        print("error: " + "\n".join(missing), file=sys.stderr)
        return 2
    if args.load:
        print(_load(args).describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "info":
            return run_info(args)
        elif args.command == "standardize":
            result = run_standardize(args)
            print(f"{result['sheet']}  seed={result['seed']}  {result['seconds']:.1f} s "
                  f"({result['preset']} on {result['device']})")
        else:
            manifest = run_panels(args)
            for record in manifest["panels"]:
                print(f"{Path(args.out) / record['file']}  seed={record['seed']}  {record['prompt']}")
            print(f"{len(manifest['panels'])} panels in {manifest['seconds']:.1f} s ({manifest['preset']} on {manifest['device']})")
    except ValueError as exc:  # bad input and missing weights: one clear message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
