"""A ``tokenizer.json`` that encodes exactly like PALO's (transformers 4.31 slow, legacy) LLaMA tokenizer.

PALO tokenized with the slow SentencePiece ``LlamaTokenizer`` of transformers 4.31 (see
:mod:`palo.model.tokenizer`): every segment between special tokens gets SentencePiece's dummy ``▁`` prefix, and a
leading space is kept (``" x"`` is ``▁▁x``). transformers 5's ``LlamaTokenizer`` class rebuilds its own
normalizer from its arguments and does neither, so the export writes a complete ``tokenizer.json`` (the
tokenizers pipeline built from the SentencePiece model in legacy mode, BOS added by the post-processor) and names
the class ``PreTrainedTokenizerFast``, which every transformers version, vLLM and SGLang load verbatim.

A checkpoint whose tokenizer config says ``"legacy": false`` is exported with the same pipeline: 4.31 then took the
``▁`` off the first piece of a text that follows a special token (``</s>USER``), after merging, which no tokenizers
pipeline can do, so a multi-turn prompt's text after ``</s>`` differs there by that one piece (the export says so).

``<image>`` is appended as a special token after the tokenizer's own vocabulary (and after tokens the loader
added, such as ``<im_patch>``), so it splits the text exactly where :func:`palo.mm_utils.tokenizer_image_token`
splits it: the text after it is encoded as if it began a sequence, dummy prefix included.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from palo.model.tokenizer import sentencepiece_model_proto

__all__ = ["build_fast_tokenizer", "read_sentencepiece_bpe", "write_tokenizer"]

logger = logging.getLogger(__name__)


# SentencePiece piece types (sentencepiece_model.proto): only NORMAL pieces take part in BPE merges; USER_DEFINED
# pieces are always emitted whole.
_NORMAL, _USER_DEFINED = 1, 4


def read_sentencepiece_bpe(vocab_file: str) -> Any:
    """The parsed ``ModelProto`` of a SentencePiece model file.

    Raises:
        ValueError: If it is not a BPE model (LLaMA's kind; the exports handle no other).
    """
    proto = sentencepiece_model_proto()()
    with open(vocab_file, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != 2:
        raise ValueError(f"{vocab_file}: only SentencePiece BPE (LLaMA) tokenizers are exported, got model_type "
                         f"{proto.trainer_spec.model_type}")
    return proto


def _sentencepiece_tokenizer(vocab_file: str) -> Tokenizer:
    """The tokenizers pipeline that encodes like ``SentencePieceProcessor.encode`` on ``vocab_file`` (BPE models).

    Built here from the model's own settings rather than by transformers' converter helpers, whose behaviour
    changed between transformers 5 releases (5.17's ignores the normalizer settings and the merges). SentencePiece
    BPE repeatedly merges the adjacent pair whose merged piece has the highest score; as a tokenizers BPE that is the
    merge list of every split of a normal piece into two normal pieces, ranked by the merged piece's score. The
    normalizer follows SentencePiece's order (precompiled map, extra-whitespace removal, whitespace escaping) and
    then adds the dummy ``▁`` prefix to every segment between special tokens, as the legacy slow tokenizer did.
    """
    proto = read_sentencepiece_bpe(vocab_file)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    normal = {piece.piece: (piece.score, i) for i, piece in enumerate(proto.pieces) if piece.type == _NORMAL}
    ranked = sorted((-score, i, text[:k], text[k:]) for text, (score, i) in normal.items()
                    for k in range(1, len(text)) if text[:k] in normal and text[k:] in normal)
    user_defined = [piece.piece for piece in proto.pieces if piece.type == _USER_DEFINED]
    trainer = proto.trainer_spec
    # ignore_merges: a user-defined piece, isolated below, is looked up whole (no merge can build it).
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for _, _, left, right in ranked],
                                     unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback,
                                     ignore_merges=bool(user_defined)))
    spec = proto.normalizer_spec
    steps: list[Any] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # spaces only: SentencePiece leaves newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁" if spec.escape_whitespaces else " "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    if user_defined:
        pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len, reverse=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    steps = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def build_fast_tokenizer(tokenizer: Any, image_token: str) -> tuple[Tokenizer, int]:
    """The tokenizers pipeline equivalent to ``tokenizer``, with ``image_token`` appended.

    Args:
        tokenizer: The loaded PALO tokenizer (:class:`palo.model.tokenizer.PaloLlamaTokenizer`, possibly with
            tokens the loader added), or any tokenizers-backed tokenizer.
        image_token: The placeholder to append (``<image>``).

    Returns:
        The pipeline and the id of ``image_token``.

    Raises:
        ValueError: If the tokenizer already holds ``image_token`` as ordinary text or cannot be converted.
    """
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if vocab_file and os.path.isfile(vocab_file) and hasattr(tokenizer, "sp_model"):
        if getattr(tokenizer, "original_legacy", True) is False:
            logger.warning("the tokenizer config says \"legacy\": false: the exported tokenizer gives a text after a "
                           "special token its dummy prefix; PALO's tokenizer (as transformers 4.31) takes it off, so "
                           "a multi-turn prompt differs by one piece after each </s>")
        fast = _sentencepiece_tokenizer(vocab_file)
        base_size = fast.get_vocab_size(with_added_tokens=False)
        specials = [tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token]
        fast.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials if t])
        # Tokens the loader added (<im_patch>, <im_start>, <im_end>) keep their ids, and take the whitespace beside
        # them away as PaloLlamaTokenizer.added_token_spans does (4.31's rule for them).
        for token_id in sorted(tokenizer.added_tokens_decoder):
            if token_id < base_size:
                continue
            token = tokenizer.added_tokens_decoder[token_id]
            strip = token.content not in specials
            fast.add_special_tokens([AddedToken(token.content, normalized=False, special=True, lstrip=strip,
                                                rstrip=strip)])
            if fast.token_to_id(token.content) != token_id:
                raise ValueError(f"added token {token.content!r} would move from id {token_id}")
        bos = tokenizer.bos_token
        if getattr(tokenizer, "add_bos_token", True) and bos:
            bos_id = fast.token_to_id(bos)
            fast.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            )
    elif hasattr(tokenizer, "backend_tokenizer"):
        fast = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    else:
        raise ValueError(f"cannot export a {type(tokenizer).__name__}: neither SentencePiece nor tokenizers-backed")
    if fast.token_to_id(image_token) is not None:
        raise ValueError(f"the tokenizer already has {image_token!r} (id {fast.token_to_id(image_token)})")
    expected = fast.get_vocab_size(with_added_tokens=True)
    fast.add_special_tokens([AddedToken(image_token, normalized=False, special=True)])
    image_id = fast.token_to_id(image_token)
    if image_id != expected or image_id != len(tokenizer):
        raise ValueError(f"{image_token!r} got id {image_id}, expected {len(tokenizer)} (right after the vocabulary)")
    return fast, image_id


def write_tokenizer(tokenizer: Any, out_dir: str, image_token: str, chat_template: str | None = None) -> int:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    Returns:
        The id of ``image_token``.
    """
    fast, image_id = build_fast_tokenizer(tokenizer, image_token)
    fast.save(os.path.join(out_dir, "tokenizer.json"))
    pad = tokenizer.pad_token or tokenizer.unk_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # transformers 4.x's PreTrainedTokenizerFast also returns token_type_ids, which Llava's generate refuses
        # ("model_kwargs are not used by the model"); LLaMA's tokenizers name these two.
        "model_input_names": ["input_ids", "attention_mask"],
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": pad,  # PALO pads with <unk> (id 0)
        "image_token": image_token,
        "extra_special_tokens": {"image_token": image_token},
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", True)),
        "add_eos_token": bool(getattr(tokenizer, "add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(min(getattr(tokenizer, "model_max_length", 2048), 10**9)),
        "padding_side": "left",  # generation pads on the left
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(specials, f, indent=2, ensure_ascii=False)
    return image_id
