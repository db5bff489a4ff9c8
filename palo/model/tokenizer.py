"""The LLaMA SentencePiece tokenizer, as PALO trained with it.

PALO and LLaVA-1.5 tokenized with transformers 4.31's *slow* ``LlamaTokenizer``. Its behaviour differs from the
tokenizers-backed ``LlamaTokenizer`` of transformers 5 in ways that change token ids:

* every text segment between special tokens (``</s>USER: ...``) is encoded by SentencePiece on its own, so it gets
  the dummy-prefix ``▁`` again: the "legacy" behaviour, 4.31's default. A config that says ``"legacy": false``
  got 4.31's other rule, kept here too: only the text's start gets the prefix, and a segment after a special token
  loses the ``▁`` of its first piece (``</s>USER`` is ``</s>``, ``U``... rather than ``</s>``, ``▁U``...);
* leading spaces are kept (``" x"`` encodes as ``▁▁x``), while the tokenizers ``Metaspace`` pre-tokenizer merges
  the dummy prefix into an existing leading space.

Prompts, label masks and the released checkpoints all depend on those ids, so :class:`PaloLlamaTokenizer`
reproduces them exactly with the ``sentencepiece`` library. :func:`load_tokenizer` picks it for every LLaMA-family
SentencePiece checkpoint and falls back to ``AutoTokenizer`` for anything else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

SPIECE_UNDERLINE = "\u2581"  # SentencePiece's word-start mark

# tokenizer_class values (as written in tokenizer_config.json) that mean "LLaMA SentencePiece tokenizer".
_LLAMA_TOKENIZER_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast", "PaloLlamaTokenizer", None}


def sentencepiece_model_proto() -> type:
    """The protobuf message class of a SentencePiece model file, as the installed protobuf runtime can load it.

    sentencepiece's generated module refuses a protobuf runtime older than the one it was generated with (0.2.3:
    protobuf 7.36), and other packages may hold protobuf back (lmms-eval's wandb pin keeps it below 7); transformers'
    copy of the same schema loads on older runtimes.

    Returns:
        ``ModelProto``: ``ModelProto().ParseFromString(open("tokenizer.model", "rb").read())`` reads a model.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as schema
    except Exception:  # noqa: BLE001 - protobuf's VersionError (an Exception), or the module is missing
        from transformers.utils import sentencepiece_model_pb2_new as schema
    return schema.ModelProto


class PaloLlamaTokenizer(SentencePieceBackend):
    """A SentencePiece LLaMA tokenizer with transformers-4.31 semantics.

    Encoding prepends BOS (``add_bos_token``), never appends EOS unless ``add_eos_token`` is set, and encodes each
    segment between special tokens with ``SentencePieceProcessor.encode`` (dummy prefix included). Decoding joins
    pieces with SentencePiece so byte-fallback pieces (``<0xE4>``...) become text again.

    It saves as ``tokenizer_class: LlamaTokenizer`` with the original ``tokenizer.model``, so folders it writes load
    in the original PALO code unchanged.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        legacy: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # 4.31's segment rule (module docstring), from the config; 4.31 took a config without the key as legacy.
        self.original_legacy = True if legacy is None else bool(legacy)
        # The backend's own non-legacy mode changes how the SentencePiece model is loaded; this class applies
        # 4.31's rule itself (tokenize, _tokenize) on the model as it is.
        kwargs["legacy"] = True
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Pieces of ``text`` as 4.31's slow tokenizer made them (see :meth:`added_token_spans`, :meth:`_tokenize`)."""
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        if not self.original_legacy:  # 4.31: one dummy prefix for the whole text, marked by the only "▁" left
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        if split_special_tokens:
            return self._tokenize(text)
        pieces: list[str] = []
        for start, end, added in self.added_token_spans(text):
            if added:
                pieces.append(text[start:end])
            else:
                pieces.extend(self._tokenize(text[start:end]))
        return pieces

    def added_token_spans(self, text: str) -> list[tuple[int, int, bool]]:
        """Where 4.31's ``tokenize`` split ``text`` on added tokens, as character spans.

        The whitespace beside an added token is dropped as 4.31 dropped it: a named special token of the config
        (BOS, EOS, unk, pad) strips only the sides its ``lstrip``/``rstrip`` name; any other added token
        (``<im_start>``, ``<im_end>``, ``<im_patch>``, which 4.31 held as plain strings) strips both sides, so
        ``"USER: <im_start>"`` has no ``▁`` before the token and ``"<im_end>\\nWhat"`` no newline after it.

        Returns:
            ``[(start, end, is_added_token), ...]`` in order; empty text segments are left out.

        Raises:
            NotImplementedError: For an added token with ``single_word`` (4.31 had no such rule to follow).
        """
        parts = self.tokens_trie.split(text)
        bounds = [0]
        for part in parts:
            bounds.append(bounds[-1] + len(part))
        spans = [[bounds[k], bounds[k + 1]] for k in range(len(parts))]
        encoder, decoder = self._added_tokens_encoder, self._added_tokens_decoder
        # The config's named tokens; transformers 5 also counts tokens added with special_tokens=True as special.
        named = {str(token) for token in self._special_tokens_map.values() if token is not None}
        for k, part in enumerate(parts):
            if part not in encoder:
                continue
            token = decoder.get(encoder[part])
            if getattr(token, "single_word", False):
                raise NotImplementedError(f"added token {part!r} has single_word=True, which 4.31 did not apply")
            strip_left = getattr(token, "lstrip", False) if part in named else True
            strip_right = getattr(token, "rstrip", False) if part in named else True
            if strip_right and k + 1 < len(spans):
                after = text[spans[k + 1][0]:spans[k + 1][1]]
                spans[k + 1][0] += len(after) - len(after.lstrip())
            if strip_left and k > 0:
                before = text[spans[k - 1][0]:spans[k - 1][1]]
                spans[k - 1][1] -= len(before) - len(before.rstrip())
        # The trie splits every added token out as a part of its own (the stripping above shortens only the text
        # parts), so a part is an added token exactly when the encoder knows it.
        return [(start, end, part in encoder) for (start, end), part in zip(spans, parts) if end > start]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """SentencePiece pieces of one segment between added tokens, by 4.31's rule for the config's ``legacy``."""
        if self.original_legacy:
            return self.sp_model.encode(text, out_type=str)
        first = text.startswith(SPIECE_UNDERLINE)
        if first:
            text = text[1:]
        tokens = self.sp_model.encode(text, out_type=str)
        if not first and not text.startswith(" ") and tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            # A segment after a special token: its dummy prefix is dropped (the piece may then be one the
            # vocabulary lacks, read as <unk>, as 4.31 read it).
            tokens = ([tokens[0][1:]] if len(tokens[0]) > 1 else []) + tokens[1:]
        return tokens

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output = output + bos + token_ids_1 + eos
        return output

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (int(self.add_bos_token) + int(self.add_eos_token)) * (2 if pair else 1)

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0]
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + bos + [0] * len(token_ids_1) + eos
        return mask

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Special tokens are not SentencePiece pieces of the text: decode the runs between them with SentencePiece.
        specials = set(self.all_special_tokens)
        out: list[str] = []
        run: list[str] = []
        prev_special = False
        for i, token in enumerate(tokens):
            if token in specials:
                if not prev_special and i != 0:
                    out.append(" ")
                out.append(self.sp_model.decode(run) + token)
                run = []
                prev_special = True
            else:
                run.append(token)
                prev_special = False
        out.append(self.sp_model.decode(run))
        return "".join(out)

    def streaming_decoder(self) -> Callable[[list[int]], str]:
        """``decode(ids, skip_special_tokens=True)`` for the short windows of streaming detokenization, cheaper.

        The generic decode rebuilds the special-token sets and the piece strings on every call, about 10 us for a
        window of three tokens, and a streaming server decodes a window for every token of every answer. This
        decoder takes the special ids once and hands the remaining ids straight to SentencePiece, which gives the
        same text; a window holding an id SentencePiece does not know (a token added after training) or one
        registered as an added token (whose text the generic path takes from the registry) takes the generic path,
        as does every window of a tokenizer that cleans up spaces. Take a new decoder after changing
        the tokenizer's special or added tokens.
        """
        if self.clean_up_tokenization_spaces:
            return lambda ids: self.decode(ids, skip_special_tokens=True)
        skip = frozenset(self.all_special_ids)
        added = frozenset(self.added_tokens_decoder) - skip
        pieces = self.sp_model.get_piece_size()
        sp_decode = self.sp_model.decode

        def decode(ids: list[int]) -> str:
            kept = [i for i in ids if i not in skip]
            if all(0 <= i < pieces and i not in added for i in kept):
                return sp_decode(kept)
            return self.decode(ids, skip_special_tokens=True)

        return decode

    def streaming_piece_texts(self) -> list[str | None] | None:
        """What each id adds to a decoded text that is not empty, so streaming can skip the decode for most tokens.

        SentencePiece turns a normal piece that follows some text into the piece itself with "▁" as a space (only
        a text's first piece loses a leading "▁"; byte pieces before it are flushed as they would be at the end), so
        ``decode(ids + [i]) == decode(ids) + texts[i]`` whenever ``decode(ids)`` is not empty. Every other id maps
        to None and needs a decode: special and added tokens, unknown, control, unused and byte-fallback pieces
        (bytes only make characters together). Returns None, no table at all, where the rule does not hold: a
        tokenizer that cleans up spaces, or a SentencePiece model with a denormalizer (applied to the whole text).
        Built once per set of special and added tokens.
        """
        if self.clean_up_tokenization_spaces or self._has_denormalizer():
            return None
        skip = frozenset(self.all_special_ids)
        added = frozenset(self.added_tokens_decoder)
        cached = getattr(self, "_piece_texts", None)
        if cached is not None and cached[0] == (skip, added):
            return cached[1]
        sp = self.sp_model
        texts: list[str | None] = []
        for i, piece in enumerate(sp.id_to_piece(list(range(sp.get_piece_size())))):
            special = i in skip or i in added or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
            text = None if special or sp.is_byte(i) else piece.replace("\u2581", " ")
            # A piece holding U+FFFD would look like half a character: let the decode path judge it.
            texts.append(text if text and "\ufffd" not in text else None)
        self._piece_texts = ((skip, added), texts)
        return texts

    def _has_denormalizer(self) -> bool:
        cached = getattr(self, "_denormalizer", None)
        if cached is None:
            try:
                proto = sentencepiece_model_proto()()
                proto.ParseFromString(self.sp_model.serialized_model_proto())
                cached = bool(proto.denormalizer_spec.precompiled_charsmap)
            except Exception:  # noqa: BLE001 - unreadable (no protobuf): assume the worst, decode every token
                cached = True
            self._denormalizer = cached
        return cached

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # Name the class the original code knows, so the folder stays loadable by PALO/LLaVA and by AutoTokenizer.
        config_path = os.path.join(save_directory, "tokenizer_config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config["tokenizer_class"] = "LlamaTokenizer"
        config["legacy"] = self.original_legacy
        # Said outright: transformers' own LlamaTokenizer (AutoTokenizer, vLLM, SGLang) added no BOS without them,
        # so every prompt it encoded from a folder saved here lacked the <s> the model was trained with.
        config["add_bos_token"], config["add_eos_token"] = self.add_bos_token, self.add_eos_token
        config.pop("backend", None)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        return files


def _tokenizer_class_name(path: str) -> str | None:
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        return json.load(f).get("tokenizer_class")


def load_tokenizer(path: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a checkpoint folder.

    LLaMA-family folders with a SentencePiece ``tokenizer.model`` get :class:`PaloLlamaTokenizer` (exact original
    ids); anything else goes through ``AutoTokenizer``.

    Args:
        path: A local folder holding the tokenizer files.
        **kwargs: Passed to ``from_pretrained`` (e.g. ``model_max_length``, ``padding_side``).

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: If the folder holds no tokenizer files.
    """
    kwargs.pop("use_fast", None)  # accepted for compatibility with the original calls; the choice is made here
    if (os.path.isfile(os.path.join(path, "tokenizer.model"))
            and _tokenizer_class_name(path) in _LLAMA_TOKENIZER_CLASSES):
        return PaloLlamaTokenizer.from_pretrained(path, **kwargs)
    has_files = any(
        os.path.isfile(os.path.join(path, name))
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )
    if not has_files:
        raise FileNotFoundError(
            f"No tokenizer files in {path!r}: expected tokenizer.model (SentencePiece) or tokenizer.json. "
            "A LoRA or stage-1 folder takes its tokenizer from --model-base."
        )
    name = _tokenizer_class_name(path)
    named_llama = name is not None and name in _LLAMA_TOKENIZER_CLASSES
    if named_llama and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        # transformers would build a LLaMA tokenizer of no vocabulary at all (3 special tokens), and the loader
        # would shrink the embeddings to it: a model that loads, answers and exports, all wrong.
        raise FileNotFoundError(
            f"{path!r} names a {name} in tokenizer_config.json but holds neither its tokenizer.model (SentencePiece) "
            "nor a tokenizer.json: copy the tokenizer files from the checkpoint it came from"
        )
    return AutoTokenizer.from_pretrained(path, **kwargs)
