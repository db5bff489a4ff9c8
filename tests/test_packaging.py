"""What the package's distributions hold: the source distribution is the repository (the scripts and DeepSpeed
configs the README's commands name, the example images, the docs, the tests with their helpers); before
MANIFEST.in it held ``palo/`` and 18 test files whose fixtures it lacked."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_SHIPPED = (".ci/", ".gitignore")  # the CI script and git's own file
# Modules of what a plain `pip install palo` offers (chat, evaluation answers, loading, images, remote images): what
# they import, also inside functions, must come with the base dependencies, not an extra.
BASE_FEATURES = ["palo/remote_images.py", "palo/mm_utils.py", "palo/image_io.py", "palo/conversation.py",
                 "palo/model/builder.py", "palo/serve/cli.py", "palo/eval/run_llava.py", "palo/eval/model_vqa.py"]


def test_the_source_distribution_holds_every_file_of_the_repository(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout: the repository's file list is git's")
    tracked = subprocess.run(["git", "-C", ROOT, "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "src"  # a copy: building writes palo.egg-info beside pyproject.toml
    for name in tracked:
        os.makedirs(source / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), source / name)
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                            "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path / "dist")],
                           cwd=source, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    archive = tmp_path / "dist" / build.stdout.split()[-1]
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        shipped = {name[len(top) + 1:] for name in tar.getnames()}
    missing = [name for name in tracked if name not in shipped and not name.startswith(NOT_SHIPPED)]
    assert missing == []
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in shipped)


def _imported_packages(path: str) -> set[str]:
    """The top-level names a module imports, anywhere in it, less the standard library and palo."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
    return {name for name in names if name not in sys.stdlib_module_names and name != "palo"}


def test_base_features_import_only_base_dependencies():
    """`palo chat --allow-remote-images` needed httpx, which only the serve extra brought."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    base = {re.split(r"[<>=!~;\[ ]", r)[0].lower().replace("_", "-") for r in requirements}
    distributions = importlib.metadata.packages_distributions()
    missing = {(path, name) for path in BASE_FEATURES for name in _imported_packages(path)
               if not any(d.lower().replace("_", "-") in base for d in distributions.get(name, [name]))}
    assert missing == set()
