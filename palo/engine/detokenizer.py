"""Incremental detokenization: each new token costs the decoding of a short window, not of the whole answer.

SentencePiece text depends on neighbouring pieces (a word-initial "▁" becomes a space only after other text; byte
pieces of one character only make sense together), so each step decodes a window of the last few tokens with and
without the new one and emits what the new one adds, and only once the text no longer ends in a half character
(U+FFFD). Chunks of Bengali, Hindi or Chinese text are therefore always whole characters, and they concatenate to the
decoding of the whole answer.

The window keeps its start for up to ``WINDOW`` tokens, so the text without the new token is the text the previous
step decoded with it: such steps decode once, not twice. Most steps decode nothing: a word piece that follows
non-empty text adds its own text (``PaloLlamaTokenizer.streaming_piece_texts``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
# Prompt tokens an answer that continues the prompt's text is decoded after: enough for SentencePiece to see that
# its first piece follows other text.
CONTEXT = 4
# Tokens a window grows to before its start moves up: longer windows cost more per decode, shorter ones more decodes.
WINDOW = 6
PROBE = 8  # characters of a stop string searched for at once when holding back its possible start


class IncrementalDetokenizer:
    """Turns a growing list of token ids into a growing text.

    Args:
        tokenizer: A transformers tokenizer.
        skip_special_tokens: As in ``tokenizer.decode``.
        stops: Stop strings, for :meth:`visible`.
        context: Token ids the answer's text continues (:func:`prompt_context`): the text is what the answer adds
            to their decoding, so a word-initial first piece keeps its space. Empty: the answer is decoded on its
            own, its first piece without the space (as the original worker's streamer showed chat answers).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, stops: Sequence[str] = (),
                 context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stops = tuple(s for s in stops if s)
        self._searched = 0  # no stop string starts before this point of `text` minus a stop string's length
        # PALO's SentencePiece tokenizer decodes short windows several times faster through its own decoder.
        streaming = getattr(tokenizer, "streaming_decoder", None) if skip_special_tokens else None
        self._decode_window = streaming() if streaming is not None else self._decode
        # Most tokens are word pieces whose text just follows the text so far: no decode at all for them.
        pieces = getattr(tokenizer, "streaming_piece_texts", None) if skip_special_tokens else None
        self._pieces: list[str | None] | None = pieces() if pieces is not None else None
        # Special ids that decode to nothing (skipped): read without a decode. Otherwise each one stayed in the
        # window unread, and a run of them (an ignore_eos answer past its </s>) decoded a window as long as the run
        # at every token.
        self._silent: frozenset[int] = frozenset(
            i for i in (getattr(tokenizer, "all_special_ids", None) or [] if skip_special_tokens else [])
            if self._decode([i]) == "")
        # The context's ids lead the answer's, as text already read: the first window decodes them with it.
        self._context = len(context)
        self.ids: list[int] = list(context)
        self.text = ""
        self._prefix = 0  # window start: enough context for the pieces after it to decode as in the full text
        self._read = len(context)  # tokens already turned into text
        self._before: str | None = None  # the decoding of ids[_prefix:_read], when known

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes (possibly empty)."""
        if token_id in self._silent and self._read == len(self.ids):
            # Nothing held back: the window's text with it is the text without it (and `_before` stays right).
            self.ids.append(token_id)
            self._read = len(self.ids)
            return ""
        pieces = self._pieces
        if pieces is not None and self.text and self._read == len(self.ids) and 0 <= token_id < len(pieces):
            piece = pieces[token_id]  # nothing held back, so `text` is the decoding of `ids`, and not empty
            if piece is not None:
                self.ids.append(token_id)
                # A later decode starts its window at this token (context for the one after it).
                self._prefix, self._read, self._before = len(self.ids) - 1, len(self.ids), None
                self.text += piece
                return piece
        self.ids.append(token_id)
        before = self._before
        if before is None:
            before = self._decode_window(self.ids[self._prefix:self._read])
        after = self._decode_window(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT) and after.startswith(before):
            delta = after[len(before):]
            if len(self.ids) - self._prefix < WINDOW:  # same start: the next step's text before its token is `after`
                self._read, self._before = len(self.ids), after
            else:  # the window starts at the tokens just emitted (context for the next one)
                self._prefix, self._read, self._before = self._read, len(self.ids), None
            self.text += delta
            return delta
        self._before = before  # nothing emitted: the window without the new token is unchanged
        return ""

    def flush(self) -> str:
        """At the end: what the whole answer's decoding has beyond the text emitted so far (a trailing half
        character, held back while more tokens could complete it)."""
        context = self._decode(self.ids[:self._context]) if self._context else ""
        full = self._decode(self.ids)
        shown = context + self.text
        delta = full[len(shown):] if full.startswith(shown) else ""
        self._prefix = self._read = len(self.ids)
        self._before = None
        self.text += delta
        return delta

    def visible(self, final: bool = False, search: bool = True) -> tuple[str, bool]:
        """:func:`visible_text` of the text so far with this detokenizer's stop strings, looking for them only
        where the text added since the last call could complete one (so an answer's stop search stays linear).

        Args:
            final: No more text follows (nothing is held back).
            search: False while the answer may not end yet (``min_tokens``): a stop string completed in the text
                so far is not looked for again, but a partial one at its end is still held back, so one that the
                next tokens complete is found whole.
        """
        text = self.text
        cut = first_stop(text, self.stops, self._searched) if search else -1
        if cut >= 0:
            return text[:cut], True
        self._searched = len(text)
        return held_back(text, self.stops, final), False


def first_stop(text: str, stops: Sequence[str], searched: int = 0) -> int:
    """Where the first stop string in ``text`` that ends past ``searched`` begins, or -1.

    Args:
        text: The text generated so far.
        stops: Stop strings (empty ones are ignored).
        searched: Length of the text already searched (a stop string wholly inside it was found then, or did not
            count then: ``min_tokens``).
    """
    cut = -1
    for stop in stops:
        if not stop:
            continue
        found = text.find(stop, max(0, searched - len(stop) + 1))
        if found >= 0 and (cut < 0 or found < cut):
            cut = found
    return cut


def prompt_context(tokenizer: Any, input_ids: Sequence[int]) -> list[int]:
    """The prompt's last few text ids, for an answer that continues its text (raw completions): those after its
    last image placeholder (a negative id), unless they decode to half a character (the answer's first byte
    tokens would complete it, and the two texts would not extend each other)."""
    tail: list[int] = []
    for token in reversed(input_ids):
        if token < 0 or len(tail) == CONTEXT:
            break
        tail.append(int(token))
    tail.reverse()
    if tail and tokenizer.decode(tail, skip_special_tokens=True).endswith(REPLACEMENT):
        return []
    return tail


def visible_text(text: str, stops: Sequence[str], final: bool) -> tuple[str, bool]:
    """The part of a growing text that can be shown without ever having to take it back.

    Cuts at the first complete stop string. While the text is still growing it also holds back a trailing partial
    stop string (``"#"`` might become ``"###"``) and trailing U+FFFD characters (half of a multi-byte character whose
    remaining byte tokens have not been generated yet), so the shown texts only ever extend each other.

    Args:
        text: The text generated so far.
        stops: Stop strings (empty ones are ignored).
        final: Whether generation has ended (nothing more is held back).

    Returns:
        ``(text to show, whether a stop string was found)``.
    """
    stops = [s for s in stops if s]
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    return held_back(text, stops, final), False


def held_back(text: str, stops: Sequence[str], final: bool) -> str:
    """``text`` (holding no complete stop string) less what may still change: a trailing partial stop string and
    trailing half characters, unless generation has ended."""
    if final:
        return text
    hold = 0  # the longest end of `text` that begins a stop string
    n = len(text)
    for stop in stops:
        # An end of PROBE characters or more begins with the stop's first PROBE: one C search finds each candidate,
        # longest first, so a long stop string costs a scan of the text's last len(stop) characters, not a slice
        # per length. Shorter ends are at most PROBE - 1 to try.
        probe = stop[:PROBE]
        i = text.find(probe, max(0, n - len(stop) + 1))
        while i >= 0 and n - i > hold:
            if stop.startswith(text[i:]):
                hold = n - i
                break
            i = text.find(probe, i + 1)
        for k in range(min(PROBE - 1, n, len(stop) - 1), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    shown = text[: n - hold]
    return shown.rstrip(REPLACEMENT)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes one SentencePiece token stands for on its own: a byte piece (``<0xE0>``) its byte, the word-start
    marker a space, special tokens their name. Part of a character is a byte or two here, where ``decode`` would
    give U+FFFD; joined in order, a word-initial token's bytes start with the space that ``decode`` drops at the
    very start of a text."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    match = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8")
