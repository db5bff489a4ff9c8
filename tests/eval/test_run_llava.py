"""``palo/eval/run_llava.py``: one query about several images (``--image-file`` joined by ``--sep``), as LLaVA's.

The answer printed by the real script equals greedy generation computed here from the prompt built by hand, so the
images, their order and the template really reach the model; remote images need ``--allow-remote-images``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image, ImageDraw

from palo.conversation import conv_templates
from palo.eval.run_llava import build_parser, eval_model
from palo.mm_utils import process_images, tokenizer_image_token
from palo.model.builder import load_pretrained_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUERY = "Compare the two pictures. ¿Cuál tiene más círculos? 哪张图片更亮？"


def _images(folder) -> list[str]:
    paths = []
    for i, (color, size) in enumerate([("red", (80, 50)), ("navy", (40, 70))]):
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).ellipse((5, 5, 30, 30), fill=color)
        path = os.path.join(folder, f"img{i}.png")
        image.save(path)
        paths.append(path)
    return paths


def _expected(world, paths: list[str], query: str, max_new_tokens: int) -> str:
    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cpu", dtype=torch.float32)
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" * len(paths) + query)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    pixels = process_images([Image.open(p).convert("RGB") for p in paths], processor, model.config)
    with torch.no_grad():
        out = model.generate(ids, images=pixels, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "palo/eval/run_llava.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_script_answers_about_several_images(world, tmp_path):
    paths = _images(str(tmp_path))
    expected = _expected(world, paths, QUERY, 12)
    assert expected
    done = _run("--model-path", world.full_dir, "--image-file", ";".join(paths), "--sep", ";", "--query", QUERY,
                "--temperature", "0", "--max_new_tokens", "12", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected


def test_eval_model_with_placeholders_in_the_query(world, tmp_path, capsys):
    paths = _images(str(tmp_path))
    args = build_parser().parse_args([
        "--model-path", world.full_dir, "--image-file", ",".join(paths), "--temperature", "0", "--max_new_tokens", "6",
        "--device", "cpu", "--query", "<image-placeholder>\n<image-placeholder>\n" + QUERY])
    assert eval_model(args) == _expected(world, paths, QUERY, 6)
    bad = argparse.Namespace(**dict(vars(args), query="only one <image-placeholder> here"))
    with pytest.raises(ValueError, match="1 <image-placeholder> but 2 images"):
        eval_model(bad)


def test_the_originals_image_helpers(tmp_path):
    from palo.eval.run_llava import image_parser, load_image, load_images
    from palo.mm_utils import ImageLoadError

    paths = _images(str(tmp_path))
    args = argparse.Namespace(image_file=";".join(paths) + ";", sep=";")
    assert image_parser(args) == paths
    images = load_images(image_parser(args))
    assert [image.mode for image in images] == ["RGB", "RGB"] and images[0].size == load_image(paths[0]).size
    with pytest.raises(ImageLoadError, match="allow-remote-images"):
        load_image("https://example.com/a.png")


def test_clear_errors(world, tmp_path):
    done = _run("--model-path", world.full_dir, "--image-file", str(tmp_path / "nope.png"), "--query", "hi",
                "--device", "cpu")
    assert done.returncode == 2 and "no such image file" in done.stderr
    paths = _images(str(tmp_path))
    args = build_parser().parse_args(["--model-path", world.full_dir, "--image-file", paths[0], "--device", "cpu",
                                      "--query", "word " * 3000])
    with pytest.raises(ValueError, match=r"the prompt takes \d+ of the model's \d+ positions \(1 image\(s\)\); no"):
        eval_model(args)


@pytest.mark.parametrize(("flags", "says"), [
    # A ZeroDivisionError traceback from beam search, after the model had loaded.
    (["--num_beams", "0"], "--num_beams must be at least 1, got 0"),
    # Taken without a word, and decoded greedily.
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--max_new_tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--conv-mode", "vicuna_v9"], "unknown --conv-mode 'vicuna_v9'"),
])
def test_a_setting_no_generation_takes_is_one_line_before_the_model_loads(flags, says, tmp_path, capsys, monkeypatch):
    """The same checks as model_vqa's (``generation_kwargs``), made before the model loads."""
    import palo.model.builder as builder
    from palo.eval.run_llava import main

    def loader(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(builder, "load_pretrained_model", loader)
    image = _images(str(tmp_path))[0]
    assert main(["--model-path", str(tmp_path / "ckpt"), "--image-file", image, "--query", "hi", "--device", "cpu",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_a_checkpoint_that_does_not_load_is_one_line(world, tmp_path, capsys):
    """A checkpoint folder without its tokenizer files, or with a config.json that is not JSON, died with a
    FileNotFoundError / OSError traceback (model_vqa said it in one line)."""
    import shutil

    from palo.eval.run_llava import main

    paths = _images(str(tmp_path))
    notok = shutil.copytree(world.full_dir, tmp_path / "notok")
    for name in ("tokenizer.model", "tokenizer.json"):
        if (notok / name).exists():
            (notok / name).unlink()
    badjson = shutil.copytree(world.full_dir, tmp_path / "badjson")
    (badjson / "config.json").write_text('{"a": 1,', encoding="utf-8")
    for folder, says in ((notok, "tokenizer"), (badjson, "config.json")):
        assert main(["--model-path", str(folder), "--image-file", paths[0], "--query", "hi", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err, err


def test_remote_image_only_with_the_flag(world, tmp_path):
    paths = _images(str(tmp_path))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{os.path.basename(paths[0])}"
        common = ["--model-path", world.full_dir, "--image-file", url, "--query", QUERY, "--temperature", "0",
                  "--max_new_tokens", "6", "--device", "cpu"]
        refused = _run(*common)
        assert refused.returncode == 2 and "not fetched without --allow-remote-images" in refused.stderr
        loopback = _run(*common, "--allow-remote-images")
        assert loopback.returncode == 2 and "loopback address 127.0.0.1" in loopback.stderr
        fetched = _run(*common, "--allow-remote-images", "--remote-image-allow-network", "127.0.0.1/32")
        assert fetched.returncode == 0, fetched.stderr[-2000:]
        assert fetched.stdout.strip().splitlines()[-1] == _expected(world, paths[:1], QUERY, 6)
    finally:
        httpd.shutdown()
        httpd.server_close()
