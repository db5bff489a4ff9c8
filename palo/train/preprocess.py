"""Supervised fine-tuning examples whose labels are right by construction.

The mask comes from the renderer itself, not from counting tokens of separator-split pieces as the original did
(docs/formats.md §3.7; why: docs/compat.md#training). :meth:`palo.conversation.Conversation.get_prompt_segments`
marks which characters of the prompt are supervised (each answer and its end separator), the prompt is
tokenized with character offsets (:func:`encode_with_offsets`, ids identical to
:func:`palo.mm_utils.tokenizer_image_token`), and a token is learned exactly when its characters overlap a
supervised piece. Nothing is counted twice, so nothing can drift.

A sample is the ``conversations`` list of the PALO/LLaVA JSON format::

    [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "A man ..."}, ...]
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

from palo.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from palo.conversation import Conversation, Segment, SeparatorStyle, conv_templates
from palo.data.turns import BadSampleError, check_placeholders, validate_turns
from palo.model.config import expand_image_placeholders
from palo.model.tokenizer import SPIECE_UNDERLINE, PaloLlamaTokenizer

# The mmtag convention wraps the placeholder (docs/formats.md §3.1).
MMTAG_IMAGE = "<Image>" + DEFAULT_IMAGE_TOKEN + "</Image>"

# (token id, char start, char end): the token covers text[start:end] of the encoded string.
TokenSpan = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class SupervisedExample:
    """One tokenized training sample.

    Attributes:
        input_ids: ``[T]`` ids as :func:`palo.mm_utils.tokenizer_image_token` gives them for ``prompt``:
            one leading BOS, ``IMAGE_TOKEN_INDEX`` (-200) where the image goes, no padding, no truncation.
        labels: ``[T]``, the id where the model is trained to produce that token, else ``IGNORE_INDEX``
            (-100). Not shifted: the model shifts labels itself.
        prompt: The rendered prompt the ids encode.
        segments: ``prompt`` as ``(text, supervised)`` pieces, the source of the labels.
    """

    input_ids: list[int]
    labels: list[int]
    prompt: str
    segments: tuple[Segment, ...] = ()


# ----------------------------------------------------------------------------------------------------
# Image placeholder normalisation
# ----------------------------------------------------------------------------------------------------


def normalize_image_turns(
    turns: Sequence[Mapping[str, Any]], version: str, mm_use_im_start_end: bool
) -> list[dict[str, Any]]:
    """The original ``preprocess_multimodal`` (docs/formats.md §3.6), without mutating its input.

    In every turn whose value contains ``<image>``: all ``<image>`` are removed, the text is stripped,
    ``<image>\\n`` is put in front and the result stripped again, so the placeholder always leads its turn.
    With a ``version`` containing ``"mmtag"`` it is then wrapped as ``<Image><image></Image>``. With
    ``mm_use_im_start_end`` every ``<image>`` becomes ``<im_start><image><im_end>``
    (:func:`palo.model.config.expand_image_placeholders`, the rule inference prompts follow too).

    Args:
        turns: ``[{"from": ..., "value": str}, ...]``.
        version: The template's ``version`` (e.g. ``"v1"``, ``"v1_mmtag"``).
        mm_use_im_start_end: Whether the model brackets image features with start/end tokens.

    Returns:
        New turn dicts (other keys copied), values normalised.
    """
    out = []
    for turn in turns:
        value = turn["value"]
        if DEFAULT_IMAGE_TOKEN in value:
            value = (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
            if "mmtag" in version:
                value = value.replace(DEFAULT_IMAGE_TOKEN, MMTAG_IMAGE)
        value = expand_image_placeholders(value, mm_use_im_start_end)
        out.append({**turn, "value": value})
    return out


# ----------------------------------------------------------------------------------------------------
# Tokenization with character offsets
# ----------------------------------------------------------------------------------------------------


def encode_with_offsets(text: str, tokenizer: Any) -> list[TokenSpan]:
    """Tokenizes like :func:`palo.mm_utils.tokenizer_image_token`, also giving each token's characters.

    The ids are exactly ``tokenizer_image_token(text, tokenizer)``: the text is split on ``<image>``, each
    chunk tokenized on its own, one BOS kept, one ``IMAGE_TOKEN_INDEX`` between chunks.

    Offsets are character offsets into ``text``. A sentinel and a special token written in the text cover
    their literal text (``<image>``, ``</s>``); tokens the tokenizer adds (BOS) cover nothing
    (``start == end``). For :class:`PaloLlamaTokenizer`, the pieces of one byte-fallback character all
    cover that character, and SentencePiece's dummy-prefix ``▁`` covers the text it is prefixed to.

    Args:
        text: The prompt.
        tokenizer: A :class:`PaloLlamaTokenizer` or a fast (tokenizers-backed) tokenizer.

    Returns:
        ``[(id, start, end), ...]``, one per id.

    Raises:
        TypeError: For a slow tokenizer other than :class:`PaloLlamaTokenizer` (no reliable offsets).
    """
    chunks = text.split(DEFAULT_IMAGE_TOKEN)
    starts = [0, *accumulate(len(c) + len(DEFAULT_IMAGE_TOKEN) for c in chunks[:-1])]
    encoded = [_shift(_encode_chunk(chunk, tokenizer), start) for chunk, start in zip(chunks, starts)]
    # The same BOS rule as tokenizer_image_token: keep the first chunk's BOS once, drop each chunk's first id.
    out: list[TokenSpan] = []
    skip = 0
    if encoded[0] and encoded[0][0][0] == tokenizer.bos_token_id:
        skip = 1
        out.append(encoded[0][0])
    for k, chunk in enumerate(encoded):
        if k > 0:
            out.append((IMAGE_TOKEN_INDEX, starts[k] - len(DEFAULT_IMAGE_TOKEN), starts[k]))
        out.extend(chunk[skip:])
    return out


def _shift(tokens: list[TokenSpan], by: int) -> list[TokenSpan]:
    return [(token_id, start + by, end + by) for token_id, start, end in tokens]


def _encode_chunk(text: str, tokenizer: Any) -> list[TokenSpan]:
    """``tokenizer(text).input_ids`` with offsets into ``text``."""
    if isinstance(tokenizer, PaloLlamaTokenizer):
        return _encode_chunk_sentencepiece(text, tokenizer)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        untrimmed = _untrimmed_backend(tokenizer)
        if untrimmed is not None:
            encoding = untrimmed.encode(text)
            if encoding.ids != ids:
                raise ValueError(f"{type(tokenizer).__name__}: its backend without trimmed offsets tokenizes "
                                 f"{text[:60]!r} differently; cannot place its tokens in the text")
            offsets = encoding.offsets
        return [(i, s, e) for i, (s, e) in zip(ids, offsets)]
    raise TypeError(
        f"encode_with_offsets needs PaloLlamaTokenizer or a fast tokenizer, got {type(tokenizer).__name__}"
    )


_UNTRIMMED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _untrimmed_backend(tokenizer: Any) -> Any | None:
    """A copy of a fast tokenizer's backend whose offsets keep their whitespace, or None when they already do.

    Byte-level BPE tokenizers (GPT-2, GPT-NeoX, MPT) ship with ``trim_offsets``: a token's offsets leave out its
    whitespace, so a whitespace-only token (an indentation space) covers no characters and could never overlap an
    answer, and the answer's code indentation would never be learned. Trimming changes the offsets only, never the
    ids; the copy is made once per tokenizer.
    """
    if tokenizer in _UNTRIMMED:
        return _UNTRIMMED[tokenizer]
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    trimmed = False

    def untrim(node: Any) -> Any:
        nonlocal trimmed
        if isinstance(node, dict):
            trimmed = trimmed or node.get("trim_offsets") is True
            return {key: False if key == "trim_offsets" else untrim(value) for key, value in node.items()}
        if isinstance(node, list):
            return [untrim(value) for value in node]
        return node

    spec = untrim(spec)
    _UNTRIMMED[tokenizer] = Tokenizer.from_str(json.dumps(spec)) if trimmed else None
    return _UNTRIMMED[tokenizer]


def _encode_chunk_sentencepiece(text: str, tokenizer: PaloLlamaTokenizer) -> list[TokenSpan]:
    """Mirrors :meth:`PaloLlamaTokenizer.tokenize` + ``build_inputs_with_special_tokens``, with offsets.

    Text is split on added/special tokens (:meth:`PaloLlamaTokenizer.added_token_spans`, the whitespace beside them
    dropped as 4.31 dropped it); each text segment is encoded by SentencePiece on its own, with the dummy prefix
    again (legacy) or, for a config that says ``"legacy": false``, only at the text's start (a segment after an
    added token loses the ``▁`` of its first piece).
    """
    legacy = tokenizer.original_legacy
    # Non-legacy: the tokenizer sees "▁" + the text with its own "▁" as spaces (same length); the added "▁" is the
    # text's dummy prefix and covers no character of it.
    seen = text if legacy else SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
    shift = 0 if legacy else 1
    if tokenizer.split_special_tokens:
        spans = [(0, len(seen), False)] if seen else []
    else:
        spans = tokenizer.added_token_spans(seen)
    tokens: list[TokenSpan] = []
    for start, end, is_added in spans:
        if is_added:
            tokens.append((tokenizer.convert_tokens_to_ids(seen[start:end]), start - shift, end - shift))
            continue
        segment = seen[start:end]
        first = not legacy and segment.startswith(SPIECE_UNDERLINE)
        if first:
            segment, start = segment[1:], start + 1
        pieces = _sentencepiece_pieces(tokenizer.sp_model, segment) if segment else []
        if (not legacy and not first and not segment.startswith(" ") and pieces
                and pieces[0][0].startswith(SPIECE_UNDERLINE)):
            piece, piece_start, piece_end = pieces[0]
            pieces = ([(piece[1:], piece_start, piece_end)] if len(piece) > 1 else []) + pieces[1:]
        ids = tokenizer.convert_tokens_to_ids([p for p, _, _ in pieces])
        tokens.extend(_shift([(i, s, e) for i, (_, s, e) in zip(ids, pieces)], start - shift))
    if tokenizer.add_bos_token:
        tokens.insert(0, (tokenizer.bos_token_id, 0, 0))
    if tokenizer.add_eos_token:
        tokens.append((tokenizer.eos_token_id, len(text), len(text)))
    return tokens


def _sentencepiece_pieces(sp_model: Any, text: str) -> list[tuple[str, int, int]]:
    """SentencePiece pieces of ``text`` with character offsets.

    SentencePiece reports byte offsets into the UTF-8 input. Some pieces cover no bytes: the dummy-prefix
    ``▁`` and all but the last byte-fallback piece of a character (``<0xE4><0xBD><0xA0>`` = 你, only
    ``<0xA0>`` spans it). Such a piece gets the span of the next piece that covers something, so that a
    character's bytes are learned together and the dummy prefix goes with the word it starts.

    Returns:
        ``[(piece, char_start, char_end), ...]``, the pieces ``sp_model.encode(text, out_type=str)`` gives.
    """
    char_at = _byte_to_char_index(text)
    spans = [(p.piece, char_at[p.begin], char_at[p.end]) for p in _encode_proto(sp_model, text)]
    out: list[tuple[str, int, int]] = []
    cover: tuple[int, int] | None = None
    for piece, start, end in reversed(spans):
        if end > start:
            cover = (start, end)
        elif cover is not None:
            start, end = cover
        out.append((piece, start, end))
    return out[::-1]


def _encode_proto(sp_model: Any, text: str) -> Any:
    # sentencepiece >= 0.2.1 renamed the piece-with-offsets output from "immutable_proto" to "proto".
    try:
        return sp_model.encode(text, out_type="proto").pieces
    except (ValueError, TypeError, RuntimeError):
        return sp_model.encode(text, out_type="immutable_proto").pieces


def _byte_to_char_index(text: str) -> dict[int, int]:
    """Maps each UTF-8 byte offset that starts (or ends) a character of ``text`` to the character offset."""
    lengths = [len(ch.encode("utf-8")) for ch in text]
    byte_offsets = [0, *accumulate(lengths)]
    return {b: c for c, b in enumerate(byte_offsets)}


# ----------------------------------------------------------------------------------------------------
# Samples -> supervised examples
# ----------------------------------------------------------------------------------------------------


def build_supervised_example(
    turns: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    template_key: str,
    has_image: bool,
    mm_use_im_start_end: bool = False,
) -> SupervisedExample:
    """Renders, tokenizes and labels one training conversation.

    Turns are checked: a leading ``gpt`` turn is dropped, then the speakers must alternate ``human``/``gpt``, the
    conversation must end with a ``gpt`` answer, no value may be empty, and an image sample needs its ``<image>``
    placeholder in exactly one human turn while a text-only sample has none (docs/compat.md#training). Image
    samples are normalised with :func:`normalize_image_turns`.

    With the ``plain`` template (stage-1 pre-training, docs/formats.md §3.7 PLAIN) the sample must be one exchange whose
    human turn holds ``<image>``; the prompt is ``<image>`` + caption + ``\\n`` and only the caption and
    newline are learned. Every other template is filled with the turns (its system prompt kept, its
    pre-filled example messages dropped as the original does) and its rendered answers plus end
    separators are learned.

    Args:
        turns: ``[{"from": "human" | "gpt", "value": str}, ...]``.
        tokenizer: The LLM's tokenizer (see :func:`encode_with_offsets`).
        template_key: A key of :data:`palo.conversation.conv_templates` (PALO trains with ``"v1"``).
        has_image: Whether the sample has an image.
        mm_use_im_start_end: Bracket the placeholder with ``<im_start>``/``<im_end>``.

    Returns:
        The example; ``labels[k]`` is ``input_ids[k]`` for tokens that overlap a supervised piece, else
        ``IGNORE_INDEX``. The BOS and the image sentinel are never learned.

    Raises:
        ValueError: For an unknown ``template_key``.
        BadSampleError: For a malformed conversation (the message names the problem).
    """
    template = _template(template_key)
    if template.sep_style is SeparatorStyle.PLAIN:
        # The original replaces the whole first turn by a bare "<image>", even with mm_use_im_start_end
        # (whose brackets preprocess_multimodal had just added), so that flag changes nothing here.
        segments = _plain_segments(turns, has_image)
    else:
        turns = validate_turns(turns)
        check_placeholders(turns, has_image)
        if has_image:
            turns = normalize_image_turns(turns, template.version, mm_use_im_start_end)
        segments = _template_segments(template, turns)
    prompt = "".join(text for text, _ in segments)
    tokens = encode_with_offsets(prompt, tokenizer)
    labels = _labels(tokens, segments, tokenizer.bos_token_id)
    return SupervisedExample([i for i, _, _ in tokens], labels, prompt, tuple(segments))


def supervised_text(example: SupervisedExample, tokenizer: Any) -> str:
    """The learned tokens decoded together (special tokens kept), for reports and debugging."""
    ids = [i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


def _template(key: str) -> Conversation:
    if key not in conv_templates:
        raise ValueError(f"Unknown template {key!r}; expected one of {sorted(conv_templates)}")
    return conv_templates[key]


def _plain_segments(turns: Sequence[Mapping[str, Any]], has_image: bool) -> list[Segment]:
    """Stage-1 prompt: ``<image>`` + caption + ``\\n``, the caption and newline learned."""
    if len(turns) != 2:
        raise BadSampleError(f"a plain (stage-1) sample must have exactly 2 turns (image, caption), got {len(turns)}")
    turns = validate_turns(turns)
    if not has_image or DEFAULT_IMAGE_TOKEN not in turns[0]["value"]:
        raise BadSampleError(f"a plain (stage-1) sample needs an image and {DEFAULT_IMAGE_TOKEN} in its first turn")
    check_placeholders(turns, has_image)
    # The first turn becomes a bare "<image>"; the answer ends with the plain template's sep.
    return [(DEFAULT_IMAGE_TOKEN, False), (turns[1]["value"] + conv_templates["plain"].sep, True)]


def _template_segments(template: Conversation, turns: Sequence[Mapping[str, Any]]) -> list[Segment]:
    conv = template.copy()
    # The original starts from an empty message list (v0's pre-filled example is not part of the sample).
    conv.messages = []
    conv.offset = 0
    for k, turn in enumerate(turns):
        conv.append_message(conv.roles[k % 2], turn["value"])
    return conv.get_prompt_segments()


def _labels(tokens: Sequence[TokenSpan], segments: Sequence[Segment], bos_token_id: int | None) -> list[int]:
    """``IGNORE_INDEX`` except for tokens whose characters overlap a supervised segment."""
    # supervised_before[c] = number of supervised characters in prompt[:c], so overlap is one subtraction.
    supervised_before = [0]
    for text, supervised in segments:
        base = supervised_before[-1]
        supervised_before.extend(base + (k + 1 if supervised else 0) for k in range(len(text)))
    labels = []
    for position, (token_id, start, end) in enumerate(tokens):
        learned = supervised_before[end] - supervised_before[start] > 0
        never = token_id == IMAGE_TOKEN_INDEX or (position == 0 and token_id == bos_token_id)
        labels.append(token_id if learned and not never else IGNORE_INDEX)
    return labels
