"""The original launch scripts (``scripts/train/*.sh``) from any folder: relative paths are the caller's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORD = """import json, os, sys
json.dump({"cwd": os.getcwd(), "argv": sys.argv[1:], "pythonpath": os.environ.get("PYTHONPATH", "")},
          open(os.environ["RECORD"], "w"))
"""


@pytest.mark.parametrize("script", ["finetune_palo.sh", "finetune_lora_palo.sh", "pretrain_projector.sh"])
def test_a_script_run_from_another_folder_takes_relative_paths_from_there(script, tmp_path):
    """The scripts changed to the repository root before launching, so ``data.json`` named the checkout's file (a
    "no such file" for the caller's) and a relative output folder put checkpoints inside the checkout."""
    launcher, record = tmp_path / "launcher.py", tmp_path / "record.json"
    launcher.write_text(RECORD)
    caller = tmp_path / "work"
    caller.mkdir()
    env = dict(os.environ, LAUNCHER=f"{sys.executable} {launcher}", RECORD=str(record))
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train", script), "base", "data.json", "projector.bin",
                          "mlp2x_gelu", "results/out", "2", "2e-5"], cwd=caller, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    seen = json.loads(record.read_text())
    assert seen["cwd"] == str(caller)  # so data.json, results/out and ./data are the caller's
    argv = seen["argv"]
    assert os.path.isfile(argv[0]) and argv[0].endswith(os.path.join("palo", "train", "train_mem.py"))
    assert os.path.isfile(argv[argv.index("--deepspeed") + 1])  # the shipped config, found from anywhere
    assert argv[argv.index("--data_path") + 1] == "data.json"
    assert argv[argv.index("--output_dir") + 1] == "results/out"
    assert ROOT in seen["pythonpath"].split(os.pathsep)  # the checkout's palo package is the one imported
