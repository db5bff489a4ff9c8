"""``palo export --to gguf``: the two files llama.cpp's multimodal tools load.

Always: the files, read back with gguf's own reader, hold every weight of the loaded model (q/k rows in llama.cpp's
rotary order), the vocabulary and the metadata llama.cpp reads, at each storage type; refusals are clear and leave
nothing behind. tests/export/test_gguf_llama_cpp.py runs the files in llama.cpp itself.
"""

from __future__ import annotations

import os

import gguf
import jinja2
import numpy as np
import pytest
import torch

from palo.cli import main as palo_main
from palo.conversation import conv_templates
from palo.export import ExportError
from palo.export.gguf import MEDIA_MARKER, _rotary_rows, export_gguf
from palo.model.builder import load_pretrained_model
from palo.model.tokenizer import sentencepiece_model_proto
from palo.testing import tiny


def _fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    """Each tensor as float32 in the model's (row-major) shape."""
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else np.asarray(t.data)
        out[t.name] = data.astype(np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))
    return out


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    """The full checkpoint exported at every storage type."""
    root = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(world.full_dir, str(root / t), outtype=t, name="tiny") for t in ("f32", "f16", "bf16",
                                                                                          "q8_0")}


@pytest.fixture(scope="module")
def ldp_world(world, tmp_path_factory):
    """An ldpnet checkpoint on a CLIP at 336 pixels (the 24 x 24 grid llama.cpp's LDP graph lays out)."""
    root = tmp_path_factory.mktemp("ldp336")
    clip_dir = tiny.save_tiny_clip(str(root / "clip336"), tiny.TinyShapes(image_size=336))
    config = tiny.palo_config_dict(tiny.tiny_llama_config(world.config["vocab_size"]), clip_dir,
                                   projector_type="ldpnet")
    model = tiny.build_palo_model(config, clip_dir, seed=3)
    return tiny.write_full_checkpoint(str(root / "ckpt"), model, config, world.tokenizer_dir)


def _language_model_state(model) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in model.state_dict().items()
            if not k.startswith(("model.vision_tower.", "model.mm_projector.")) and "rotary_emb" not in k}


def test_language_model_file_holds_every_weight_and_the_vocabulary(world, exported):
    reader = gguf.GGUFReader(exported["f32"].model_file)
    fields = _fields(reader)
    config = world.model.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.embedding_length"] == config.hidden_size
    assert fields["llama.attention.head_count"] == config.num_attention_heads
    assert fields["llama.rope.dimension_count"] == config.hidden_size // config.num_attention_heads
    assert fields["llama.context_length"] == config.max_position_embeddings
    proto = sentencepiece_model_proto()()
    with open(os.path.join(world.tokenizer_dir, "tokenizer.model"), "rb") as f:
        proto.ParseFromString(f.read())
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [p.piece for p in proto.pieces]
    assert np.allclose(fields["tokenizer.ggml.scores"], [p.score for p in proto.pieces])
    assert fields["tokenizer.ggml.token_type"] == [p.type for p in proto.pieces]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"], fields["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is True

    tensors = _tensors(reader)
    state = _language_model_state(world.model)
    heads = config.num_attention_heads
    assert len(tensors) == len(state)
    for i in range(config.num_hidden_layers):
        for ours, theirs in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k")):
            weight = state[f"model.layers.{i}.{ours}.weight"]
            assert np.array_equal(tensors[f"blk.{i}.{theirs}.weight"], _rotary_rows(weight, heads))
            assert not np.array_equal(tensors[f"blk.{i}.{theirs}.weight"], weight)
        for ours, theirs in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                             ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                             ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            assert np.array_equal(tensors[f"blk.{i}.{theirs}.weight"], state[f"model.layers.{i}.{ours}.weight"])
    assert np.array_equal(tensors["token_embd.weight"], state["model.embed_tokens.weight"])
    assert np.array_equal(tensors["output.weight"], state["lm_head.weight"])
    assert np.array_equal(tensors["output_norm.weight"], state["model.norm.weight"])


def test_rotary_reordering_pairs_what_transformers_rotates_together():
    """Row i of a head (transformers pairs it with i + d/2) lands at 2i, its partner at 2i + 1."""
    heads, head_dim = 2, 8
    weight = np.arange(heads * head_dim, dtype=np.float32)[:, None].repeat(3, axis=1)
    rows = _rotary_rows(weight, heads)[:, 0].astype(int).tolist()
    assert rows == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_chat_template_renders_the_conversation_template_with_the_media_marker(exported):
    template = _fields(gguf.GGUFReader(exported["f16"].model_file))["tokenizer.chat_template"]
    conv = conv_templates["vicuna_v1"].copy()
    question = "この画像には何がありますか？"
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert rendered == conv.get_prompt().replace("<image>", MEDIA_MARKER)


@pytest.mark.parametrize(("content", "expected"), [
    ("<__media_Xy12__>Qu'y a-t-il ?", "<__media_Xy12__>\nQu'y a-t-il ?"),  # llama-server: [image, text] flattened
    ("Qu'y a-t-il ?<__media_Xy12__>", "<__media_Xy12__>\nQu'y a-t-il ?"),  # [text, image]: the image goes first
    ("<__media__>\nQu'y a-t-il ?", "<__media__>\nQu'y a-t-il ?"),  # a marker written with PALO's newline
    ("<__media__>Qu'y a-t-il ?", "<__media__>\nQu'y a-t-il ?"),  # llama-mtmd-cli puts the marker before -p
    ("<__media_a__><__media_b__>两张", "<__media_a__>\n<__media_b__>\n两张"),
    ("Two  spaces,\nno image", "Two  spaces,\nno image"),
    # [text, image, text] flattened: the two text parts, as PALO joins them, with a newline between
    ("这是什么<__media_Q__>用中文回答", "<__media_Q__>\n这是什么\n用中文回答"),
    ("这是什么\n<__media__>\n用中文回答", "<__media__>\n这是什么\n用中文回答"),
])
def test_chat_template_lays_out_the_markers_llama_cpp_puts_in_strings(exported, content, expected):
    """llama-server turns a message's parts into one string with a marker (<__media_<random>__>) where each image
    was; llama-mtmd-cli prepends <__media__> to the prompt. Either way the template renders PALO's layout."""
    template = _fields(gguf.GGUFReader(exported["f16"].model_file))["tokenizer.chat_template"]
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], expected)
    conv.append_message(conv.roles[1], None)
    rendered = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": content}], add_generation_prompt=True)
    assert rendered == conv.get_prompt()


def test_mmproj_file_stops_at_the_layer_palo_reads(world, exported):
    reader = gguf.GGUFReader(exported["f32"].mmproj_file)
    fields = _fields(reader)
    tower = world.model.get_vision_tower().config
    used = tower.num_hidden_layers - 1  # mm_vision_select_layer -2: the input of the last layer
    assert fields["general.architecture"] == "clip"
    assert fields["clip.projector_type"] == "mlp" and fields["clip.has_vision_encoder"] is True
    assert fields["clip.vision.block_count"] == used and fields["clip.vision.feature_layer"] == [used]
    assert fields["clip.vision.image_size"] == tower.image_size and fields["clip.vision.patch_size"] == 14
    assert fields["clip.use_gelu"] is False  # CLIP's quick GELU
    assert np.allclose(fields["clip.vision.image_mean"], [0.48145466, 0.4578275, 0.40821073])
    tensors = _tensors(reader)
    assert not any(name.startswith(("v.post_ln", f"v.blk.{used}.")) for name in tensors)
    state = {k: v.float().numpy() for k, v in world.model.state_dict().items()}
    clip = "model.vision_tower.vision_tower.vision_model."
    assert np.array_equal(tensors["v.patch_embd.weight"], state[clip + "embeddings.patch_embedding.weight"])
    assert np.array_equal(tensors["v.class_embd"], state[clip + "embeddings.class_embedding"])
    assert np.array_equal(tensors["v.pre_ln.weight"], state[clip + "pre_layrnorm.weight"])
    assert np.array_equal(tensors["v.blk.0.ffn_up.weight"], state[clip + "encoder.layers.0.mlp.fc1.weight"])
    assert np.array_equal(tensors["v.blk.1.ffn_down.bias"], state[clip + "encoder.layers.1.mlp.fc2.bias"])
    assert np.array_equal(tensors["v.blk.1.attn_out.weight"],
                          state[clip + "encoder.layers.1.self_attn.out_proj.weight"])
    for i in (0, 2):
        for part in ("weight", "bias"):
            assert np.array_equal(tensors[f"mm.{i}.{part}"], state[f"model.mm_projector.{i}.{part}"])
    layer_tensors = {n for n in tensors if n.startswith("v.blk.")}
    assert len(layer_tensors) == used * 16


def test_storage_types_round_to_what_they_hold(world, exported):
    """f16 / bf16 hold the rounded weights, q8_0 the language model's matrices within half a quantisation step of
    each block of 32; norms stay float32 and the mmproj of a q8_0 export is f16."""
    state = _language_model_state(world.model)
    gate = state["model.layers.0.mlp.gate_proj.weight"]
    for outtype, expected in (("f16", gate.astype(np.float16).astype(np.float32)),
                              ("bf16", torch.from_numpy(gate).bfloat16().float().numpy())):
        reader = gguf.GGUFReader(exported[outtype].model_file)
        assert np.array_equal(_tensors(reader)["blk.0.ffn_gate.weight"], expected)
    reader = gguf.GGUFReader(exported["q8_0"].model_file)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_gate.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    quantised = _tensors(reader)["blk.0.ffn_gate.weight"]
    # Quantised from the float16 weights it was read at; the block's scale is itself stored in float16.
    blocks = gate.astype(np.float16).astype(np.float32).reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(quantised.reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2.0**-11))
    assert not np.array_equal(quantised, gate)
    mm_types = {t.name: t.tensor_type for t in gguf.GGUFReader(exported["q8_0"].mmproj_file).tensors}
    assert mm_types["mm.0.weight"] == gguf.GGMLQuantizationType.F16
    assert mm_types["v.position_embd.weight"] == gguf.GGMLQuantizationType.F32
    sizes = {t: os.path.getsize(exported[t].model_file) for t in exported}
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]


def test_lora_checkpoint_exports_merged_weights(world, tmp_path):
    written = export_gguf(world.lora_dir, str(tmp_path / "out"), world.base_dir, outtype="f32")
    _, merged, _, _ = load_pretrained_model(world.lora_dir, world.base_dir, device="cpu", device_map=None)
    tensors = _tensors(gguf.GGUFReader(written.model_file))
    state = _language_model_state(merged)
    assert np.array_equal(tensors["blk.1.attn_v.weight"], state["model.layers.1.self_attn.v_proj.weight"])
    assert not np.array_equal(state["model.layers.1.self_attn.v_proj.weight"],
                              world.model.state_dict()["model.layers.1.self_attn.v_proj.weight"].numpy())
    assert os.path.basename(written.model_file) == "finetune_out-f32.gguf"


def test_the_current_folder_exports_under_its_own_name(world, tmp_path, monkeypatch):
    """``--model-path .`` was refused: "name '.' must be a plain file stem"."""
    monkeypatch.chdir(world.full_dir)
    written = export_gguf(".", str(tmp_path / "out"), outtype="f32")
    assert os.path.basename(written.model_file) == os.path.basename(world.full_dir) + "-f32.gguf"


def test_ldp_projector_is_written_as_llama_cpp_reads_it(ldp_world, tmp_path):
    written = export_gguf(ldp_world, str(tmp_path / "out"), outtype="f16")
    reader = gguf.GGUFReader(written.mmproj_file)
    assert _fields(reader)["clip.projector_type"] == "ldp" and written.projector_type == "ldp"
    tensors = _tensors(reader)
    _, model, _, _ = load_pretrained_model(ldp_world, device="cpu", device_map=None)
    # An f16 export reads the checkpoint at float16.
    state = {k[len("model.mm_projector."):]: v.half().float().numpy() for k, v in model.state_dict().items()
             if k.startswith("model.mm_projector.")}
    assert len([n for n in tensors if n.startswith("mm.")]) == len(state) == 24
    hidden = model.config.hidden_size
    depthwise = tensors["mm.model.mb_block.2.block.0.0.weight"]
    assert depthwise.shape == (hidden, 3, 3)  # [C, 1, 3, 3] squeezed, as llama.cpp's depthwise convolution reads it
    assert {t.name: t.tensor_type for t in reader.tensors}["mm.model.mb_block.2.block.0.0.weight"] == (
        gguf.GGMLQuantizationType.F16)  # the only storage ggml's depthwise convolution takes besides bf16
    assert np.array_equal(depthwise, state["model.mb_block.2.block.0.0.weight"].reshape(hidden, 3, 3))
    squeeze = tensors["mm.model.mb_block.1.block.1.fc1.weight"]
    assert squeeze.ndim == 2
    assert np.array_equal(squeeze, state["model.mb_block.1.block.1.fc1.weight"].reshape(squeeze.shape))
    assert np.array_equal(tensors["mm.model.mlp.3.bias"], state["model.mlp.3.bias"])


def test_what_llama_cpp_cannot_run_is_refused_before_anything_is_written(world, tmp_path, monkeypatch):
    import palo.export.gguf as module

    def written(*args, **kwargs):
        raise AssertionError("a file was written for an export that is refused")

    monkeypatch.setattr(module, "_write_language_model", written)
    monkeypatch.setattr(module, "_write_mmproj", written)
    out = str(tmp_path / "out")
    with pytest.raises(ExportError, match="24 x 24"):
        export_gguf(world.ldp_dir, out)  # ldpnet on a 4 x 4 grid
    linear = tiny.palo_config_dict(tiny.tiny_llama_config(world.config["vocab_size"]), world.clip_dir,
                                   projector_type="linear")
    linear_dir = tiny.write_full_checkpoint(str(tmp_path / "linear"), tiny.build_palo_model(linear, world.clip_dir),
                                            linear, world.tokenizer_dir)
    with pytest.raises(ExportError, match="'linear' has no llama.cpp equivalent"):
        export_gguf(linear_dir, out)
    with pytest.raises(ExportError, match="outtype"):
        export_gguf(world.full_dir, out, outtype="q4_k")
    assert not os.path.exists(out)
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").close()
    with pytest.raises(ExportError, match="not empty"):
        export_gguf(world.full_dir, out)
    assert os.listdir(out) == ["keep.txt"]


def test_a_failed_export_leaves_no_files(world, tmp_path, monkeypatch):
    import palo.export.gguf as module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "_write_mmproj", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(world.full_dir, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_cli(world, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert palo_main(["export", "--to", "gguf", "--model-path", world.full_dir, "--output", out,
                      "--outtype", "q8_0", "--name", "palo-tiny"]) == 0
    # The mmproj is named after what it holds: f16 (the vision tower is not quantized).
    assert sorted(os.listdir(out)) == ["mmproj-palo-tiny-f16.gguf", "palo-tiny-q8_0.gguf"]
    assert "q8_0, mlp projector, chat template vicuna_v1" in capsys.readouterr().out
    assert palo_main(["export", "--to", "gguf", "--model-path", world.ldp_dir, "--output", str(tmp_path / "o2")]) == 2
    assert "24 x 24" in capsys.readouterr().err
    for wrong in (["--to", "hf-llava", "--outtype", "f16"], ["--to", "gguf", "--max-shard-size", "1GB"]):
        with pytest.raises(SystemExit) as exit_info:
            palo_main(["export", *wrong, "--model-path", world.full_dir, "--output", str(tmp_path / "o3")])
        assert exit_info.value.code == 2
        assert "applies to --to" in capsys.readouterr().err


def test_hub_id_exports_offline_from_the_local_cache_under_the_repository_name(world, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    hf_home = tmp_path / "hf"
    tiny.install_in_hf_cache(world.full_dir, "test-org/Tiny-PALO", str(hf_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    written = export_gguf("test-org/Tiny-PALO", str(tmp_path / "out"), outtype="f32")
    assert sorted(os.listdir(tmp_path / "out")) == ["Tiny-PALO-f32.gguf", "mmproj-Tiny-PALO-f32.gguf"]
    reader = gguf.GGUFReader(written.model_file)
    assert _fields(reader)["general.name"] == "Tiny-PALO"
    state = _language_model_state(world.model)
    assert np.array_equal(_tensors(reader)["blk.1.ffn_down.weight"], state["model.layers.1.mlp.down_proj.weight"])
