"""SerialGen Studio: `python app.py [--preset demo|full|auto] [--share] [--port N] [--server-name H]`."""

import argparse
import logging
import os

if os.environ.get("SPACES_ZERO_GPU"):  # ZeroGPU: `spaces` must come before anything initialises CUDA through torch
    import spaces  # noqa: F401


def main(argv=None):
    parser = argparse.ArgumentParser(description="SerialGen Studio")
    parser.add_argument("--preset", default="auto", help="demo, full, auto (full on a GPU with weights) or a JSON file")
    parser.add_argument("--override", action="append", default=[], metavar="NAME=PATH", help="component from a path")
    parser.add_argument("--device", default=None)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    # on a Hugging Face Space, GRADIO_SERVER_NAME/PORT say where to listen
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--server-name", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    args = parser.parse_args(argv)

    # the studio's own log at INFO (one line per refused request, tracebacks for faults); libraries at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("serialgen").setLevel(logging.INFO)
    from engine import load_engine
    from studio import LAUNCH_OPTIONS, build_demo

    engine, status = None, ""
    try:
        overrides = dict(o.split("=", 1) for o in args.override)
        engine = load_engine(args.preset, overrides=overrides, device=args.device)
        print(engine.describe())
    except ValueError as exc:  # missing weights etc.: the page says what is missing and keeps serving
        status = f"The studio could not load its models:\n{exc}"
        print(status)
    demo = build_demo(engine, status)
    # quiet: Gradio's own banner suggests a launch argument for sharing although --share exists; we say what is true
    demo.launch(server_name=args.server_name, server_port=args.port, share=args.share, prevent_thread_lock=True,
                **LAUNCH_OPTIONS)
    print(f"SerialGen Studio is running at {demo.local_url}" + (f" and {demo.share_url}" if demo.share_url else ""))
    if args.share and not demo.share_url:
        print("No share link could be made (no network?): the studio keeps serving locally.")
    demo.block_thread()


if __name__ == "__main__":
    main()
