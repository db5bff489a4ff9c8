"""Tests for palo.train.preprocess: labels derived from the renderer's supervised segments.

Every template key is run on three-round conversations in several scripts (byte-fallback emoji included), with
the image placeholder at the start, middle and end of the first human turn. Expected prompts and supervised texts
are written out by hand per style; the original PALO counting rule (docs/formats.md §3.7 v1) is re-implemented here
as an independent oracle.
"""

from __future__ import annotations

import json
import shutil

import pytest

from palo.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from palo.conversation import conv_templates
from palo.mm_utils import tokenizer_image_token
from palo.model.tokenizer import load_tokenizer
from palo.train.preprocess import (
    BadSampleError,
    SupervisedExample,
    _labels,
    build_supervised_example,
    encode_with_offsets,
    normalize_image_turns,
    supervised_text,
)

KEYS = ["plain", "v0", "v1", "vicuna_v1", "llava_v1", "v1_mmtag", "llama_2", "llava_llama_2", "mpt"]
TWO_KEYS = ["v1", "vicuna_v1", "llava_v1", "v1_mmtag"]

# What ends each learned answer, typed from docs/formats.md (§3.4, §3.7), per template key.
ANSWER_END = {
    "plain": "\n",
    "v0": "###",
    "v1": "</s>",
    "vicuna_v1": "</s>",
    "llava_v1": "</s>",
    "v1_mmtag": "</s>",
    "llama_2": " </s>",
    "llava_llama_2": " </s>",
    "mpt": "<|im_end|>",
}
# The space between the role tag and the answer is the model's to generate (the inference prompt ends at the
# tag), so it is supervised with the answer where the template has one.
ANSWER_START = {key: ("" if key in ("plain", "mpt") else " ") for key in ANSWER_END}

# First human question (French, accents) with the placeholder in three places, and what normalisation makes of
# each: the placeholder moves to the front, "\n" after it; removing it from the middle leaves two spaces.
Q1 = "Décris cette image, s'il te plaît."
PLACEMENTS = {
    "start": ("<image>\n" + Q1, "<image>\n" + Q1),
    "middle": ("Décris cette image, <image> s'il te plaît.", "<image>\nDécris cette image,  s'il te plaît."),
    "end": (Q1 + " <image>", "<image>\n" + Q1),
}

SAMPLES = {
    # Arabic / Chinese / Hindi / Russian / accented Latin, with emoji at the start and end of answers so byte
    # fallback pieces sit right at the supervised boundaries.
    "multiscript": [
        "هذه صورة لقطة تجلس على الأريكة 😀",
        "这只猫是什么颜色的？",
        "😀 यह बिल्ली नारंगी रंग की है।",
        "Почему кошка спит днём?",
        "Ça dépend: les chats dorment beaucoup, même le jour. 🐱",
    ],
    # English / Latin only: every answer starts with a word whose first piece carries the "▁" (checked in the
    # test; the tiny vocabulary has "▁A", "▁The", "▁I" but, e.g., no "▁N").
    "latin": [
        "A man is ironing clothes on a board attached to a taxi.",
        "What colour is the taxi?",
        "The taxi is yellow, a typical New York cab.",
        "Is this safe?",
        "It is dangerous: ironing on a moving car is not safe.",
    ],
}


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def tok(world, request, tmp_path_factory):
    """PALO's tokenizer in both of 4.31's modes (the config's ``legacy``): labels must be right in each."""
    if request.param:
        return load_tokenizer(world.tokenizer_dir)
    folder = tmp_path_factory.mktemp("non_legacy_tokenizer")
    shutil.copytree(world.tokenizer_dir, folder, dirs_exist_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "legacy": False}), encoding="utf-8")
    tokenizer = load_tokenizer(str(folder))
    assert not tokenizer.original_legacy
    return tokenizer


def _turns(sample: str, placement: str) -> list[dict]:
    a1, q2, a2, q3, a3 = SAMPLES[sample]
    values = [PLACEMENTS[placement][0], a1, q2, a2, q3, a3]
    return [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(values)]


def _expected(key: str, sample: str, placement: str) -> tuple[str, list[str], list[str], str]:
    """(prompt, human values, answers, system prompt) written independently of palo.train.preprocess."""
    a1, q2, a2, q3, a3 = SAMPLES[sample]
    q1 = PLACEMENTS[placement][1]
    if key == "plain":
        return "<image>" + a1 + "\n", ["<image>"], [a1], ""
    if "mmtag" in key:
        q1 = q1.replace("<image>", "<Image><image></Image>")
    conv = conv_templates[key].copy()
    conv.messages, conv.offset = [], 0
    humans, answers = [q1, q2, q3], [a1, a2, a3]
    for q, a in zip(humans, answers):
        conv.append_message(conv.roles[0], q)
        conv.append_message(conv.roles[1], a)
    return conv.get_prompt(), humans, answers, conv.system


def _build(tok, key, sample, placement) -> SupervisedExample:
    turns = _turns(sample, placement)
    if key == "plain":
        turns = turns[:2]
    return build_supervised_example(turns, tok, key, has_image=True)


def _supervised_spans(example: SupervisedExample, tok) -> list[tuple[int, int, int]]:
    tokens = encode_with_offsets(example.prompt, tok)
    return [t for t, label in zip(tokens, example.labels) if label != IGNORE_INDEX]


CASES = [(k, s, p) for k in KEYS for s in SAMPLES for p in PLACEMENTS]


@pytest.mark.parametrize("key,sample,placement", CASES)
def test_ids_are_tokenizer_image_token_of_the_rendered_prompt(tok, key, sample, placement):
    example = _build(tok, key, sample, placement)
    prompt, *_ = _expected(key, sample, placement)
    assert example.prompt == prompt
    assert example.input_ids == tokenizer_image_token(prompt, tok)
    assert example.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert len(example.labels) == len(example.input_ids)


@pytest.mark.parametrize("key,sample,placement", CASES)
def test_supervised_segments_are_the_answers_with_their_end(tok, key, sample, placement):
    example = _build(tok, key, sample, placement)
    _, _, answers, _ = _expected(key, sample, placement)
    supervised = "".join(text for text, flag in example.segments if flag)
    assert supervised == "".join(ANSWER_START[key] + a + ANSWER_END[key] for a in answers)
    assert "".join(text for text, _ in example.segments) == example.prompt


@pytest.mark.parametrize("key,sample,placement", CASES)
def test_supervised_tokens_decode_to_the_answers_and_stay_out_of_user_text(tok, key, sample, placement):
    example = _build(tok, key, sample, placement)
    prompt, humans, answers, system = _expected(key, sample, placement)
    want = "".join(ANSWER_START[key] + a + ANSWER_END[key] for a in answers)
    # SentencePiece decoding may add or drop a space at piece boundaries; nothing else may differ.
    assert supervised_text(example, tok).replace(" ", "") == want.replace(" ", "")

    learned = _supervised_spans(example, tok)
    assert all(end > start for _, start, end in learned)
    forbidden = _ranges(prompt, humans) + ([_range(prompt, system, 0)] if system else [])
    for token_id, start, end in learned:
        inside = [(a, b) for a, b in forbidden if a <= start and end <= b]
        assert not inside, f"learned token {token_id} {prompt[start:end]!r} lies inside non-answer text {inside}"
    # Role tags included: every learned token overlaps an answer (with its end)...
    answer_ranges = _ranges(prompt, [ANSWER_START[key] + x + ANSWER_END[key] for x in answers])
    for _, start, end in learned:
        assert any(start < b and a < end for a, b in answer_ranges), prompt[start:end]
    # ...and every token wholly inside one is learned.
    tokens = encode_with_offsets(prompt, tok)
    for a, b in answer_ranges:
        for (token_id, start, end), label in zip(tokens, example.labels):
            if a <= start and end <= b and end > start:
                assert label == token_id


def _range(prompt: str, text: str, pos: int) -> tuple[int, int]:
    start = prompt.index(text, pos)
    return start, start + len(text)


def _ranges(prompt: str, texts: list[str]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for text in texts:
        out.append(_range(prompt, text, pos))
        pos = out[-1][1]
    return out


def original_v1_labels(prompt: str, tok, conv_key: str) -> list[int]:
    """PALO's ``preprocess_v1`` masking (docs/formats.md §3.7), image path: counts tokens of the text split on
    separators."""
    conv = conv_templates[conv_key]
    ids = tokenizer_image_token(prompt, tok)
    labels = list(ids)
    sep = conv.sep + conv.roles[1] + ": "
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for rou in prompt.split(conv.sep2):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tok))
        instruction_len = len(tokenizer_image_token(parts[0], tok)) - 2
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    if cur != len(ids):  # "tokenization mismatch": the whole sample is masked
        labels = [IGNORE_INDEX] * len(ids)
    return labels


def _first_answer_pieces(tok, answers):
    # How the answer's start tokenizes inside the prompt (after "ASSISTANT:"): the piece after ":".
    return [tok.sp_model.encode(": " + a, out_type=str)[2] for a in answers]


@pytest.mark.parametrize("key", TWO_KEYS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_original_counting_rule_agrees_on_latin_samples(tok, key, placement):
    # The original's assumption: the space of "ASSISTANT: " merges into the answer's first token.
    assert all(p.startswith("▁") and p != "▁" for p in _first_answer_pieces(tok, SAMPLES["latin"][0::2]))
    example = _build(tok, key, "latin", placement)
    oracle = original_v1_labels(example.prompt, tok, key)
    assert any(label != IGNORE_INDEX for label in oracle)  # no "tokenization mismatch"
    assert example.labels == oracle


@pytest.mark.parametrize("key", TWO_KEYS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_original_counting_rule_agrees_on_multiscript_samples(tok, key, placement):
    """Also where the role tag's space is its own "▁" token (before 这, ह, 😀 via byte fallback, ...).

    The original learns that "▁" (its ``instruction_len - 2`` counts it as the answer's first token), and so do
    we: at inference the prompt ends at "ASSISTANT:", so the model must produce that token itself.
    """
    assert any(p == "▁" for p in _first_answer_pieces(tok, SAMPLES["multiscript"][0::2]))
    example = _build(tok, key, "multiscript", placement)
    oracle = original_v1_labels(example.prompt, tok, key)
    assert any(label != IGNORE_INDEX for label in oracle)
    assert example.labels == oracle


@pytest.mark.parametrize("key", KEYS)
def test_bos_never_learned_and_every_answer_end_learned(tok, key):
    example = _build(tok, key, "multiscript", "middle")
    assert example.input_ids[0] == tok.bos_token_id
    assert example.labels[0] == IGNORE_INDEX
    sentinel = example.input_ids.index(IMAGE_TOKEN_INDEX)
    assert example.labels[sentinel] == IGNORE_INDEX
    eos_positions = [k for k, i in enumerate(example.input_ids) if i == tok.eos_token_id]
    if ANSWER_END[key].endswith("</s>"):
        assert len(eos_positions) == 3
    assert all(example.labels[k] == tok.eos_token_id for k in eos_positions)


def test_text_only_sample_has_no_sentinel(tok):
    turns = [t for t in _turns("latin", "start")]
    turns[0] = {"from": "human", "value": Q1}
    example = build_supervised_example(turns, tok, "v1", has_image=False)
    assert IMAGE_TOKEN_INDEX not in example.input_ids
    assert example.input_ids == tok(example.prompt).input_ids
    assert example.labels == original_v1_labels(example.prompt, tok, "v1")


def test_leading_gpt_turn_is_dropped_as_in_the_original(tok):
    turns = [{"from": "gpt", "value": "Hello!"}, *_turns("latin", "start")]
    assert build_supervised_example(turns, tok, "v1", True) == build_supervised_example(turns[1:], tok, "v1", True)


def test_v0_prefilled_example_is_not_part_of_the_sample(tok):
    example = _build(tok, "v0", "latin", "start")
    (_, question), (_, answer) = conv_templates["v0"].messages
    assert question not in example.prompt and answer not in example.prompt


@pytest.mark.parametrize(
    "turns,key,has_image,message",
    [
        ([], "v1", False, "empty conversation"),
        ([{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}], "v1", False, "unknown speaker"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "v1", False, "expected 'gpt'"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
         "v1", False, "ends with a human turn"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], "v1", False, "empty value"),
        ([{"from": "human", "value": "  "}, {"from": "gpt", "value": "b"}], "v1", False, "empty value"),
        # Half an emoji: valid JSON, but the tokenizer failed on it mid-run (a UnicodeEncodeError, not skippable).
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b \ud83d"}], "v1", False,
         r"turn 1 \(gpt\): a lone surrogate '\\ud83d' at character 2"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": 5}], "v1", False,
         r"turn 1 \(gpt\): the value must be a string, got int 5"),
        ([{"from": "gpt", "value": "hi"}], "v1", False, "empty conversation"),
        ([{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}], "v1", False, "text-only"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "v1", True, "exactly one human turn"),
        ([{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "<image>"},
          {"from": "gpt", "value": "c"}], "v1", True, "exactly one human turn"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
         "plain", True, "exactly 2 turns"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "plain", True, "in its first turn"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": ""}], "plain", True, "empty value"),
    ],
)
def test_bad_samples_raise_with_the_reason(tok, turns, key, has_image, message):
    with pytest.raises(BadSampleError, match=message):
        build_supervised_example(turns, tok, key, has_image)


def test_unknown_template_lists_the_keys(tok):
    with pytest.raises(ValueError, match="vicuna_v1"):
        build_supervised_example(_turns("latin", "start"), tok, "vicuna_v9", True)


def test_normalize_image_turns():
    turns = [{"from": "human", "value": " Q <image> R <image>", "id": 7}, {"from": "gpt", "value": "A"}]
    assert normalize_image_turns(turns, "v1", False) == [
        {"from": "human", "value": "<image>\nQ  R", "id": 7},
        {"from": "gpt", "value": "A"},
    ]
    assert normalize_image_turns(turns, "v1_mmtag", False)[0]["value"] == "<Image><image></Image>\nQ  R"
    assert normalize_image_turns(turns, "v1", True)[0]["value"] == "<im_start><image><im_end>\nQ  R"
    assert normalize_image_turns([{"from": "human", "value": "<image>"}], "v1", False)[0]["value"] == "<image>"
    assert turns[0]["value"] == " Q <image> R <image>"  # input untouched


@pytest.mark.parametrize("sample", SAMPLES)
def test_offsets_are_character_offsets(tok, sample):
    example = _build(tok, "llama_2", sample, "middle")  # has <s> and </s> written in the text
    prompt = example.prompt
    tokens = encode_with_offsets(prompt, tok)
    assert [t[0] for t in tokens] == example.input_ids
    assert tokens[0][1:] == (0, 0)  # the added BOS covers nothing
    for k, (token_id, start, end) in enumerate(tokens[1:], start=1):
        covered = prompt[start:end]
        if token_id == IMAGE_TOKEN_INDEX:
            assert covered == "<image>"
            continue
        piece = tok.convert_ids_to_tokens(token_id)
        # SentencePiece's dummy prefix is added where each separately encoded segment starts: each text between
        # special tokens in the legacy mode, only each text between images otherwise.
        after = ("<image>", "<s>", "</s>") if tok.original_legacy else ("<image>",)
        segment_start = start == 0 or prompt[:start].endswith(after)
        if piece in ("<s>", "</s>"):
            assert covered == piece
        elif piece.startswith("<0x"):  # one byte of the one character it covers
            assert len(covered) == 1 and int(piece[3:5], 16) in covered.encode("utf-8")
        elif piece == "▁" and covered != " ":  # a lone dummy prefix covers what the next token covers
            assert segment_start and k + 1 < len(tokens) and tokens[k + 1][1:] == (start, end)
        elif segment_start and not covered.startswith(" "):  # dummy prefix merged into the first piece
            assert piece == "▁" + covered
        else:
            assert piece.replace("▁", " ") == covered


def test_added_special_tokens_with_im_start_end(world):
    tok = load_tokenizer(world.tokenizer_dir)
    tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    example = build_supervised_example(_turns("multiscript", "middle"), tok, "v1", True, mm_use_im_start_end=True)
    assert "<im_start><image><im_end>\n" in example.prompt
    assert example.input_ids == tokenizer_image_token(example.prompt, tok)
    tokens = encode_with_offsets(example.prompt, tok)
    k = example.input_ids.index(IMAGE_TOKEN_INDEX)
    assert [example.prompt[s:e] for _, s, e in tokens[k - 1 : k + 2]] == ["<im_start>", "<image>", "<im_end>"]
    assert all(label == IGNORE_INDEX for label in example.labels[: k + 2])


def test_plain_ignores_im_start_end(tok):
    turns = _turns("latin", "end")[:2]
    bracketed = build_supervised_example(turns, tok, "plain", True, mm_use_im_start_end=True)
    assert bracketed == build_supervised_example(turns, tok, "plain", True)
    assert bracketed.prompt == "<image>" + SAMPLES["latin"][0] + "\n"


def test_fast_tokenizer_uses_offset_mapping(world):
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(world.tokenizer_dir)
    assert fast.is_fast
    for key in ("v1", "llama_2", "mpt"):
        example = build_supervised_example(_turns("multiscript", "middle"), fast, key, True)
        assert example.input_ids == tokenizer_image_token(example.prompt, fast)
        want = "".join(a + ANSWER_END[key] for a in SAMPLES["multiscript"][0::2])
        assert supervised_text(example, fast).replace(" ", "") == want.replace(" ", "")


@pytest.mark.parametrize("key", [k for k in conv_templates])
def test_prompt_segments_concatenate_to_the_prompt(key):
    conv = conv_templates[key].copy()
    conv.append_message(conv.roles[0], "<image>\nQ1")
    conv.append_message(conv.roles[1], "A1")
    conv.append_message(conv.roles[0], "Q2")
    conv.append_message(conv.roles[1], None)
    segments = conv.get_prompt_segments()
    assert "".join(text for text, _ in segments) == conv.get_prompt()
    assert all(text for text, _ in segments)
    assert all(a[1] != b[1] for a, b in zip(segments, segments[1:]))
    learned = [text for text, flag in segments if flag]
    # v0/default keep their pre-filled example exchange, whose answer is an assistant turn too.
    assert learned[-1].lstrip(" ").startswith("A1") and "Q2" not in "".join(learned)


def _byte_level_bpe(trim_offsets: bool):
    """A tiny GPT-2-style byte-level BPE, with the ``trim_offsets`` such tokenizer files ship with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from palo.testing.corpus import all_text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    backend.train_from_iterator(all_text(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_whitespace_tokens_of_an_answer_are_learned_with_trimmed_offsets(trim_offsets):
    """Before, a byte-level BPE with trim_offsets (GPT-2, GPT-NeoX, MPT files) gave each whitespace-only token an
    empty span, so the answer's indentation and spaces were never learned ('deff():\\nreturn1')."""
    tok = _byte_level_bpe(trim_offsets)
    answer = "def f():\n    return 1"
    turns = [{"from": "human", "value": "Write f."}, {"from": "gpt", "value": answer}]
    for key in ("mpt", "v1"):
        example = build_supervised_example(turns, tok, key, has_image=False)
        assert example.input_ids == tokenizer_image_token(example.prompt, tok)
        assert supervised_text(example, tok) == ANSWER_START[key] + answer + ANSWER_END[key]


def test_a_token_that_straddles_an_answer_boundary_is_learned():
    """Labels come from character overlap: a token with any character of an answer is learned, also when it begins
    before the answer or ends after it (a piece merging the role tag's space with the answer's first letters, or the
    answer's last letters with what follows); only tokens with no answer character, BOS and image tokens are not."""
    segments = [("abcd", False), ("efgh", True), ("ij", False)]
    tokens = [(1, 0, 0), (5, 0, 3), (6, 3, 5), (7, 5, 7), (8, 7, 9), (9, 9, 10), (IMAGE_TOKEN_INDEX, 5, 6)]
    assert _labels(tokens, segments, bos_token_id=1) == [IGNORE_INDEX, IGNORE_INDEX, 6, 7, 8, IGNORE_INDEX,
                                                          IGNORE_INDEX]
    # A token spanning the whole answer and more on both sides is learned too.
    assert _labels([(4, 2, 10)], segments, bos_token_id=None) == [4]
