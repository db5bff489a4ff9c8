"""The target languages and what is asked of the model: per-language guidance and the (stricter) system message."""

from __future__ import annotations

from palo.data.languages import LANGUAGES

TARGET_LANGUAGES = tuple(language for language in LANGUAGES if language != "english")
ISO_CODES = {
    "zh": "chinese", "zh-cn": "chinese", "zh-hans": "chinese", "fr": "french", "es": "spanish", "ru": "russian",
    "ja": "japanese", "ar": "arabic", "hi": "hindi", "bn": "bengali", "ur": "urdu",
}

# What "a good translation" means in each language, beyond "translate into X": script, variety, punctuation.
INSTRUCTIONS = {
    "chinese": "Write Simplified Chinese (简体中文) as used in mainland China, never Traditional characters, with "
               "full-width Chinese punctuation (，。？！：；).",
    "french": "Write standard French with all accents (é, è, ê, à, ç ...) and French punctuation conventions. Use "
              "natural phrasing rather than word-for-word English structure.",
    "spanish": "Write neutral, international Spanish with all accents and ñ, and with the opening marks ¿ and ¡ "
               "for questions and exclamations.",
    "russian": "Write standard Russian in Cyrillic, with correct case and gender agreement and Russian "
               "punctuation.",
    "japanese": "Write natural Japanese with kanji, hiragana and katakana (katakana for foreign words), in the "
                "polite です/ます style, with Japanese punctuation (、。？).",
    "arabic": "Write Modern Standard Arabic (الفصحى), not a dialect, in right-to-left Arabic script, with Arabic "
              "punctuation (، ؛ ؟), correct grammar and tanwin where it is needed.",
    "hindi": "Write standard Hindi in Devanagari script, ending sentences with the danda (।). Technical terms "
             "without a common Hindi word may be transliterated into Devanagari.",
    "bengali": "Write standard Bengali (Bangla) in Bengali script, ending sentences with the dari (।).",
    "urdu": "Write standard Urdu in Perso-Arabic script with Urdu letters (ٹ ڈ ڑ ں ے ک ی ہ) and the Urdu full "
            "stop (۔); do not write Hindi or Arabic.",
}

_SYSTEM = (
    "You are a professional translator from English into {Language}. {guidance}\n"
    "The user's message is a turn of a conversation about an image. Translate all of it into {Language} and "
    "reply with the translation only: no notes, no quotes around it, no explanation, no English original. "
    "Tokens like [[1]] stand for numbers, coordinates or code: copy each of them exactly once, unchanged, "
    "to the matching place. Keep line breaks and list structure."
)
_STRICT = (
    "\nYour previous answer was rejected: {problems}. This time reply with nothing but the {Language} "
    "translation, written in {Language} script, containing every [[n]] token of the message exactly once, and "
    "without the characters < and >."
)


def parse_target_language(name: str) -> str:
    """A PALO target language from an ISO code or an English name ("ar", "Arabic", "zh-CN" ...).

    Raises:
        ValueError: For English or a language PALO does not cover.
    """
    key = name.strip().lower().replace("_", "-")
    language = ISO_CODES.get(key, key)
    if language not in TARGET_LANGUAGES:
        raise ValueError(f"unknown target language {name!r}; choose from "
                         f"{', '.join(f'{c} ({lang})' for c, lang in ISO_CODES.items() if '-' not in c)}")
    return language


def system_prompt(language: str, problems: list[str] | None = None) -> str:
    """The system message for ``language``; with ``problems``, the stricter retry version that names them."""
    text = _SYSTEM.format(Language=language.capitalize(), guidance=INSTRUCTIONS[language])
    if problems:
        text += _STRICT.format(Language=language.capitalize(), problems="; ".join(problems))
    return text
