"""A shortened ``palo quickstart`` end to end (tiny preset, a few steps, no serving), then its services."""

from __future__ import annotations

import json
import os

import pytest

from palo.eval.bench import LANGUAGES, display_name
from palo.model.builder import load_pretrained_model
from palo.quickstart import cli, serve
from palo.quickstart.judge import COLUMNS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("quickstart"))
    assert cli.main(["quickstart", "--workdir", workdir, "--no-serve", "--preset", "tiny", "--steps", "3"]) == 0
    return workdir


def test_short_quickstart_writes_loadable_checkpoint_and_table(workdir, capsys):
    checkpoint = os.path.join(workdir, "checkpoints", "palo-quickstart")
    assert os.path.isfile(os.path.join(workdir, "checkpoints", "stage1-projector", "mm_projector.bin"))
    tokenizer, model, processor, _ = load_pretrained_model(checkpoint, None, "palo-quickstart", device="cpu")
    assert processor is not None and model.config.mm_projector_type == "mlp2x_gelu"
    assert model.get_vision_tower().config.image_size == 84
    state = json.load(open(os.path.join(checkpoint, "trainer_state.json")))
    assert state["global_step"] == 3

    prefix = os.path.join(workdir, "eval", "quickstart_summary")
    table = open(prefix + ".md", encoding="utf-8").read()
    assert "| language | " + " | ".join(COLUMNS) + " | failed |" in table
    for language in LANGUAGES:
        assert f"| {display_name(language)} |" in table
    assert "| Overall avg |" in table and os.path.getsize(prefix + ".png") > 1000
    scores = json.load(open(prefix + ".json", encoding="utf-8"))
    assert all(row["all_n"] == 6 and row["failed"] == 0 for row in scores["languages"].values())


def test_rerun_skips_finished_stages(workdir, capsys):
    assert cli.main(["quickstart", "--workdir", workdir, "--no-serve", "--preset", "tiny", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("[skip]") >= 5 and "vision tower already pre-trained" in out and "| Overall avg |" in out


def test_bad_arguments():
    assert cli.main(["serve"]) == 2
    assert cli.main(["quickstart", "--steps", "0", "--no-serve"]) == 2


@pytest.mark.slow
def test_services_serve_the_checkpoint(workdir):
    services = serve.start(os.path.join(workdir, "checkpoints", "palo-quickstart"), os.path.join(workdir, "logs"))
    try:
        assert services.model_name in serve._post_json(services.controller_url + "/list_models")["models"]
        assert serve._reachable(services.web_url)
    finally:
        services.stop()
    assert all(p.poll() is not None for p in services.processes)
