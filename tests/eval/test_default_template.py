"""One default prompt template for PALO checkpoints across model_vqa, run_bench and the chat CLI.

The default is the template the checkpoint's config says it was trained with (``vicuna_v1`` for PALO); a template
passed explicitly is used exactly as given.
"""

from __future__ import annotations

import pytest

from palo.eval import model_vqa, run_bench
from palo.serve import cli


def test_no_script_hardcodes_a_default_template():
    assert model_vqa.build_parser().parse_args([]).conv_mode is None
    assert run_bench.build_parser().parse_args(["--model-path", "m"]).conv_mode is None
    assert cli.build_parser().parse_args([]).conv_mode is None


@pytest.mark.parametrize("explicit,expected",
                         [(None, "vicuna_v1"), ("llava_v1", "llava_v1"), ("vicuna_v1", "vicuna_v1")])
def test_load_answerer_uses_the_checkpoint_template_unless_told(world, explicit, expected):
    answerer, _ = model_vqa.load_answerer(world.full_dir, None, explicit, model_vqa.generation_kwargs(0.0, None, 1, 4),
                                          device="cpu", engine="hf")
    assert answerer.conv_mode == expected
    prompt = model_vqa.build_prompt("Q?", answerer.conv_mode, True, answerer.use_im_start_end)
    system = "A chat between a curious user" if expected == "vicuna_v1" else "A chat between a curious human"
    assert prompt.startswith(system) and prompt.endswith("USER: <image>\nQ? ASSISTANT:")


def test_run_bench_passes_no_template_unless_told(world, monkeypatch):
    seen = []
    monkeypatch.setattr(model_vqa, "load_answerer", lambda path, base, conv_mode, *a, **k: seen.append(conv_mode))
    for argv, expected in ((["--model-path", world.full_dir], None),
                           (["--model-path", world.full_dir, "--conv-mode", "llava_v1"], "llava_v1")):
        loader, _ = run_bench.make_loader(run_bench.build_parser().parse_args(argv))
        loader()
        assert seen[-1] == expected  # None: load_answerer takes the checkpoint's template


def test_build_prompt_brackets_the_image_for_im_start_end_checkpoints():
    plain = model_vqa.build_prompt("Q?", "vicuna_v1", True, False)
    wrapped = model_vqa.build_prompt("Q?", "vicuna_v1", True, True)
    assert "USER: <image>\nQ?" in plain
    assert wrapped == plain.replace("<image>", "<im_start><image><im_end>")
    assert (model_vqa.build_prompt("Q?", "vicuna_v1", False, True)
            == model_vqa.build_prompt("Q?", "vicuna_v1", False, False))
