"""``palo-data translate``: translate LLaVA-Instruct conversations into PALO's languages with any chat model.

PALO's multilingual set was made by translating LLaVA-Instruct-150K with a chat model and filtering the results
(docs/formats.md §8). This module is that pipeline, made safe to run on 150K samples x 9 languages:

* **Protected spans.** ``<image>`` is taken out of a turn before translation and put back at the *front* of the turn
  (``<image>\\n``), where training expects it (docs/compat.md#data).
  Code blocks, inline code, bracketed coordinates (``[0.12, 0.40, 0.55, 0.89]``) and numbers are replaced by
  placeholders ``[[1]]``, ``[[2]]`` ... that the model must copy; they are restored afterwards and checked.
* **Quality check on every translation** (:func:`check_translation`): target script, not a related language in
  that script (letters Russian, Arabic never write), not left in English nor the English copied beside it, a
  plausible length (an absolute bound for short sources), placeholders intact, no echoed instructions, no lines,
  made-up dialogue turns ("Human:", "GPT:") or notes ("Note: ...", "Hope this helps!", "Remarque : ...") the source
  does not have, no new angle brackets. A preamble a chat model puts before the translation ("Translation:", "Here
  is the translation:", "Voici la traduction :", "الترجمة:", "翻译：", a bare "Sure! " ...) is recognised by its
  place, the start of the reply, and removed (:func:`strip_preamble`), unless the source itself starts with such a
  label, or with one the preamble's word also means ("Transfer:" for "Перевод:"); whether the source mentions
  translation elsewhere does not matter. A failing
  translation is asked for once more with a stricter instruction that names the problems; if it fails again the sample
  is kept with ``corrupt: true`` and its bad turns go to a review file a person can correct
  (``palo-data apply-review``).
* **Resumable, nothing twice.** Every finished sample is appended (and flushed) to ``<language>.progress.jsonl``; a
  rerun skips what is there. Every translation (with its verdict) also goes to an SQLite cache keyed by
  (model, language, masked source text) the moment it arrives, shared across runs, so a rerun after a kill sends no
  string that was already translated, texts that differ only in numbers, coordinates or code are sent once, and
  identical strings in flight at once are sent once. A text that is nothing but such spans is not sent at all.
  Final files are written to a temp file and ``os.replace``-d.
* **Bounded concurrency** (``--parallel`` threads, one request in flight each) through the shared client of
  :mod:`palo.openai_client`: exponential backoff on 429, 408/409, 5xx, time-outs, dropped connections and malformed
  bodies, honouring ``Retry-After`` (seconds or an HTTP date). A sample whose requests still fail is left unfinished
  (not flagged): the run exits 1 and a rerun picks it up. A request the endpoint refuses for what it holds (HTTP
  400/413/422: context length exceeded, a content filter), or a reply the model declined (``content: null`` with a
  ``refusal``), is rejected like a bad reply instead (problem ``request refused: ...``), since asking again cannot
  help. A wrong key, access or model (HTTP 401/403/404) stops the run at the first such error, with what to fix;
  its samples stay unfinished, not flagged.
* **``--retry_rejected``** asks again for rejected texts the cache holds, and for the samples the resume log holds
  as ``corrupt``; a success replaces them.

Output per language, in ``--output_dir``: ``<language>.json`` (a JSON array: every input sample with its fields,
``conversations`` still English, ``<language>_conversation`` the translated turns, and ``corrupt``),
``<language>.review.jsonl`` (one line per rejected turn) and ``<language>.progress.jsonl`` (the resume log).

One module per concern:

* :mod:`~palo.data.translate.prompts`: target languages, ISO codes, per-language guidance, the system messages;
* :mod:`~palo.data.translate.spans`: ``<image>`` handling, masking and restoring protected spans;
* :mod:`~palo.data.translate.cleaning` and :mod:`~palo.data.translate.check`: what is stripped from a reply, and
  the quality check;
* :mod:`~palo.data.translate.cache` and :mod:`~palo.data.translate.translator`: the cache and the translator;
* :mod:`~palo.data.translate.samples`: one sample, and its per-language key (``arabic_conversation``);
* :mod:`~palo.data.translate.files` and :mod:`~palo.data.translate.runner`: the output files and the resumable run;
* :mod:`~palo.data.translate.cli`: the ``palo-data translate`` flags and entry point.

The names below are this package's interface (``palo.data.cli``, ``merge``, ``review`` and the tests use them).
"""

from __future__ import annotations

from palo.data.translate.cache import TranslationCache
from palo.data.translate.check import check_translation
from palo.data.translate.cleaning import clean_reply, strip_preamble
from palo.data.translate.cli import add_arguments, main_translate
from palo.data.translate.files import load_progress, output_paths, write_outputs
from palo.data.translate.prompts import (
    INSTRUCTIONS,
    ISO_CODES,
    TARGET_LANGUAGES,
    parse_target_language,
    system_prompt,
)
from palo.data.translate.runner import run
from palo.data.translate.samples import conversation_key, source_hash, translate_sample
from palo.data.translate.spans import Masked, join_image, mask, placeholder_problems, restore, split_image
from palo.data.translate.translator import RequestFailed, TextResult, Translator
from palo.jsonl import atomic_write, atomic_write_json

__all__ = [
    "INSTRUCTIONS",
    "ISO_CODES",
    "TARGET_LANGUAGES",
    "Masked",
    "RequestFailed",
    "TextResult",
    "TranslationCache",
    "Translator",
    "add_arguments",
    "atomic_write",
    "atomic_write_json",
    "check_translation",
    "clean_reply",
    "conversation_key",
    "join_image",
    "load_progress",
    "main_translate",
    "mask",
    "output_paths",
    "parse_target_language",
    "placeholder_problems",
    "restore",
    "run",
    "source_hash",
    "split_image",
    "strip_preamble",
    "system_prompt",
    "translate_sample",
    "write_outputs",
]
