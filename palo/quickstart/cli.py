"""``palo quickstart``: train, evaluate and serve a small PALO on one machine, offline, in minutes.

    palo quickstart [--workdir runs/quickstart] [--no-serve | --check-served] [--steps N] [--preset default|tiny]

Draws a synthetic multilingual shapes task, builds a small PALO locally (tokenizer, CLIP-shaped tower, LLaMA),
trains it with the real ``palo/train/train.py`` entry (stage 1, then stage 2, on CPU), evaluates all 10 languages
with the real ``model_vqa`` and an exact-match judge (table + plot), then serves the model (controller, worker,
web UI on 127.0.0.1) until Ctrl-C. Finished stages are skipped on a rerun. ``--check-served`` instead starts the
services, asks the served model every held-out question in every language through its OpenAI-compatible API,
prints the same table for the served answers, and stops.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on the network


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palo quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart", help="where data, models and results go")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-serve", action="store_true", help="stop after the evaluation table")
    mode.add_argument("--check-served", action="store_true",
                      help="serve, put every held-out question to the served model (OpenAI API), table, stop")
    parser.add_argument("--steps", type=int, default=None, help="stage-2 training steps (default: the preset's)")
    parser.add_argument("--preset", choices=("default", "tiny"), default="default",
                        help="tiny: a few steps on tiny sizes (seconds; checks the pipeline, not the accuracy)")
    parser.add_argument("--port", type=int, default=7860, help="web UI port (0: any free port)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # The verbs (`palo quickstart`, `palo export`, ...) are palo.cli's; this parses the quickstart's own options.
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from palo.extras import MissingExtra, require
    from palo.quickstart.pipeline import QuickstartConfig, StageFailed, WorkdirInUse, run

    try:  # before the training: its end (the plot, the services) failed on a missing package minutes later
        require("palo quickstart (its results plot)", "eval", packages=("matplotlib",))
        if not args.no_serve:
            require("palo quickstart (serving the model; --no-serve stops before)", "serve")
    except MissingExtra as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:  # found after the whole pipeline otherwise, when the UI binds
        print(f"error: --port must be from 0 to 65535, got {args.port}", file=sys.stderr)
        return 2
    config = QuickstartConfig.tiny() if args.preset == "tiny" else QuickstartConfig()
    if args.steps is not None:
        if args.steps < 1:
            print("error: --steps must be at least 1", file=sys.stderr)
            return 2
        config = replace(config, steps=args.steps, stage1_steps=max(1, min(config.stage1_steps, args.steps // 4)))
    try:
        os.makedirs(args.workdir, exist_ok=True)
        probe = os.path.join(args.workdir, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        print(f"error: --workdir {args.workdir!r} is not a writable folder ({error.strerror or error})",
              file=sys.stderr)
        return 2
    try:
        result = run(args.workdir, config)
    except WorkdirInUse as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StageFailed as error:  # its cause is in the stage's own line above
        print(f"error: {error}; run the same command again to go on (finished stages are kept)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a stage's traceback from inside torch said nothing a user could act on
        print("\ninterrupted: run the same command again to go on (finished stages are kept)", file=sys.stderr)
        return 130
    if args.no_serve:
        return 0
    if args.check_served:
        from palo.quickstart.serve import check_served

        return check_served(result.checkpoint, args.workdir)
    from palo.quickstart.serve import serve_forever

    return serve_forever(result.checkpoint, os.path.join(args.workdir, "logs"), args.port)


if __name__ == "__main__":
    sys.exit(main())
