"""The quality check every translation passes before it is accepted (:func:`check_translation`)."""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from palo.data.languages import _LETTER_RE, _SCRIPT_RE, _WEIGHT, LANGUAGES, detect_language
from palo.data.translate.cleaning import preamble_of
from palo.data.translate.spans import _PLACEHOLDER_RE, placeholder_problems

# Scripts (in palo.data.languages' names) whose letters count as "written in the target script".
_TARGET_SCRIPTS = {
    "chinese": ("han",), "japanese": ("kana", "han"), "russian": ("cyrillic",), "arabic": ("arabic",),
    "urdu": ("arabic",), "hindi": ("devanagari",), "bengali": ("bengali",), "french": ("latin",),
    "spanish": ("latin",),
}
_CJK = ("chinese", "japanese")
# Letters in the target script / all letters, both weighed as detect_language weighs them (a Han or Kana character
# counts twice) and both counted on the words the translation does not copy from the English (:func:`_own_words`).
# Below this the text is mostly in another script.
MIN_SCRIPT_RATIO = 0.6
# Japanese writes short answers in Kanji alone ("赤。", "東京駅。"), which look like Chinese: up to this many Han
# characters without Kana say nothing about which of the two a reply is. Longer Japanese has Kana.
MAX_KANJI_ONLY = 6
# len(translation) / len(source), checked for sources of at least SHORT_SOURCE characters (short strings vary too
# much). CJK packs a word into one or two characters; everything else runs about 0.8-1.4x English.
LENGTH_RATIO = {"chinese": (0.12, 1.5), "japanese": (0.15, 1.8)}
DEFAULT_LENGTH_RATIO = (0.35, 3.0)
# A shorter source may be translated into at most what one of SHORT_SOURCE characters may (the ratio's upper bound
# times SHORT_SOURCE: 120 characters, 60 in Chinese): "What is this?" answered with a page is invented text.
SHORT_SOURCE = 40
# Phrases of a chat model talking about the task instead of doing it.
_ECHO_RE = re.compile(
    r"\btranslat(?:e|ed|ion|ing)\b|\bhere is\b|\bhere's\b|\bas an ai\b|\bi cannot\b|\bi can't\b|\bi'm sorry\b"
    r"|\boutput only\b|\bplaceholder|\[\[n\]\]|\benglish\b",
    re.IGNORECASE,
)
# A chat model declining or apologising in the target language ("Je suis désolé, je ne peux pas faire cela.",
# "抱歉，我无法完成这个请求。"), which replaces a short turn whole. First-person phrases only: "il ne peut pas" is
# content.
_REFUSAL_RE = re.compile("|".join((
    r"\bje suis désolée?\b", r"\bje ne peux pas\b", r"\bje ne suis pas en mesure\b", r"\bje m['’]excuse\b",  # French
    r"\blo (?:siento|lamento)\b", r"\bno puedo\b", r"\bno me es posible\b",  # Spanish
    r"\bизвините\b", r"\bпростите\b", r"\bя не могу\b", r"\bне могу помочь\b",  # Russian
    "抱歉", "对不起", "我无法", "我不能",  # Chinese
    "申し訳", "すみません", "ごめんなさい", "お手伝いできません", "お応えできません",  # Japanese
    "عذر\u064b?ا", "آسف", "أعتذر", "لا أستطيع", "لا يمكنني",  # Arabic (عذرا / عذرًا)
    "क्षमा (?:करें|कीजिए)", "मा(?:\u092b\u093c?|\u095e) (?:करें|कीजिए)", "मुझे खेद है", "मदद नहीं कर सकत",  # Hindi
    "আমি দুঃখিত", "দুঃখিত,", "ক্ষমা করবেন", "সাহায্য করতে পার(?:ব|ছি|ি) না",  # Bengali (দুঃখিত alone: also "sad")
    "معذرت", "معاف (?:کیج|کری)", "مدد نہیں کر سکت",  # Urdu
)), re.IGNORECASE)
# An English source that apologises or declines itself ("Sorry, I can't see the plate"): its translation may too.
_SOURCE_REFUSAL_RE = re.compile(
    r"\b(?:sorry|apolog\w*|excuse|pardon|regret\w*|afraid|unfortunately|unable|cannot|can['’]?t|not able|"
    r"not possible|impossible)\b", re.IGNORECASE)
_WORD_RE = re.compile(r"[^\W\d_]+")
# A run of Latin letters, and a run of letters of any other script: "一部iPhone" is one word to _WORD_RE, but its
# "iPhone" is copied from the English while the rest is not.
_LATIN = _SCRIPT_RE["latin"].pattern
_SCRIPT_WORD_RE = re.compile(f"(?:{_LATIN})+|(?:(?!{_LATIN})[^\\W\\d_])+")
# Arabic-script letters only Urdu (of PALO's languages) writes: retroflex ٹ ڈ ڑ, noon ghunna ں, yeh barree ے ۓ,
# heh goal ہ ۂ, teh marbuta goal ۃ; and the Urdu full stop ۔.
_URDU_ONLY_RE = re.compile("[\u0679\u0688\u0691\u06ba\u06d2\u06d3\u06c1\u06c2\u06c3\u06d4]")
# Arabic-script letters Arabic never writes but Persian (and Urdu) do: peh پ, tcheh چ, jeh ژ, gaf گ, and the Persian
# forms of yeh ی (U+06CC; Arabic: ي U+064A, ى U+0649) and kaf ک (U+06A9; Arabic: ك U+0643).
_NOT_ARABIC_RE = re.compile("[\u067e\u0686\u0698\u06af\u06cc\u06a9]")
# Cyrillic letters Russian never writes: Ukrainian і ї є ґ (Belarusian і too).
_NOT_RUSSIAN_RE = re.compile("[\u0456\u0457\u0454\u0491\u0406\u0407\u0404\u0490]")
# A chat-log role marker: a turn the model went on to make up ("...\nHuman: Et le chien ?\nGPT: Il dort aussi.").
_ROLE_RE = re.compile(r"(?<![^\W_])(?:human|gpt|chatgpt|user|assistant|system)\s*[:：]", re.IGNORECASE)
# Where a label ("Note:") starts: the text, a line, a parenthesis or a sentence ("La note : 15/20" is a grade).
_LABEL_AT = r"(?:^|(?<=[\n(（.!?。！？]))\s*"
# English a model adds about its work or to its reader ("Note: 'peacefully' was rendered as ...", "Hope this
# helps!", "Let me know if you need anything else."). Flagged when the source does not say the same.
_NOTE_RE = re.compile(
    _LABEL_AT + r"(?:translator['’]s\s+)?notes?\s*[:：]|\bnote that\b|\bhope (?:this|that|it) helps\b|\bi hope\b"
    r"|\blet me know\b|\bfeel free\b|\banything else\b|\bif you (?:need|have|want|would like)\b"
    r"|\brendered as\b|\bliteral(?:ly)?\b",
    re.IGNORECASE,
)
# The same in the target languages, each with what the source must say for it to be a translation instead: a
# label "Remarque :", "Nota:", "注：" ... (source: note, remark, caution ...), or a wish that it helps (source: hope,
# help, useful).
_TARGET_NOTES = (
    (re.compile(
        _LABEL_AT + r"(?:remarque|note|nota|nb|n\.b\.|примечание|注|注意|备注|備考|ملاحظة|टिप्पणी|नोट|দ্রষ্টব্য|নোট|نوٹ)"
        r"\s*[:：]", re.IGNORECASE),
     # ("Note :", "Nota:" are also a grade.)
     re.compile(r"\b(?:notes?|noted|remarks?|nb|n\.b|caution|attention|warning|important|p\.?s|grades?|scores?|"
                r"marks?|rating|rated)\b", re.IGNORECASE)),
    (re.compile(
        r"\bj['’]esp[èe]re que (?:cela|ça|ceci|c['’]est)\b|\bespero que (?:esto|esta|te|le|les|sea|sirva)\b"
        r"|надеюсь,? (?:это|что это)|希望(?:这|這|以上)|お役に立て", re.IGNORECASE),
     re.compile(r"\b(?:hope[sd]?|hoping|help\w*|useful)\b", re.IGNORECASE)),
    # A word for "translation" ("(Traduction littérale)", "（翻译说明）") where the source has none: about the work.
    # Not Russian: "перевод" is also a transfer.
    (re.compile(r"\btraduc\w*|\btradu[iz]\w*|翻译|翻譯|翻訳|ترجم|अनुवाद|অনুবাদ", re.IGNORECASE),
     re.compile(r"\btranslat\w*|\binterpret\w*", re.IGNORECASE)),
)
# A run of copied English words counts from this many words on (shorter runs are names and common words).
MIN_COPIED_RUN = 3
# Share of the source's words a reply may hold verbatim (in runs, in order) beside a translation of its own.
MAX_COPIED_SHARE = 0.7
# A reply left partly in English ("What is the man on the left держит?"): the words it keeps verbatim from the source
# in runs of MIN_COPIED_RUN or more, names and quoted text aside, must be fewer than this share of the source's words,
# and fewer than LONG_KEPT_RUN one after the other (a sentence of a long turn left untranslated: "It is a dog.").
MAX_KEPT_SHARE = 0.5
LONG_KEPT_RUN = 4
# Quoted text (a sign, a title) may stay in English: "...", “...”, ‘...’, «...», „...“, 「...」, 『...』, 《...》,
# ‹...›, and '...' when the marks stand outside words (not the apostrophes of "l'image" or "it's").
_QUOTED_RE = re.compile(r'"[^"\n]*"|“[^”\n]*”|‘[^’\n]*’|«[^»\n]*»|„[^“”\n]*[“”]|「[^」\n]*」|『[^』\n]*』|《[^》\n]*》'
                        r"|‹[^›\n]*›|(?<![^\W_])'[^'\n]*'(?![^\W_])")
# Where a sentence ends, and what may stand between that and the next sentence's first word.
_SENTENCE_END = ".!?…\n"
_OPENERS = " \t\"'“‘«„「『《‹(["
# A word glued to more by a digit or by "_", ".", "/", "@", "\\" or ":" without a space: a part of a name a
# translation keeps (a file name, an address, an identifier), not English left untranslated.
_GLUED_RE = re.compile(r"\d|[_./@\\:]\w")
_GLUED_BEFORE_RE = re.compile(r"(?:\d|\w[_./@\\:])\Z")


def _letters(text: str) -> int:
    return len(_LETTER_RE.findall(text))


def _own_words(translation: str, source: str) -> str:
    """``translation`` without the words it shares with ``source``: names, brands and quoted signs copied from the
    English ("El Paso", "Le Petit Château", "iPhone", "Welcome to the park") say nothing about the language the
    translation is written in. Words are runs of one script, so a name glued to Chinese text is one word of its own."""
    shared = {word.lower() for word in _SCRIPT_WORD_RE.findall(source)}
    return _SCRIPT_WORD_RE.sub(lambda m: " " if m.group(0).lower() in shared else m.group(0), translation)


def _script_letters(text: str, language: str) -> tuple[int, int]:
    """(letters in ``language``'s script, all letters) of ``text``, Han and Kana weighed as detect_language does:
    one character stands for about a word, which other scripts spell with several letters."""
    counts = {name: len(_SCRIPT_RE[name].findall(text)) for name in {*_WEIGHT, *_TARGET_SCRIPTS[language]}}
    letters = _letters(text) + sum((weight - 1) * counts[name] for name, weight in _WEIGHT.items())
    return sum(_WEIGHT.get(name, 1) * counts[name] for name in _TARGET_SCRIPTS[language]), letters


def _weighted_letters(text: str) -> int:
    """Letters of ``text``, a Han or Kana character counting as detect_language counts it (about a word)."""
    return _letters(text) + sum((weight - 1) * len(_SCRIPT_RE[name].findall(text)) for name, weight in _WEIGHT.items())


def _copies_source(bare: str, bare_source: str) -> bool:
    """Whether ``bare`` holds the English source verbatim, or most of it (runs of MIN_COPIED_RUN words or more, in
    order, covering MAX_COPIED_SHARE of its words), *beside* text of its own: the source copied back after (or
    before) its translation. A reply that is little more than the source ("Le New York Times." for "The New York
    Times.") is left to the language checks."""
    source_words = [w.lower() for w in _SCRIPT_WORD_RE.findall(bare_source)]
    if len(source_words) < 4:
        return False
    matches = list(_SCRIPT_WORD_RE.finditer(bare))
    words = [m.group(0).lower() for m in matches]
    vocabulary = set(source_words)
    if sum(w in vocabulary for w in words) < MAX_COPIED_SHARE * len(source_words):  # cheap: most replies stop here
        return False
    blocks = [b for b in SequenceMatcher(None, source_words, words, autojunk=False).get_matching_blocks()
              if b.size >= MIN_COPIED_RUN]
    if sum(b.size for b in blocks) < MAX_COPIED_SHARE * len(source_words):
        return False
    copied = {k for b in blocks for k in range(b.b, b.b + b.size)}
    rest = "".join(" " if k in copied else m.group(0) for k, m in enumerate(matches))
    return _weighted_letters(rest) >= 0.3 * _weighted_letters(bare_source)


def _quoted(text: str, matches: list[re.Match]) -> list[bool]:
    """Per word of ``matches`` (found in ``text``), whether it stands inside quotation marks."""
    spans = [m.span() for m in _QUOTED_RE.finditer(text)]
    return [any(start < m.start() < end for start, end in spans) for m in matches]


def _is_name(text: str, match: re.Match) -> bool:
    """Whether a word of the English ``text`` reads as (part of) a name: a capital inside it ("iPhone", "NVIDIA"),
    a capital initial away from the start of a sentence ("the New York Times"), or a part of a file name, address
    or identifier ("train_model.py", "www.example.com", "python3"). A sentence's first word and "I" are capitalised
    whatever they are."""
    word = match.group(0)
    start, end = match.span()
    if (any(c.isupper() for c in word[1:]) or _GLUED_RE.match(text, end)
            or _GLUED_BEFORE_RE.search(text[max(0, start - 2):start])):
        return True
    if not word[0].isupper() or len(word) == 1:
        return False
    while start > 0 and text[start - 1] in _OPENERS:
        start -= 1
    return start > 0 and text[start - 1] not in _SENTENCE_END


def _kept_english(bare: str, bare_source: str) -> str | None:
    """What of the English source ``bare`` keeps as it was instead of translating it, when that is a substantial
    part: the source's words copied in runs of MIN_COPIED_RUN or more ("What is the man on the left держит?"),
    not counting names ("New York Times", "MacBook Pro", "train_model.py") nor text quoted in either (a sign, a
    title), which a translation keeps in English, make MAX_KEPT_SHARE of the source's words or more, or hold
    LONG_KEPT_RUN such words one after the other.

    Such a reply passes the language checks, which judge the words the translation does not share with the source
    (:func:`_own_words`): what is left of it is in the target language.

    Returns:
        The problem, quoting the longest stretch of kept words; None when the reply keeps no substantial part.
    """
    source_matches = list(_SCRIPT_WORD_RE.finditer(bare_source))
    source_words = [m.group(0).lower() for m in source_matches]
    matches = list(_SCRIPT_WORD_RE.finditer(bare))
    words = [m.group(0).lower() for m in matches]
    vocabulary = set(source_words)
    if sum(w in vocabulary for w in words) < MIN_COPIED_RUN:  # cheap: most replies stop here
        return None
    blocks = [b for b in SequenceMatcher(None, source_words, words, autojunk=False).get_matching_blocks()
              if b.size >= MIN_COPIED_RUN]
    if not blocks:
        return None
    source_free = [not (_is_name(bare_source, m) or quoted) for m, quoted in
                   zip(source_matches, _quoted(bare_source, source_matches))]
    reply_quoted = _quoted(bare, matches)
    kept, longest, run = 0, 0, (0, 0)
    for block in blocks:
        first = None  # where the current stretch of kept words starts in the reply
        for j in range(block.size):
            if not source_free[block.a + j] or reply_quoted[block.b + j]:
                first = None
                continue
            kept += 1
            first = block.b + j if first is None else first
            if block.b + j + 1 - first > longest:
                longest, run = block.b + j + 1 - first, (matches[first].start(), matches[block.b + j].end())
    if kept < MIN_COPIED_RUN or (kept < MAX_KEPT_SHARE * len(source_words) and longest < LONG_KEPT_RUN):
        return None
    snippet = bare[run[0]:run[1]]
    snippet = snippet if len(snippet) <= 60 else snippet[:57] + "..."
    return (f"partly left in English ({kept} of the source's {len(source_words)} words kept as they are, "
            f"e.g. {snippet!r})")


def _lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip())


def has_words(masked_text: str) -> bool:
    """Whether a masked text has letters outside its placeholders, i.e. anything a model could translate."""
    return _letters(_PLACEHOLDER_RE.sub(" ", masked_text)) > 0


def check_translation(source: str, translation: str, language: str, n_placeholders: int = 0) -> list[str]:
    """Problems with one translated (still masked) text; an empty list means it is accepted.

    Args:
        source: The masked English text that was sent.
        translation: The model's reply, cleaned but not yet restored.
        language: The target language (a PALO language name).
        n_placeholders: How many placeholders ``source`` holds.

    Returns:
        Human-readable problems, each naming what failed (they are shown to the model on the stricter retry and
        to the reviewer).
    """
    if not translation.strip():
        return ["empty translation"]
    problems = placeholder_problems(translation, n_placeholders)
    preamble = preamble_of(translation, source)
    if preamble:
        problems.append(f"begins with a preamble ({preamble.group(0).strip()!r}), not with the translation")
    bare = _PLACEHOLDER_RE.sub(" ", translation)
    bare_source = _PLACEHOLDER_RE.sub(" ", source)
    letters, source_letters = _letters(bare), _letters(bare_source)
    words = len(_WORD_RE.findall(bare_source))
    if source_letters and letters == 0:
        problems.append("no words in the translation")
    elif letters:
        # Judge the language on what the model wrote itself: names and quoted text copied from the English are in
        # Latin letters whatever the target. A reply made only of copied words is judged whole (it is English).
        own = _own_words(bare, bare_source)
        if not _letters(own):
            own = bare
        in_script, own_letters = _script_letters(own, language)
        if in_script / own_letters < MIN_SCRIPT_RATIO:
            problems.append(f"not written in {language} script ({in_script}/{own_letters} letters are)")
        elif language in ("french", "spanish"):
            # Latin script passes the script test even when nothing was translated, or when the reply is in the other
            # of the two, so look at the words (below 4, too few stopwords and accents to decide).
            if words >= 4:
                other = "spanish" if language == "french" else "french"
                detected = detect_language(own)
                if detected == "english":
                    problems.append("still English")
                elif detected == other:
                    problems.append(f"looks like {other}, not {language}")
        elif _letters(own) >= 12 or language in _CJK:
            detected = detect_language(own)
            # Kana in a "Chinese" reply, or Urdu-only letters in an "Arabic" one (and vice versa) mean the wrong
            # language in the right script. Short Arabic-script texts can lack the telling letters, hence >= 12, and
            # short Japanese ones the Kana.
            undecided = (language == "arabic" and letters < 30) or (
                language == "japanese" and detected == "chinese"
                and len(_SCRIPT_RE["han"].findall(own)) <= MAX_KANJI_ONLY)
            if detected in LANGUAGES and detected != language and not undecided:
                problems.append(f"looks like {detected}, not {language}")
        if language == "arabic" and not any("looks like" in p for p in problems):
            # However short: below 30 letters the letter count is not trusted, but these letters never occur in
            # Arabic.
            if _URDU_ONLY_RE.search(bare):
                problems.append("looks like urdu, not arabic (letters only Urdu writes)")
            elif foreign := sorted(set(_NOT_ARABIC_RE.findall(bare))):
                problems.append(f"looks like persian, not arabic (letters Arabic does not write: {' '.join(foreign)})")
        if language == "russian" and (foreign := sorted(set(_NOT_RUSSIAN_RE.findall(own)))):
            problems.append(f"looks like ukrainian, not russian (letters Russian does not write: {' '.join(foreign)})")
    if words >= 3 and bare.strip().lower() == bare_source.strip().lower():
        problems.append("left unchanged (still English)")
    elif (len(bare_source.strip()) >= 40 and bare_source.strip().lower() in bare.lower()) or _copies_source(
            bare, bare_source):
        problems.append("echoes the English source")
    elif kept := _kept_english(bare, bare_source):
        problems.append(kept)
    low, high = LENGTH_RATIO.get(language, DEFAULT_LENGTH_RATIO)
    if len(source) >= SHORT_SOURCE:
        ratio = len(translation) / len(source)
        if not low <= ratio <= high:
            problems.append(f"implausible length ratio {ratio:.2f} (expected {low}-{high})")
    elif len(translation) > high * SHORT_SOURCE:
        problems.append(f"implausibly long for a short source ({len(translation)} characters for {len(source)}; "
                        f"at most {high * SHORT_SOURCE:.0f})")
    if _lines(translation) > _lines(source):
        # The prompt asks to keep line breaks: a line more is text added (a note, a made-up turn) in any language.
        problems.append(f"has {_lines(translation)} lines where the source has {_lines(source)} (text added?)")
    roles = {m.group(0).lower() for m in _ROLE_RE.finditer(bare)} - {
        m.group(0).lower() for m in _ROLE_RE.finditer(bare_source)}
    if roles:
        problems.append(f"adds dialogue turns ({', '.join(sorted(roles))}) the source does not have")
    notes = {m.group(0).strip().lower() for m in _NOTE_RE.finditer(bare)} - {
        m.group(0).strip().lower() for m in _NOTE_RE.finditer(bare_source)}
    notes |= {m.group(0).strip().lower() for pattern, said in _TARGET_NOTES if not said.search(bare_source)
              for m in pattern.finditer(bare)}
    if notes:
        problems.append(f"adds a note or comment ({', '.join(sorted(notes))}), not in the source")
    echoed = {m.group(0).lower() for m in _ECHO_RE.finditer(bare)} - {
        m.group(0).lower() for m in _ECHO_RE.finditer(bare_source)}
    if echoed:
        problems.append(f"echoes instructions ({', '.join(sorted(echoed))})")
    refusal = {m.group(0).lower() for m in _REFUSAL_RE.finditer(bare)}
    if refusal and not _SOURCE_REFUSAL_RE.search(bare_source):
        problems.append(f"reads as a refusal ({', '.join(sorted(refusal))}), not a translation")
    for bracket in "<>":
        if translation.count(bracket) > source.count(bracket):
            problems.append(f"angle bracket '{bracket}' not in the source")
            break
    return problems
