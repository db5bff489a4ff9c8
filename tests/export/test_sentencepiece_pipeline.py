"""The exported tokenizers pipeline encodes like SentencePiece itself, whatever the model's normalizer settings.

PALO's own tokenizer (tests/export/test_hf_llava.py) has LLaMA's settings; released LLaMA-family models differ in
extra-whitespace removal, normalization maps and user-defined pieces, so each is checked here against
``SentencePieceProcessor.encode`` on text in the 10 languages and awkward spacing.
"""

from __future__ import annotations

import io

import pytest

from palo.export.tokenizer import _sentencepiece_tokenizer
from palo.testing.corpus import all_text

SETTINGS = {
    "llama": dict(normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True),
    "nfkc_collapsing_spaces": dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
                                   byte_fallback=False),
    "user_defined_pieces": dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                                byte_fallback=True, user_defined_symbols=["<sep>", "##", "USER:"]),
    "no_dummy_prefix": dict(normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
                            add_dummy_prefix=False),
}
AWKWARD = [" leading space", "  two  spaces  ", "trailing ", "\n\nnewlines\n", "tab\tx", "emoji 🙂 ok", "",
           "a<sep>b ## c USER: d", "ｆｕｌｌ　ｗｉｄｔｈ ① Ⅻ", "x" * 50]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_pipeline_encodes_like_sentencepiece(tmp_path, name):
    import sentencepiece as spm

    buffer = io.BytesIO()
    options = dict(model_type="bpe", vocab_size=600, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                   pad_id=-1, split_digits=True, hard_vocab_limit=False, minloglevel=2)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(all_text() * 2), model_writer=buffer,
                                   **{**options, **SETTINGS[name]})
    path = tmp_path / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    processor = spm.SentencePieceProcessor(model_file=str(path))
    pipeline = _sentencepiece_tokenizer(str(path))
    for text in all_text() + AWKWARD:
        assert pipeline.encode(text, add_special_tokens=False).ids == processor.encode(text), (name, text)
        if SETTINGS[name]["byte_fallback"]:  # without byte fallback, unknown characters decode as <unk>
            assert pipeline.decode(processor.encode(text)) == processor.decode(processor.encode(text)), (name, text)
