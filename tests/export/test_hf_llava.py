"""``palo export --to hf-llava``: transformers alone (LlavaForConditionalGeneration + AutoProcessor) reproduces PALO.

Every loadable checkpoint format of the tiny world is exported in float32 and loaded back with transformers only.
The references are this project's own loader and model (which other tests hold to the original formats and to
transformers' Llava with hand-mapped weights): logits within 1e-5, identical greedy tokens, identical prompt ids
(processor + chat template vs ``tokenizer_image_token`` on the conversation template) and identical pixels.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from palo.cli import main as palo_main
from palo.constants import IMAGE_TOKEN_INDEX
from palo.conversation import MPT_SYSTEM_PREFIX, SeparatorStyle, conv_templates
from palo.export import ExportError, export_hf_llava
from palo.export.chat_template import ChatTemplateError, chat_template_for
from palo.mm_utils import process_images, tokenizer_image_token
from palo.model.builder import load_pretrained_model
from palo.testing import tiny

QUESTIONS = {
    "english": "What is in this picture? Describe it.",
    "chinese": "这张图片里有什么？",
    "arabic": "ما الذي يظهر في هذه الصورة؟",
    "hindi": "इस चित्र में क्या है?",
    "bengali": "এই ছবিতে কী আছে?",
    "urdu": "اس تصویر میں کیا ہے؟",
    "japanese": "この画像には何がありますか？",
    "russian": "Что на изображении?",
    "spanish": "¿Qué hay en la imagen?",
    "french": "Qu'y a-t-il sur l'image ?",
}


def _image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height), tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = (int(v) for v in torch.randint(0, min(width, height) // 2, (2,), generator=g))
        draw.ellipse([x0, y0, x0 + width // 3, y0 + height // 3],
                     fill=tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g)))
    return image


def _palo_prompt(turns: list[str | None], images: int, conv_mode: str = "vicuna_v1", system: str | None = None) -> str:
    conv = conv_templates[conv_mode].copy()
    if system is not None:  # as the OpenAI API renders a system message: ChatML's gets its tag
        conv.system = (MPT_SYSTEM_PREFIX if conv.sep_style is SeparatorStyle.MPT else "") + system
    for i, text in enumerate(turns):
        if i == 0 and text is not None:
            text = "<image>\n" * images + text
        conv.append_message(conv.roles[i % 2], text)
    return conv.get_prompt()


def _messages(turns: list[str | None], images: int, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i, text in enumerate(turns):
        if text is None:
            break
        if i == 0:
            content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        else:
            content = [{"type": "text", "text": text}]
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
    return messages


def _expand(ids: list[int], image_token_id: int, n: int) -> list[int]:
    out: list[int] = []
    for token in ids:
        out.extend([image_token_id] * n if token == IMAGE_TOKEN_INDEX else [token])
    return out


@pytest.fixture(scope="module")
def exports(world, tmp_path_factory):
    """Each loadable format exported in float32, with the PALO model it must reproduce."""
    out = tmp_path_factory.mktemp("exports")
    cases = {
        "full_safetensors": (world.full_dir, None),
        "full_bin_sharded": (world.full_bin_dir, None),
        "lora_plus_base": (world.lora_dir, world.base_dir),
        "stage1_plus_base": (world.projector_dir, world.base_dir),
    }
    result = {}
    for name, (path, base) in cases.items():
        folder = str(out / name)
        # A small shard limit so every export is sharded like the released 7B/13B checkpoints.
        export = export_hf_llava(path, folder, base, dtype="float32", max_shard_size="150KB")
        tokenizer, model, processor, _ = load_pretrained_model(path, base, device="cpu", dtype=torch.float32)
        result[name] = (export, tokenizer, model, processor)
    return result


FORMATS = ["full_safetensors", "full_bin_sharded", "lora_plus_base", "stage1_plus_base"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_transformers_alone_gives_palo_logits_and_greedy_tokens(exports, fmt):
    export, tokenizer, palo, palo_processor = exports[fmt]
    hf = LlavaForConditionalGeneration.from_pretrained(export.output_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(export.output_dir)
    vocab = palo.get_input_embeddings().weight.shape[0]
    cases = [("english", (80, 48)), ("chinese", (40, 90)), ("arabic", (56, 56)), ("hindi", (120, 60))]
    for i, (language, size) in enumerate(cases):
        image = _image(*size, seed=i)
        turns = [QUESTIONS[language], None]
        text = processor.apply_chat_template(_messages(turns, 1), add_generation_prompt=True)
        inputs = processor(images=[image], text=text, return_tensors="pt", add_special_tokens=False)
        ids = tokenizer_image_token(_palo_prompt(turns, 1), tokenizer, return_tensors="pt")[None]
        pixels = process_images([image], palo_processor, palo.config)
        assert inputs["input_ids"][0].tolist() == _expand(ids[0].tolist(), export.image_token_id,
                                                          export.num_image_tokens)
        torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=0, atol=0)
        with torch.no_grad():
            ours = palo(input_ids=ids, images=pixels).logits
            theirs = hf(**inputs).logits
            # The image rows themselves, tighter than the logits: a random tiny LLM damps small projector
            # differences (tanh-GELU for exact GELU stays within 1e-5 on the logits, not here).
            features = torch.stack(hf.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
            torch.testing.assert_close(features, palo.encode_images(pixels), rtol=1e-6, atol=1e-7)
        assert theirs.shape[:2] == ours.shape[:2] and theirs.shape[-1] == vocab + 1
        torch.testing.assert_close(theirs[..., :vocab], ours, rtol=1e-5, atol=1e-5)
        assert (theirs[..., vocab] == 0).all()  # the <image> row of lm_head is zero
        with torch.no_grad():
            ours_gen = palo.generate(ids, images=pixels, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
            theirs_gen = hf.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert ours_gen.tolist() == theirs_gen.tolist(), language


def test_lora_export_differs_from_base_projector_export(exports):
    """The LoRA export really carries the merged adapter (else the format comparison above proves little)."""
    lora = LlavaForConditionalGeneration.from_pretrained(exports["lora_plus_base"][0].output_dir)
    stage1 = LlavaForConditionalGeneration.from_pretrained(exports["stage1_plus_base"][0].output_dir)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(lora.state_dict()[q], stage1.state_dict()[q])


@pytest.mark.parametrize("language", sorted(QUESTIONS))
def test_processor_and_chat_template_give_tokenizer_image_token_ids(exports, language):
    export, tokenizer, _, _ = exports["full_safetensors"]
    processor = AutoProcessor.from_pretrained(export.output_dir)
    other = QUESTIONS["english" if language != "english" else "french"]
    conversations = [
        ([QUESTIONS[language], None], 1, None),
        ([QUESTIONS[language], "  " + other + " ", other + "\n" + QUESTIONS[language], None], 1, None),
        ([QUESTIONS[language], None], 2, "Réponds brièvement. 简短回答。"),
        ([QUESTIONS[language], None], 0, None),
    ]
    fast = AutoTokenizer.from_pretrained(export.output_dir)
    for turns, n_images, system in conversations:
        messages = _messages(turns, n_images, system)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        # The template carries the BOS, as chat templates do: vLLM's and SGLang's chat APIs and the tokenizer's
        # apply_chat_template add no special tokens (without it their prompts lacked PALO's <s>).
        assert text == "<s>" + _palo_prompt(turns, n_images, system=system)
        images = [_image(70, 50, seed=s) for s in range(n_images)] or None
        ids = processor(images=images, text=text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        expected = tokenizer_image_token(_palo_prompt(turns, n_images, system=system), tokenizer)
        assert ids[0].tolist() == _expand(expected, export.image_token_id, export.num_image_tokens)
        assert fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False
                                        ) == _expand(expected, export.image_token_id, 1)


def test_exported_tokenizer_matches_palo_on_plain_text(exports, world):
    from palo.testing.corpus import all_text

    export, tokenizer, _, _ = exports["full_safetensors"]
    fast = AutoTokenizer.from_pretrained(export.output_dir)
    texts = all_text() + [" leading space", "  two", "a</s>USER: b", "\n\nnewlines", "tab\tx", "emoji 🙂 ok"]
    for text in texts:
        assert fast(text).input_ids == tokenizer(text).input_ids, text
        assert fast.decode(fast(text).input_ids, skip_special_tokens=True) == tokenizer.decode(
            tokenizer(text).input_ids, skip_special_tokens=True)


@pytest.mark.parametrize("conv_mode", ["vicuna_v1", "llava_v1", "llava_v0", "mpt", "chatml_direct", "llama_2",
                                       "llava_llama_2", "mistral_instruct"])
def test_chat_template_renders_get_prompt(exports, conv_mode):
    fast = AutoTokenizer.from_pretrained(exports["full_safetensors"][0].output_dir)
    template = chat_template_for(conv_mode)
    for turns, n_images, system in [
        (["Q1 " + QUESTIONS["hindi"], None], 1, None),
        (["Q1", "A1 " + QUESTIONS["urdu"], "Q2", None], 2, None),
        (["Q1", "A1", "Q2", "A2"], 0, "custom system"),
    ]:
        open_turn = turns[-1] is None
        rendered = fast.apply_chat_template(_messages(turns, n_images, system), chat_template=template,
                                            tokenize=False, add_generation_prompt=open_turn)
        assert rendered == _palo_prompt(turns, n_images, conv_mode, system), conv_mode


@pytest.mark.parametrize("conv_mode", ["plain", "v0", "v1_mmtag", "no_such_template"])
def test_chat_template_refuses_what_it_cannot_render(conv_mode):
    with pytest.raises(ChatTemplateError):
        chat_template_for(conv_mode)


def test_folder_layout(exports):
    export = exports["full_bin_sharded"][0]
    files = set(os.listdir(export.output_dir))
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= files
    assert len(export.weight_files) > 1 and set(export.weight_files) <= files
    with open(os.path.join(export.output_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map.values()) == set(export.weight_files)
    # The published llava-hf key names, which transformers 4.x, vLLM and SGLang read.
    prefixes = {key.split(".")[0] for key in weight_map}
    assert prefixes == {"language_model", "vision_tower", "multi_modal_projector"}
    with open(os.path.join(export.output_dir, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and "auto_map" not in config
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    with open(os.path.join(export.output_dir, "preprocessor_config.json")) as f:
        assert json.load(f)["do_pad"] is True  # the tiny world trains with image_aspect_ratio "pad"


def _assert_exact_in_transformers(ckpt: str, output_dir: str) -> None:
    """The export of ``ckpt`` gives PALO's logits for a Japanese question about an image, in transformers."""
    hf = LlavaForConditionalGeneration.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)
    tokenizer, palo, palo_processor, _ = load_pretrained_model(ckpt, device="cpu", dtype=torch.float32)
    image = _image(90, 40, seed=3)
    turns = [QUESTIONS["japanese"], None]
    inputs = processor(images=[image],
                       text=processor.apply_chat_template(_messages(turns, 1), add_generation_prompt=True),
                       return_tensors="pt", add_special_tokens=False)
    assert "token_type_ids" not in inputs  # Llava's generate refuses it
    ids = tokenizer_image_token(_palo_prompt(turns, 1), tokenizer, return_tensors="pt")[None]
    pixels = process_images([image], palo_processor, palo.config)  # "square": resize + centre crop, no pad
    torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=0, atol=0)
    with torch.no_grad():
        ours = palo(input_ids=ids, images=pixels).logits
        theirs = hf(**inputs).logits[..., : ours.shape[-1]]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_a_scaled_rope_is_written_for_transformers_4_readers_too(world, tmp_path):
    """transformers 5 writes RoPE as one ``rope_parameters`` dict, which 4.x (what vLLM and SGLang pin) ignores:
    a base with another theta or a scaled RoPE was read with theta 10000 and no scaling, and vLLM on 4.x wrote
    that default over the theta. The legacy keys are added; transformers 5 still reads the same model."""
    from palo.model.tokenizer import load_tokenizer

    palo_tok = load_tokenizer(world.tokenizer_dir)
    config = tiny.palo_config_dict(tiny.tiny_llama_config(len(palo_tok)), world.clip_dir, image_aspect_ratio="square")
    config.pop("rope_parameters", None)
    config.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0})
    model = tiny.build_palo_model(config, world.clip_dir, seed=7)
    ckpt = tiny.write_full_checkpoint(str(tmp_path / "rope_ckpt"), model, config, world.tokenizer_dir)
    export = export_hf_llava(ckpt, str(tmp_path / "rope_hf"), dtype="float32")
    with open(os.path.join(export.output_dir, "config.json"), encoding="utf-8") as f:
        text = json.load(f)["text_config"]
    assert text["rope_theta"] == 500000.0
    assert text["rope_scaling"]["type"] == text["rope_scaling"]["rope_type"] == "linear"
    assert text["rope_scaling"]["factor"] == 4.0
    _assert_exact_in_transformers(ckpt, export.output_dir)
    with open(os.path.join(export.output_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        assert json.load(f)["model_input_names"] == ["input_ids", "attention_mask"]  # 4.x added token_type_ids


def test_linear_projector_exports_exactly(world, tmp_path, caplog):
    """``linear`` has no second layer: exported as linear_1 + identity activation + identity linear_2 (which vLLM's
    Llava refuses: the export says so)."""
    from palo.model.tokenizer import load_tokenizer

    palo_tok = load_tokenizer(world.tokenizer_dir)
    config = tiny.palo_config_dict(tiny.tiny_llama_config(len(palo_tok)), world.clip_dir, projector_type="linear",
                                   image_aspect_ratio="square")
    model = tiny.build_palo_model(config, world.clip_dir, seed=5)
    ckpt = tiny.write_full_checkpoint(str(tmp_path / "linear_ckpt"), model, config, world.tokenizer_dir)
    with caplog.at_level(logging.WARNING, logger="palo.export.hf_llava"):
        export = export_hf_llava(ckpt, str(tmp_path / "linear_hf"), dtype="float32")
    assert any("vLLM's Llava takes no identity activation" in r.getMessage() for r in caplog.records)
    _assert_exact_in_transformers(ckpt, export.output_dir)


def test_a_failed_export_leaves_nothing_and_overwrite_replaces_only_its_own_files(world, tmp_path, monkeypatch):
    from palo.export import hf_llava

    def fail(*args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "parent" / "hf"
    with monkeypatch.context() as patch:
        patch.setattr(hf_llava, "_add_legacy_keys", fail)  # after the weights are written
        with pytest.raises(OSError, match="disk full"):
            export_hf_llava(world.full_dir, str(out), dtype="float32")
    assert not out.exists() and os.listdir(tmp_path / "parent") == []  # no half folder, no staging folder left
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "config.json").write_text("{}")
    export = export_hf_llava(world.full_dir, str(out), dtype="float32", overwrite=True)
    assert export.output_dir == str(out) and (out / "README.md").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    assert sorted(os.listdir(tmp_path / "parent")) == ["hf"]
    LlavaForConditionalGeneration.from_pretrained(str(out))  # whole
    # Over that export, a sharded one: the earlier model.safetensors goes (transformers read it instead of the shards).
    export_hf_llava(world.full_dir, str(out), dtype="float16", overwrite=True, max_shard_size="100KB")
    weights = sorted(f for f in os.listdir(out) if f.startswith("model"))
    assert "model.safetensors" not in weights and "model.safetensors.index.json" in weights and len(weights) > 2
    assert LlavaForConditionalGeneration.from_pretrained(str(out)).dtype == torch.float16
    # The checkpoint itself (or a folder holding it) is never an output: the export would replace what it reads.
    for inside in (world.full_dir, os.path.dirname(world.full_dir)):
        with pytest.raises(hf_llava.ExportError, match="holds the checkpoint"):
            export_hf_llava(world.full_dir, inside, overwrite=True)


def test_ldpnet_is_refused_clearly_before_anything_is_written(world, tmp_path):
    out = tmp_path / "ldp_hf"
    with pytest.raises(ExportError, match="ldpnet.*no transformers Llava equivalent"):
        export_hf_llava(world.ldp_dir, str(out))
    assert not out.exists()


def test_deep_mlp_projector_is_refused(world, tmp_path):
    from palo.model.tokenizer import load_tokenizer

    config = tiny.palo_config_dict(tiny.tiny_llama_config(len(load_tokenizer(world.tokenizer_dir))), world.clip_dir,
                                   projector_type="mlp3x_gelu")
    model = tiny.build_palo_model(config, world.clip_dir)
    ckpt = tiny.write_full_checkpoint(str(tmp_path / "mlp3"), model, config, world.tokenizer_dir)
    with pytest.raises(ExportError, match="exactly two"):
        export_hf_llava(ckpt, str(tmp_path / "mlp3_hf"))


def test_cli_verb(world, tmp_path, capsys):
    out = tmp_path / "cli_out"
    assert palo_main(["export", "--to", "hf-llava", "--model-path", world.full_dir, "--output", str(out),
                      "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "config.json").is_file()
    # A non-empty output folder, an ldpnet checkpoint and a LoRA folder without its base: clear errors, exit 2.
    assert palo_main(["export", "--to", "hf-llava", "--model-path", world.full_dir, "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert palo_main(["export", "--to", "hf-llava", "--model-path", world.ldp_dir,
                      "--output", str(tmp_path / "x")]) == 2
    assert "ldpnet" in capsys.readouterr().err
    assert palo_main(["export", "--to", "hf-llava", "--model-path", world.lora_dir,
                      "--output", str(tmp_path / "y")]) == 2
    assert "--model-base" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("notes")
    assert palo_main(["export", "--to", "hf-llava", "--model-path", world.full_dir, "--output",
                      str(tmp_path / "a_file"), "--overwrite"]) == 2
    assert f"'{tmp_path / 'a_file'}' is a file; pass a folder to write" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "notes"
    with pytest.raises(SystemExit):
        palo_main(["export", "--to", "onnx", "--model-path", world.full_dir, "--output", str(tmp_path / "z")])
    with pytest.raises(SystemExit):  # an empty --output (it staged a whole export beside the working folder)
        palo_main(["export", "--to", "hf-llava", "--model-path", world.full_dir, "--output", ""])
    assert "--output must name a folder" in capsys.readouterr().err
    # An output under a file, or where nothing can be written: one line, no traceback.
    for output in (str(tmp_path / "a_file" / "sub"), "/proc/no-such/out"):
        assert palo_main(["export", "--to", "hf-llava", "--model-path", world.full_dir, "--output", output]) == 2
        err = capsys.readouterr().err
        assert "error: " in err and "Traceback" not in err


@pytest.mark.parametrize("target", ["hf-llava", "gguf"])
def test_a_damaged_checkpoint_is_named_not_a_traceback(world, tmp_path, capsys, target):
    import shutil

    def damaged(name: str, damage) -> str:
        folder = tmp_path / name
        shutil.copytree(world.full_dir, folder)
        damage(folder)
        return str(folder)

    def cut(folder):
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(os.path.getsize(folder / "model.safetensors") // 2)

    def retype(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": str(config["hidden_size"])}))

    def untokenized(folder):
        for name in os.listdir(folder):
            if name.startswith("tokenizer") or name == "special_tokens_map.json":
                os.remove(folder / name)

    for name, damage, why in (("cut", cut, "a file cannot be read (SafetensorError"),
                              ("retyped", retype, "a file cannot be read (StrictDataclass"),
                              ("notjson", lambda f: (f / "config.json").write_text("{"), "config"),
                              ("untokenized", untokenized, "")):
        out = tmp_path / f"out-{name}"
        assert palo_main(["export", "--to", target, "--model-path", damaged(name, damage), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and "Traceback" not in err, err
        assert not out.exists()
    # Cut pickles (.bin): each said with its file or folder (a traceback, or an "[Errno 22] Invalid argument" that
    # named nothing), and a folder that lost its SentencePiece model (it exported as a 3-token model).
    for name, source, file, base, why in (
            ("cut-shard", world.full_bin_dir, "pytorch_model-00001-of-00002.bin", None, "(RuntimeError"),
            ("cut-projector", world.projector_dir, "mm_projector.bin", world.base_dir, "mm_projector.bin cannot be"),
            ("cut-non-lora", world.lora_dir, "non_lora_trainables.bin", world.base_dir, "non_lora_trainables.bin "),
            ("cut-adapter", world.lora_dir, None, world.base_dir, "the LoRA adapter cannot be read"),
            ("no-sp-model", world.full_dir, "tokenizer.model", None, "holds neither its tokenizer.model")):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        if file is None:  # the adapter, in whichever format it was saved
            file = next(n for n in os.listdir(folder) if n.startswith("adapter_model."))
        if name == "no-sp-model":
            os.remove(folder / file)
        else:
            with open(folder / file, "r+b") as f:
                f.truncate(os.path.getsize(folder / file) // 2)
        out = tmp_path / f"out-{name}"
        argv = ["export", "--to", target, "--model-path", str(folder), "--output", str(out)]
        assert palo_main(argv + (["--model-base", base] if base else [])) == 2, name
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after the base's loading bar, for those with a base
        assert last.startswith("error: ") and why in last and str(folder) in last and "Traceback" not in err, err
        assert not out.exists()


def test_config_without_im_patch_key_keeps_the_loaders_extra_token(world, tmp_path):
    """Original configs may lack ``mm_use_im_patch_token``: the loader then adds ``<im_patch>`` (one more row), so
    ``<image>`` comes after it and every id and logit still matches."""
    from palo.model.tokenizer import load_tokenizer

    base_vocab = len(load_tokenizer(world.tokenizer_dir))
    config = {k: v for k, v in world.config.items() if k != "mm_use_im_patch_token"}
    model = tiny.build_palo_model(config, world.clip_dir, seed=7)
    model.resize_token_embeddings(base_vocab + 1)
    ckpt = tiny.write_full_checkpoint(str(tmp_path / "patch_ckpt"), model, dict(config, vocab_size=base_vocab + 1),
                                      world.tokenizer_dir)
    export = export_hf_llava(ckpt, str(tmp_path / "patch_hf"), dtype="float32")
    assert export.image_token_id == base_vocab + 1
    fast = AutoTokenizer.from_pretrained(export.output_dir)
    assert fast.convert_tokens_to_ids("<im_patch>") == base_vocab
    tokenizer, palo, palo_processor, _ = load_pretrained_model(ckpt, device="cpu", dtype=torch.float32)
    hf = LlavaForConditionalGeneration.from_pretrained(export.output_dir).eval()
    processor = AutoProcessor.from_pretrained(export.output_dir)
    image = _image(64, 64, seed=9)
    turns = [QUESTIONS["bengali"], None]
    inputs = processor(images=[image],
                       text=processor.apply_chat_template(_messages(turns, 1), add_generation_prompt=True),
                       return_tensors="pt", add_special_tokens=False)
    ids = tokenizer_image_token(_palo_prompt(turns, 1), tokenizer, return_tensors="pt")[None]
    assert inputs["input_ids"][0].tolist() == _expand(ids[0].tolist(), export.image_token_id, export.num_image_tokens)
    with torch.no_grad():
        ours = palo(input_ids=ids, images=process_images([image], palo_processor, palo.config)).logits
        theirs = hf(**inputs).logits[..., : ours.shape[-1]]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_default_dtype_is_the_checkpoints_or_float16(world, tmp_path):
    from safetensors import safe_open

    export = export_hf_llava(world.full_dir, str(tmp_path / "fp16"))  # the tiny config records no torch_dtype
    with safe_open(os.path.join(export.output_dir, export.weight_files[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    with open(os.path.join(export.output_dir, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "float16"
    hf = LlavaForConditionalGeneration.from_pretrained(export.output_dir)
    assert hf.dtype == torch.float16


def test_a_mobilevlm_config_exports_as_the_loader_reads_it(world, tmp_path):
    """MobileVLM's flat config (``model_type`` ``mobilevlm``, unknown to transformers) loads through
    load_pretrained_model but both exports refused it: they read the config with AutoConfig, not as the loader."""
    config = dict(world.config, model_type="mobilevlm", architectures=["MobileLlamaForCausalLM"],
                  vision_tower_type="clip")
    ckpt = tiny.write_full_checkpoint(str(tmp_path / "mobilevlm"), world.model, config, world.tokenizer_dir)
    export = export_hf_llava(ckpt, str(tmp_path / "hf"), dtype="float32")
    hf = LlavaForConditionalGeneration.from_pretrained(export.output_dir).eval()
    reference = export_hf_llava(world.full_dir, str(tmp_path / "reference"), dtype="float32")
    expected = LlavaForConditionalGeneration.from_pretrained(reference.output_dir).state_dict()
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("target", ["hf-llava", "gguf"])
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(world, tmp_path, target):
    """On a full disk hf-llava died with safetensors' SafetensorError traceback (the command caught OSError only) and
    gguf said only numpy's "8192 requested and 2768 written". Here a file-size limit stops the writes, and for gguf
    the free space numpy's short write is judged by reads as none left, as on the full disk."""
    import subprocess
    import sys

    out = tmp_path / "parent" / target
    script = ("import resource, shutil, signal, sys, types; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10)); "
              "shutil.disk_usage = lambda path: types.SimpleNamespace(total=1 << 30, used=1 << 30, free=0); "
              "from palo.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, "export", "--to", target, "--model-path", world.full_dir,
                           "--output", str(out)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]  # after the loading bar
    cause = "File too large" if target == "hf-llava" else "No space left on device"
    assert last.startswith(f"error: cannot write --output {out} (") and f"): {cause}; nothing of this" in last, last
    assert os.listdir(tmp_path / "parent") == []  # no half export, no staging folder
