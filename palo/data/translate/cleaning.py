"""What a chat model adds around a translation: a preamble at the start, quotes or a code fence around it all."""

from __future__ import annotations

import re

# A chat model's announcement of its translation, in English or in the target language. Only ever looked for at the
# start of a reply (see strip_preamble): "Translation", "Here is the Arabic translation of the text", "Voici la
# traduction", "Aquí tienes la traducción al español", "Вот перевод", "以下是翻译", "日本語訳", "إليك الترجمة إلى
# العربية", "हिंदी अनुवाद", "বাংলা অনুবাদ", "اردو ترجمہ" ... followed by a colon, or alone on the first line.
_PREAMBLE_LABEL = (
    r"(?:(?:here(?:'s|’s| is| are)|below is|this is)\s+)?(?:(?:the|your|a|an|my)\s+)?(?:[a-z]+\s+)?"
    r"(?:translation|translated\s+(?:text|version|turn|message)|translate)(?:\s+(?:in|into|to)\s+[a-z]+)?"
    r"(?:\s+of\s+(?:the|your|this)\s+(?:text|message|turn|sentence|phrase|passage|conversation))?"
    r"(?:\s+(?:in|into|to)\s+[a-z]+)?(?:\s+is)?"
    r"|(?:voici\s+)?(?:la\s+|une\s+)?traduction(?:\s+(?:en|vers\s+le)\s+\w+)?"
    r"|(?:aqu[ií]\s+(?:est[aá]|tienes|va)\s+)?(?:la\s+)?traducci[oó]n(?:\s+al\s+\w+)?"
    r"|(?:вот\s+)?перевод(?:\s+на\s+\w+(?:\s+\w+)?)?"
    r"|(?:以下是|这是|這是)?(?:中文|简体中文)?(?:的)?(?:翻译|翻譯|译文|譯文)(?:如下)?"
    r"|(?:以下は|これは)?(?:日本語)?(?:の)?(?:翻訳|訳)(?:です)?"
    r"|(?:إليك|إليكم|ها\s+هي|هذه\s+هي|هذه)?\s*(?:ال)?ترجمة(?:\s+(?:إلى|الى|باللغة)\s+\S+)?"
    r"|(?:यहाँ|यहां|यह)?\s*(?:हिंदी|हिन्दी|का)?\s*अनुवाद(?:\s+(?:है|हैं))?"
    r"|(?:এখানে|এই)?\s*(?:বাংলা)?\s*অনুবাদ(?:\s+(?:দেওয়া\s+হলো|হলো|হল))?"
    r"|(?:یہ|یہاں)?\s*(?:اردو)?\s*(?:میں)?\s*ترجمہ(?:\s+(?:ہے|یہ\s+ہے))?"
)
_COURTESY = (r"(?:(?:sure|certainly|of\s+course|okay|ok|absolutely|bien\s+s[uû]r|claro|por\s+supuesto|конечно|"
             r"好的|当然|もちろん|بالتأكيد|بالطبع|ज़रूर|জরুর|অবশ্যই|ضرور)[\s!,.،。！]*)?")
_PREAMBLE_RE = re.compile(
    r"^\s*" + _COURTESY + r"(?:" + _PREAMBLE_LABEL + r")(?:\s*[(（][^)）\n]{1,40}[)）])?"
    r"\s*(?:[:：]\s*|[.。]?[ \t]*\n\s*)(?=\S)",
    re.IGNORECASE,
)


# An English word of assent with its punctuation opening a reply ("Sure! ", "Certainly,\n", "Of course. "): no
# target language writes it, so it is the model's, unless the source opens with such a word itself (see _OPENS_WITH_
# ASSENT_RE). "OK" and "Okay" are left alone: French and Spanish write them too.
_COURTESY_RE = re.compile(
    r"^\s*(?:sure(?:\s+thing)?|certainly|of\s+course|absolutely|no\s+problem|gladly)\s*[!.,:]+\s*(?=\S)",
    re.IGNORECASE,
)
_OPENS_WITH_ASSENT_RE = re.compile(
    r"^\W*(?:sure|certainly|of\s+course|absolutely|no\s+problem|gladly|ok|okay|yes|yeah|alright|all\s+right|"
    r"definitely|indeed|naturally|well)\b",
    re.IGNORECASE,
)


# Preamble words that also translate another English label, with that label as a source opens with it (its first
# words up to a colon or the end of its line: "Transfer:", "Transfer to account 2:"): Russian "перевод" is a
# transfer, a remittance or a conversion as well as a translation ("Transfer: the money was sent." is "Перевод:
# деньги были отправлены."), Chinese "翻译" an interpreter or translator (the person) as well.
_LABEL_START = r"\W*(?:(?:the|a|an|my|your)\s+)?(?:"
_LABEL_END = r")\b[^\n:：.!?]{0,40}(?:[:：]|\n)"
_SECOND_MEANINGS = (
    (re.compile("перевод", re.IGNORECASE),
     re.compile(_LABEL_START + r"transfer\w*|remittance\w*|conver(?:sion|sions|t|ts|ting)|wire|relocation"
                + _LABEL_END, re.IGNORECASE)),
    (re.compile("翻译|翻譯"), re.compile(_LABEL_START + r"interpret\w*|translator\w*" + _LABEL_END, re.IGNORECASE)),
)


def _translates_source_label(preamble: str, source: str) -> bool:
    """Whether ``preamble`` (the start of a reply that reads as one) is the translation of the label ``source``
    opens with, in a second meaning of its word: "Перевод:" for "Transfer:", "翻译：" for "Interpreter:"."""
    return any(word.search(preamble) and label.match(source) for word, label in _SECOND_MEANINGS)


def preamble_of(reply: str, source: str) -> re.Match | None:
    """The preamble opening ``reply`` (a label such as "Translation:", or a bare "Sure! "), or None; none when the
    source opens the same way (then the reply's opening is its translation), or with a label the preamble's word
    also means ("Transfer:" for the Russian "Перевод:")."""
    match = _PREAMBLE_RE.match(reply)
    if match is not None and not _PREAMBLE_RE.match(source) and not _translates_source_label(match.group(0), source):
        return match
    match = _COURTESY_RE.match(reply)
    if match is not None and not _OPENS_WITH_ASSENT_RE.match(source):
        return match
    return None


def strip_preamble(reply: str, source: str) -> str:
    """``reply`` without a preamble ("Translation: ...", "Here is the translation:\\n...", "Sure! ...") at its start.

    Decided by position only: the preamble must open the reply, and it is kept when the source opens with such a
    label itself, or with one the preamble's word also means ("Transfer:" for "Перевод:"): then it is the
    translation of that label. Words the source uses elsewhere change nothing, so
    "Translation: ..." is removed from the reply to "Can you give a translation of the sign?".
    """
    match = preamble_of(reply, source)
    return reply if match is None else reply[match.end():]


_WRAPPERS = [('"', '"'), ("“", "”"), ("'", "'"), ("«", "»"), ("「", "」")]
# Quotation marks a source may open with: its translation may wrap the text in the target's own marks ("X" becomes
# «X» in French, “X” in Chinese, 「X」 in Japanese), which are then the source's quotes, not the model's addition.
_OPENING_QUOTES = tuple({left for left, _ in _WRAPPERS} | {"‘", "„", "『", "‹"})


def clean_reply(reply: str, source: str) -> str:
    """Strip what a chat model adds around a whole reply when the source had none: a preamble at its start
    (:func:`strip_preamble`), then quotes or a code fence around the rest."""
    text = strip_preamble(reply.strip(), source).strip()
    if text.startswith("```") and text.endswith("```") and not source.lstrip().startswith("```") and len(text) > 6:
        # A language tag ("```json") ends at its line break: in "```Машина на фото красная.```" the word after the
        # fence is the translation's.
        text = re.sub(r"^```(?:[\w-]*[ \t]*\n)?|\n?```$", "", text).strip()
    if source.strip().startswith(_OPENING_QUOTES):
        return text
    for left, right in _WRAPPERS:
        inner = text[len(left):-len(right)]
        if (len(text) >= 2 and text.startswith(left) and text.endswith(right) and left not in inner
                and right not in inner):
            text = text[len(left):-len(right)].strip()
            break
    return text
