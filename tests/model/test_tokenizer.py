"""Tests for palo.model.tokenizer: the LLaMA SentencePiece tokenizer with transformers-4.31 ("legacy") semantics.

Expected ids come from the raw ``sentencepiece`` library, following docs/formats.md §3.7 item 6: BOS, then every text
segment between the special tokens ``<s>``, ``</s>``, ``<unk>`` encoded by SentencePiece on its own (dummy prefix
included), and each special token as its own id.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import pytest
import sentencepiece as spm
import torch

from palo.model.tokenizer import PaloLlamaTokenizer, load_tokenizer
from palo.testing.corpus import SAMPLES

SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2}  # the LLaMA convention the tiny model is trained with

SYS_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)

# Prompts as vicuna_v1 renders them (typed out by hand), plus whitespace edge cases.
PROMPTS = [
    f"{SYS_V1} USER: What is shown in this image? ASSISTANT: A red circle next to a blue square.</s>"
    "USER: How many triangles are there? ASSISTANT: There are three green triangles.</s>",
    f"{SYS_V1} USER: ما الذي يظهر في هذه الصورة؟ ASSISTANT: تُظهر الصورة دائرة حمراء بجانب مربع أزرق.</s>"
    "USER: 这张图片里有什么？ ASSISTANT: 图片中有一个红色的圆形。</s>USER: इस चित्र में क्या दिखाया गया है? ASSISTANT:",
    f"{SYS_V1} USER: <image>\nDescribe the scene in detail, please. ASSISTANT: The lake is calm.</s>",
    " leading space",
    "  two leading spaces and  a double  space",
    "line one\nline two\n\nline four\n",
    "\n",
    "a </s> b",  # whitespace next to a special token is kept (AddedToken lstrip/rstrip False)
    "</s></s>USER:",
    "<s>x<unk>y",
    "ends with a space ",
]


def emulate(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """The 4.31 slow LlamaTokenizer (legacy): BOS, then special ids and ``sp.encode`` of each segment between them."""
    ids = [SPECIAL_IDS["<s>"]]
    for part in re.split(r"(<s>|</s>|<unk>)", text):
        if not part:
            continue
        ids.extend([SPECIAL_IDS[part]] if part in SPECIAL_IDS else sp.encode(part))
    return ids


def emulate_non_legacy(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """The 4.31 slow LlamaTokenizer when the config says ``"legacy": false`` (its ``tokenize``/``_tokenize``, checked
    against transformers 4.31.0 itself on 18 prompts): "▁" + the text with its own "▁" as spaces; the first
    segment keeps that one dummy prefix, and a later segment that does not begin with a space loses the "▁" of its
    first piece."""
    ids = [SPECIAL_IDS["<s>"]]
    for part in re.split(r"(<s>|</s>|<unk>)", "▁" + text.replace("▁", " ")):
        if not part:
            continue
        if part in SPECIAL_IDS:
            ids.append(SPECIAL_IDS[part])
            continue
        first = part.startswith("▁")
        part = part[1:] if first else part
        pieces = sp.encode(part, out_type=str)
        if not first and not part.startswith(" ") and pieces and pieces[0].startswith("▁"):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        ids.extend(sp.piece_to_id(piece) for piece in pieces)
    return ids


@pytest.fixture(scope="module")
def tokenizer(world):
    return load_tokenizer(world.tokenizer_dir)


@pytest.fixture(scope="module")
def sp(world) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=os.path.join(world.tokenizer_dir, "tokenizer.model"))


def test_load_picks_palo_llama_tokenizer(tokenizer):
    assert isinstance(tokenizer, PaloLlamaTokenizer)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize("language", sorted(SAMPLES))
def test_round_trip_every_language(tokenizer, sp, language):
    for sentence in SAMPLES[language]:
        ids = tokenizer(sentence).input_ids
        assert ids[0] == 1 and 2 not in ids  # BOS, no EOS
        assert ids == [1] + sp.encode(sentence)
        assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


@pytest.mark.parametrize(
    "text",
    ["😀🎨 emoji", "สวัสดีครับ", "Ελληνικά και ქართული", "mixed 中文 and ไทย 🙂!"],
)
def test_round_trip_byte_fallback(tokenizer, sp, text):
    ids = tokenizer(text).input_ids
    assert 0 not in ids  # byte fallback: never <unk>
    # Characters outside the corpus become <0x..> byte pieces.
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert any(re.fullmatch(r"<0x[0-9A-F]{2}>", p) for p in pieces)
    assert ids == [1] + sp.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", PROMPTS)
def test_ids_match_legacy_sentencepiece_emulation(tokenizer, sp, text):
    assert tokenizer(text).input_ids == emulate(sp, text)


def test_segment_after_eos_gets_dummy_prefix(tokenizer, sp):
    # The legacy behaviour PALO's label masking relies on: "USER:" after "</s>" tokenizes like a fresh string.
    ids = tokenizer("ok</s>USER:").input_ids
    assert ids == [1] + sp.encode("ok") + [2] + sp.encode("USER:")
    assert sp.id_to_piece(ids[len(sp.encode("ok")) + 2]).startswith("▁")
    # And a leading space is kept, not merged into the dummy prefix: " x" is "▁" + "▁x".
    assert tokenizer.convert_ids_to_tokens(tokenizer(" x").input_ids[1:]) == sp.encode(" x", out_type=str)
    assert sp.encode(" x", out_type=str)[0] == "▁"


def test_saved_config_names_llama_tokenizer_and_reloads(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert (tmp_path / "tokenizer.model").is_file()
    reloaded = load_tokenizer(str(tmp_path))
    assert isinstance(reloaded, PaloLlamaTokenizer)
    for text in PROMPTS:
        assert reloaded(text).input_ids == tokenizer(text).input_ids
    # transformers' own tokenizer (AutoTokenizer, as vLLM and SGLang load it) reads the folder with BOS too: without
    # add_bos_token in the config it encoded every prompt without the <s> the model was trained with.
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)
    assert theirs("Hello").input_ids[0] == tokenizer.bos_token_id and theirs("Hello").input_ids[-1] != \
        tokenizer.eos_token_id


def _added_token(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def test_loads_transformers_431_folder(world, sp, tmp_path):
    """A tokenizer folder as transformers 4.31 wrote it for vicuna-7b-v1.5 / PALO checkpoints."""
    shutil.copy(os.path.join(world.tokenizer_dir, "tokenizer.model"), tmp_path / "tokenizer.model")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>"),
        "legacy": False,  # vicuna's config says False, and 4.31's slow tokenizer followed it
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>"),
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    strip = lambda d: {k: v for k, v in d.items() if k != "__type"}  # noqa: E731
    special_map = {
        "bos_token": strip(_added_token("<s>")),
        "eos_token": strip(_added_token("</s>")),
        "pad_token": "<unk>",
        "unk_token": strip(_added_token("<unk>")),
    }
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))

    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, PaloLlamaTokenizer)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.model_max_length == 2048
    assert (tok.pad_token, tok.pad_token_id) == ("<unk>", 0)  # from special_tokens_map.json
    for text in PROMPTS:
        assert tok(text).input_ids == emulate_non_legacy(sp, text)
    # Before, the flag was ignored: "USER" after "</s>" kept a "▁" that 4.31 took away.
    assert tok("ok</s>USER:").input_ids != emulate(sp, "ok</s>USER:")
    tok.save_pretrained(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["legacy"] is False
    assert load_tokenizer(str(tmp_path / "saved"))("ok</s>USER:").input_ids == emulate_non_legacy(sp, "ok</s>USER:")
    config.pop("legacy")  # no key: 4.31's default, the legacy rule
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    assert load_tokenizer(str(tmp_path))("ok</s>USER:").input_ids == emulate(sp, "ok</s>USER:")


def test_whitespace_beside_an_added_image_token_is_dropped_as_431_dropped_it(world, sp):
    """4.31 held tokens added at load (<im_start>, <im_end>, <im_patch>) as plain strings and stripped the
    whitespace on both sides of them (checked against transformers 4.31.0); the config's own special tokens strip
    only where their lstrip/rstrip say (Vicuna's: nowhere)."""
    tok = load_tokenizer(world.tokenizer_dir)
    tok.add_tokens(["<im_patch>", "<im_start>", "<im_end>"], special_tokens=True)
    start, end = tok.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    ids = tok("USER: <im_start> x <im_end>\nWhat").input_ids
    assert ids == [1, *sp.encode("USER:"), start, *sp.encode("x"), end, *sp.encode("What")]
    assert tok("a </s> b").input_ids == emulate(sp, "a </s> b")  # </s> keeps its neighbours' spaces


def test_right_padding_with_unk_as_pad(world, sp):
    tok = load_tokenizer(world.tokenizer_dir)
    tok.pad_token = tok.unk_token  # what PALO's training and the builder do for LLaMA
    assert tok.pad_token_id == 0
    texts = ["Hi", "What is shown in this image?"]
    batch = tok(texts, padding="longest", return_tensors="pt")
    short, long = [1] + sp.encode(texts[0]), [1] + sp.encode(texts[1])
    assert len(short) < len(long)
    n_pad = len(long) - len(short)
    expected_ids = torch.tensor([short + [0] * n_pad, long])
    expected_mask = torch.tensor([[1] * len(short) + [0] * n_pad, [1] * len(long)])
    assert torch.equal(batch.input_ids, expected_ids)
    assert torch.equal(batch.attention_mask, expected_mask)


def test_folder_without_tokenizer_files_raises(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="No tokenizer files") as info:
        load_tokenizer(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message
    assert "tokenizer.model" in message and "--model-base" in message


def test_streaming_decoder_gives_the_decoding_of_every_window(world):
    """Random windows of plain, byte-fallback, special and added ids decode as ``decode(skip_special_tokens=True)``
    does, with the image tokens that mm_use_im_start_end checkpoints add (special or not) and unk as pad."""
    tok = load_tokenizer(world.tokenizer_dir)
    tok.pad_token = tok.unk_token
    tok.add_tokens(["<im_patch>"], special_tokens=True)
    tok.add_tokens(["<im_start>", "<im_end>"])
    tok.add_tokens([tok.convert_ids_to_tokens(300)])  # a piece registered again as an added token keeps its id
    decode = tok.streaming_decoder()
    rng = random.Random(0)
    size = len(tok)
    pieces = tok.sp_model.get_piece_size()
    assert size == pieces + 3
    byte_ids = [i for i in range(pieces) if tok.convert_ids_to_tokens(i).startswith("<0x")]
    pools = [range(size), byte_ids, [0, 1, 2, 300, pieces, pieces + 1, pieces + 2]]
    windows = [[rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 10))] for _ in range(4000)]
    windows += [tok(text, add_special_tokens=False).input_ids for text in PROMPTS]
    for ids in windows:
        assert decode(ids) == tok.decode(ids, skip_special_tokens=True), ids


def test_streaming_piece_texts_extend_every_non_empty_decoding(world):
    """For each id with a piece text, appending it to any window that decodes to some text adds exactly that text
    (byte runs, specials and added tokens before it included); ids that need a decode have none."""
    tok = load_tokenizer(world.tokenizer_dir)
    tok.add_tokens(["<im_patch>"], special_tokens=True)
    tok.add_tokens(["<im_start>"])
    tok.add_tokens([tok.convert_ids_to_tokens(300)])  # a piece registered again as an added token
    texts = tok.streaming_piece_texts()
    pieces = tok.sp_model.get_piece_size()
    assert len(texts) == pieces
    none = {i for i, t in enumerate(texts) if t is None}
    byte_ids = [i for i in range(pieces) if tok.sp_model.is_byte(i)]
    assert {0, 1, 2, 300} | set(byte_ids) <= none and len(none) < pieces // 2
    assert any(t.startswith(" ") for t in texts if t)  # word-initial pieces carry their space
    rng = random.Random(1)
    with_text = [i for i in range(pieces) if texts[i] is not None]
    pools = [range(len(tok)), byte_ids, with_text, [0, 1, 2, 300, pieces, pieces + 1]]
    checked = 0
    for _ in range(3000):
        window = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 8))]
        before = tok.decode(window, skip_special_tokens=True)
        token = rng.choice(with_text)
        if before:
            assert tok.decode(window + [token], skip_special_tokens=True) == before + texts[token], (window, token)
            checked += 1
    assert checked > 1500
    # The table follows the tokenizer's added tokens.
    tok.add_tokens([tok.convert_ids_to_tokens(400)])
    assert tok.streaming_piece_texts()[400] is None and texts[400] is not None


def test_model_file_is_read_where_sentencepieces_protobuf_module_cannot_load(world):
    """sentencepiece 0.2.3's generated protobuf module refuses protobuf 6, which the ``lmms`` extra installs (its
    wandb pin): streaming still skips the decode for word pieces, and the export still builds its tokenizer. A fresh
    process, since one schema file can be registered with protobuf only once."""
    import subprocess
    import sys

    code = f"""
import sys
sys.modules["sentencepiece.sentencepiece_model_pb2"] = None  # as if it could not load
from palo.export.tokenizer import build_fast_tokenizer
from palo.model.tokenizer import load_tokenizer
tokenizer = load_tokenizer({world.tokenizer_dir!r})
assert tokenizer.streaming_piece_texts() is not None, "no streaming table"
fast, _ = build_fast_tokenizer(tokenizer, "<image>")
text = "Bonjour, 世界! এটি একটি"
assert fast.encode(text, add_special_tokens=False).ids == tokenizer(text, add_special_tokens=False).input_ids
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_a_llama_tokenizer_folder_without_its_vocabulary_raises(world, tmp_path):
    """tokenizer_config.json names LlamaTokenizer but tokenizer.model is gone: transformers built a tokenizer of 3
    special tokens, the loader shrank the embeddings to it, and the model loaded, answered and exported."""
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(world.tokenizer_dir, folder)
    (folder / "tokenizer.model").unlink()
    for stray in ("tokenizer.json",):
        if (folder / stray).exists():
            (folder / stray).unlink()
    with pytest.raises(FileNotFoundError, match="holds neither its tokenizer.model") as info:
        load_tokenizer(str(folder))
    assert str(folder) in str(info.value)
