"""CI runs what the README tells a new user to run: the same install command and the same test command."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_tests_line() -> list[str]:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1).splitlines()
    line = block[block.index(next(b for b in block if b.startswith("# Tests:"))) + 1]
    return [part.strip() for part in line.split("&&")]


def _ci_line_after(marker: str) -> str:
    lines = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith(marker)) + 1].strip()


def test_ci_runs_the_readme_test_command():
    parts = _readme_tests_line()
    assert parts[-1].startswith("python -m pytest")
    assert _ci_line_after("# --- README test command") == parts[-1]
    assert "--durations=15" in parts[-1]  # the slowest tests are listed at the end of every run


def test_ci_lints_like_the_readme_test_command():
    assert "ruff check ." in _readme_tests_line()
    assert _ci_line_after("# --- lint") == "ruff check ."


def test_ci_installs_with_the_readme_install_command():
    readme_installs = [p for p in _readme_tests_line() if p.startswith("pip install")]
    ci = [p.strip().replace(" -q", "") for p in _ci_line_after("# --- README install command").split("&&")]
    assert ci == readme_installs
