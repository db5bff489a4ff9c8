"""The one-command GPU session (``scripts/gpu_session.sh``) runs end to end: its dry run takes every step with the
same flags on the CPU at tiny shapes, so a lent GPU session (minutes, rarely granted) never finds a broken step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["engine_7b", "train_mix_mobile", "engine_mobile", "train_mix_7b_lora", "pytest_gpu", "engine_host"]


@pytest.mark.slow
@pytest.mark.timeout(1700)
def test_dry_run_takes_every_step_and_writes_its_results(tmp_path):
    env = {**os.environ, "GPU_SESSION_DRY_RUN": "1", "OUT": str(tmp_path), "GPU_SESSION_SECONDS": "1500",
           # the script calls python3: this interpreter's, wherever the suite was started from
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    run = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1650)
    summary = (tmp_path / "summary.txt").read_text()
    ran = dict(re.findall(r"^## (\w+): rc (\d+) in", summary, flags=re.M))
    assert ran == {step: "0" for step in STEPS}, summary + run.stdout[-3000:] + run.stderr[-3000:]
    assert "dry run on the CPU" in (tmp_path / "gpu.txt").read_text()

    for name, batches in (("engine_7b", [1, 32]), ("engine_mobile", [1])):
        results = json.loads((tmp_path / f"{name}.json").read_text())["results"]
        assert [r["batch"] for r in results] == batches
        for r in results:  # the engine did the same work as model.generate, and both were timed
            assert r["same_tokens"] is True and r["diverging_rows"] == 0
            assert r["max_logit_diff"] < 1e-4  # float32 on the CPU: rounding only
            assert r["engine_decode_tokens_per_s"] > 0 and r["generate_decode_tokens_per_s"] > 0
            assert r["engine_ttft_ms"] > 0 and r["generate_ttft_ms"] > 0

    for name, sides in (("train_mix_mobile", {"padded", "packed", "rows", "llava"}),
                        ("train_mix_7b_lora", {"padded", "packed", "rows"})):
        results = json.loads((tmp_path / f"{name}.json").read_text())["results"]
        assert set(results) == sides
        for side, r in results.items():  # what the training targets are stated in
            assert r["real_tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_gib"] > 0, side
            assert 0 <= r["padding_fraction"] < 1, side
        assert results["rows"]["padding_fraction"] < results["padded"]["padding_fraction"]

    host = json.loads((tmp_path / "engine_host.json").read_text())
    assert [(r["streams"], r["tokens"]) for r in host] == [(32, 128), (32, 1024)]
    assert all(r["ms_per_step"] > 0 for r in host)
