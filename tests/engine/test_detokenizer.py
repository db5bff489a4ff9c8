"""Incremental detokenization on the tiny multilingual SentencePiece model (byte fallback included)."""

from __future__ import annotations

import pytest

from palo.engine.detokenizer import IncrementalDetokenizer, prompt_context, visible_text
from palo.model.tokenizer import PaloLlamaTokenizer

TEXTS = {
    # In the tokenizer's corpus, and characters it has never seen (they become UTF-8 byte pieces).
    "bengali": "এই ছবিতে কী দেখানো হয়েছে? ঝড়ের পরে আকাশ পরিষ্কার।",
    "chinese": "这张图片里有什么？鳄鱼在河边晒太阳。",
    "hindi": "इस चित्र में क्या दिखाया गया है? ॐ",
    "mixed": "A red circle, 红色的圆形 and লাল বৃত্ত, 🦜 ✓.",
}


def decode_continuation(tokenizer, context: list[int], ids: list[int]) -> str:
    """The reference: ``ids``' text after ``context``'s, from whole decodings (no longer used by the static engine,
    which decoded the whole answer this way at every step)."""
    if not context:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    before = tokenizer.decode(list(context), skip_special_tokens=True)
    full = tokenizer.decode([*context, *ids], skip_special_tokens=True)
    return full[len(before):] if full.startswith(before) else tokenizer.decode(list(ids), skip_special_tokens=True)


@pytest.fixture(scope="module")
def tokenizer(world):
    return PaloLlamaTokenizer.from_pretrained(world.tokenizer_dir)


@pytest.mark.parametrize("language", sorted(TEXTS))
def test_chunks_are_whole_characters_and_concatenate_to_the_decoding(tokenizer, language):
    ids = tokenizer(TEXTS[language], add_special_tokens=False).input_ids
    byte_pieces = [t for t in ids if tokenizer.convert_ids_to_tokens(t).startswith("<0x")]
    assert byte_pieces, "the text should exercise byte-fallback pieces"
    detok = IncrementalDetokenizer(tokenizer)
    chunks = [detok.push(t) for t in ids]
    chunks.append(detok.flush())
    for chunk in chunks:
        assert "\ufffd" not in chunk
        chunk.encode("utf-8")  # valid text
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True) == detok.text
    assert sum(1 for c in chunks if c) > 3  # streamed piece by piece


class Counting:
    """A tokenizer seen through ``decode`` only, recording the length of every window it decodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.windows: list[int] = []

    def decode(self, window, skip_special_tokens=True):
        self.windows.append(len(window))
        return self.tokenizer.decode(window, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_short_window_not_the_whole_answer(tokenizer):
    ids = tokenizer(TEXTS["chinese"] * 8, add_special_tokens=False).input_ids
    counting = Counting(tokenizer)
    detok = IncrementalDetokenizer(counting)
    for t in ids:
        detok.push(t)
    assert detok.text == tokenizer.decode(ids)
    assert max(counting.windows) < 12 < len(ids)


def test_a_half_character_at_the_end_is_flushed_as_the_full_decoding_has_it(tokenizer):
    ids = tokenizer("鳄", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    shown = "".join(detok.push(t) for t in ids[:-1])
    assert shown.strip() == ""  # held back: the character is not complete yet
    rest = detok.flush()
    assert shown + rest == tokenizer.decode(ids[:-1])


def test_most_steps_decode_once(tokenizer):
    ids = tokenizer(" ".join(TEXTS.values()) * 4, add_special_tokens=False).input_ids
    counting = Counting(tokenizer)
    detok = IncrementalDetokenizer(counting)
    for t in ids:
        detok.push(t)
    assert detok.text + detok.flush() == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(counting.windows) < 1.4 * len(ids)  # two fresh windows per token would be 2x


class CountingStreaming:
    """The tokenizer with its streaming decoder and piece texts, counting the windows the decoder decodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.windows = 0

    def streaming_decoder(self):
        decode = self.tokenizer.streaming_decoder()

        def counted(ids):
            self.windows += 1
            return decode(ids)
        return counted

    def streaming_piece_texts(self):
        return self.tokenizer.streaming_piece_texts()

    def decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("language", sorted(TEXTS))
def test_word_pieces_after_some_text_need_no_decode(tokenizer, language):
    ids = tokenizer(TEXTS[language] + " " + TEXTS["mixed"], add_special_tokens=False).input_ids
    counting = CountingStreaming(tokenizer)
    detok = IncrementalDetokenizer(counting)
    chunks = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in c for c in chunks)
    bytes_ = sum(tokenizer.sp_model.is_byte(t) for t in ids)
    assert counting.windows <= 2 * bytes_ + 0.3 * len(ids)  # only byte runs and what follows them decode


@pytest.mark.parametrize("seed", range(3))
def test_random_ids_stream_to_the_decoding_of_the_whole_answer(tokenizer, seed):
    """Any mix of word pieces, byte pieces (valid UTF-8 or not) and special ids: the chunks add up to the answer."""
    import random

    rng = random.Random(seed)
    vocab = tokenizer.sp_model.get_piece_size()
    byte_ids = [i for i in range(vocab) if tokenizer.sp_model.is_byte(i)]
    utf8 = tokenizer("ঝড় 鳄 ॐ 🦜", add_special_tokens=False).input_ids
    for _ in range(60):
        ids = []
        while len(ids) < rng.randint(1, 40):
            kind = rng.random()
            if kind < 0.5:
                ids.append(rng.randrange(vocab))
            elif kind < 0.75:
                ids.extend(rng.choices(byte_ids, k=rng.randint(1, 4)))
            elif kind < 0.9:
                start = rng.randrange(len(utf8))
                ids.extend(utf8[start:start + rng.randint(1, 6)])
            else:
                ids.append(rng.choice([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]))
        detok = IncrementalDetokenizer(tokenizer)
        chunks = [detok.push(t) for t in ids] + [detok.flush()]
        assert "".join(chunks) == detok.text == tokenizer.decode(ids, skip_special_tokens=True), ids
        # Continuing a prompt: the chunks add up to what the answer adds to the prompt's text.
        prompt = tokenizer(rng.choice(list(TEXTS.values())) + rng.choice(["", " and", " 鳄"])).input_ids
        context = prompt_context(tokenizer, [-200, *prompt])
        detok = IncrementalDetokenizer(tokenizer, context=context)
        chunks = [detok.push(t) for t in ids] + [detok.flush()]
        assert "".join(chunks) == detok.text == decode_continuation(tokenizer, context, ids), ids


def test_a_continuation_keeps_the_space_of_its_first_word_and_takes_no_half_character_as_context(tokenizer):
    word = tokenizer("hello", add_special_tokens=False).input_ids[0]  # "▁he..." : word-initial
    prompt = tokenizer("Le chat").input_ids
    context = prompt_context(tokenizer, prompt)
    assert context == prompt[-4:] and -200 not in prompt_context(tokenizer, [*prompt, -200, *prompt[1:3]])
    detok = IncrementalDetokenizer(tokenizer, context=context)
    streamed = detok.push(word) + detok.push(word) + detok.flush()
    alone = tokenizer.decode([word, word], skip_special_tokens=True)
    assert streamed == " " + alone == tokenizer.decode(prompt + [word] * 2, skip_special_tokens=True)[len("Le chat"):]
    cut = tokenizer("鳄", add_special_tokens=False).input_ids[:-1]  # the first bytes of a character
    assert tokenizer.decode(cut).endswith("\ufffd") and prompt_context(tokenizer, cut) == []


@pytest.mark.parametrize("seed", range(4))
def test_visible_text_found_incrementally_is_the_rule_applied_to_the_whole_text(seed):
    """Searching only the new end of the text cuts, holds back and stops exactly where the whole-text rule does."""
    import random

    rng = random.Random(seed)
    alphabet = ["#", "##", "a", " ", "\n", "</s>", "<", "/s", ">", "USER", ":", "\ufffd", "ঝ", "鳄"]
    for _ in range(200):
        stops = rng.choice([(), ("###",), ("</s>",), ("###", "USER:"), ("\n\n", "#"), ("ab", "b#")])
        detok = IncrementalDetokenizer(tokenizer=None, stops=stops)
        for _ in range(rng.randint(1, 30)):
            detok.text += "".join(rng.choices(alphabet, k=rng.randint(0, 3)))
            final = rng.random() < 0.1
            got = detok.visible(final)
            assert got == visible_text(detok.text, stops, final), (stops, detok.text)
            if got[1]:
                break


def test_held_back_text_is_the_longest_end_that_could_begin_a_stop_string():
    """Against the definition, on random texts and stop strings over a small alphabet (many partial matches)."""
    import random

    rng = random.Random(5)
    for _ in range(3000):
        text = "".join(rng.choices("ab#", k=rng.randint(0, 30)))
        stops = ["".join(rng.choices("ab#", k=rng.randint(1, 24))) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.5:  # a stop string that the text's end begins, often longer than 8 characters
            cut = rng.randint(0, len(text))
            stops[0] = text[cut:] + "".join(rng.choices("ab#", k=rng.randint(1, 6)))
        if any(stop in text for stop in stops):
            continue  # the rule holds back only in text that has no complete stop string
        hold = max((k for stop in stops for k in range(len(stop)) if k <= len(text) and text.endswith(stop[:k])),
                   default=0)
        assert visible_text(text, stops, final=False) == (text[: len(text) - hold], False), (text, stops)


@pytest.mark.parametrize("fast_paths", [True, False], ids=["palo tokenizer", "decode only"])
def test_a_run_of_skipped_special_tokens_is_read_without_growing_the_window(tokenizer, fast_paths):
    """An ignore_eos answer past its </s> (serving benchmarks ask for them) pushed </s> after </s>: each adds no
    text, so none was read, and every push decoded a window as long as the run (311 us a token at 16,000)."""

    class Counting:
        decoded = 0

        def __getattr__(self, name):
            if name.startswith("streaming_") and not fast_paths:
                raise AttributeError(name)
            return getattr(tokenizer, name)

        def decode(self, ids, **kwargs):
            Counting.decoded += len(ids)
            return tokenizer.decode(ids, **kwargs)

    words = tokenizer("Describe the picture. 这是什么？", add_special_tokens=False).input_ids
    ids = words + [tokenizer.eos_token_id] * 600 + words + [tokenizer.eos_token_id] * 600
    detok = IncrementalDetokenizer(Counting())
    chunks = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(chunks) == detok.text == tokenizer.decode(ids, skip_special_tokens=True)
    if not fast_paths:  # every window decode is counted: a few ids per token, not the run so far
        assert Counting.decoded < 20 * len(ids), Counting.decoded
