"""Benchmarks that compare this tree with another git revision: each side is measured in a process of its own, with
``palo`` imported from its own tree (the other revision checked out into a temporary worktree)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

REPO = pathlib.Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser, against_help: str) -> None:
    """The flags every such benchmark takes (``--child`` is the measuring process's, not the user's)."""
    parser.add_argument("--against", default="HEAD", help=against_help)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of one process per side")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per process")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def import_palo_from(tree: str):
    """``palo``, imported from ``tree`` (fails loudly if another copy is found first)."""
    sys.path.insert(0, tree)
    import palo

    if not pathlib.Path(palo.__file__).resolve().is_relative_to(pathlib.Path(tree).resolve()):
        raise SystemExit(f"imported palo from {palo.__file__}, not from {tree}")
    return palo


def measure_in_child(script: str, tree: str, options: list[str]) -> dict:
    """Run ``script --child tree *options`` in a fresh process and return the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, script, "--child", tree, *options], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(f"measuring {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def short_revision(revision: str) -> str:
    """The short hash of the commit ``revision`` (``--against``) names in this repository.

    Raises:
        SystemExit: With one line naming ``--against``, when it names no commit here (a typo, a branch not fetched)
            or git cannot be run: it was a CalledProcessError traceback.
    """
    try:
        # --verify: exactly one object, or nothing; ^{commit}: a tag is followed to its commit, a tree or blob refused.
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", "--short",
                               f"{revision}^{{commit}}"], capture_output=True, text=True)
    except OSError as exc:  # no git on PATH
        raise SystemExit(f"error: --against {revision}: cannot run git ({exc.strerror or exc})") from None
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"error: --against {revision}: no such revision (a commit, branch or tag) in the git "
                         f"repository at {REPO}")
    return done.stdout.strip()


@contextlib.contextmanager
def checked_out(revision: str, where: str) -> Iterator[str]:
    """``revision`` checked out at ``where`` (a git worktree, removed afterwards)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", where, revision], check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", where], check=False)


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "an unknown CPU"
