"""``palo-data translate`` / ``apply-review`` against a local OpenAI-compatible server over real HTTP.

The server "translates" word by word into a fixed word list of the target language (read from the system
message), copying the ``[[n]]`` placeholders it receives, and misbehaves on cue: a marker word in the English text
makes it answer 500 once, 429 once (with Retry-After), echo the English, echo it once, mangle placeholders, or wrap
the reply in angle brackets once, or put a preamble ("Translation: ...") before it, refuse the request (400), the
key (401), the access (403) or the model (404) every time, decline in a 200 (``content: null`` and a ``refusal``), or
stop a reply halfway with ``finish_reason: content_filter``. Once ``healed``, it answers
every text well. Every request is recorded, so tests count calls per (language, text).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from chat_server import ChatServer  # tests/ is on sys.path (rootdir conftest, no packages)

from palo.data.cli import main
from palo.data.languages import detect_language
from palo.data.translate import (
    check_translation,
    clean_reply,
    join_image,
    mask,
    parse_target_language,
    restore,
    split_image,
)

# Word lists that detect_language recognises (Arabic with Arabic-only letters, French with its stopwords).
WORDS = {
    "arabic": ["القطة", "كبيرة", "في", "الصورة", "يوجد", "طاولة", "جميلة", "على"],
    "chinese": ["图片", "中", "有", "一只", "猫", "桌子", "上面", "红色"],
    "french": ["le", "chat", "est", "sur", "la", "table", "très", "grande", "dans", "l'image"],
}
# What the server puts before the translation when the text holds the word "preamble", per target language.
PREAMBLES = {
    "arabic": "Translation: {}",
    "chinese": "以下是翻译：\n{}",
    "french": "Sure! Here is the French translation of the text:\n\n{}",
}
_LANGUAGE = re.compile(r"from English into (\w+)\.")
_TOKEN = re.compile(r"\[\[\d+\]\]|[^\W\d_]+")


def fake_translate(text: str, language: str, keep_placeholders: bool = True) -> str:
    words = WORDS[language]
    out = []
    for token in _TOKEN.findall(text):
        if token.startswith("[["):
            if keep_placeholders:
                out.append(token)
        else:
            out.append(words[len(token) % len(words)])
    sep = "" if language == "chinese" else " "
    return sep.join(out) + ("。" if language == "chinese" else ".")


class FakeTranslator:
    """The server; ``base_url`` is ``http://127.0.0.1:<port>/v1``. ``stall_after`` answers, later requests hang."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, str]] = []  # (language, user text, status, system message)
        self.attempts: Counter = Counter()
        self.stall_after: int | None = None
        self.healed = False  # no more misbehaving on cue
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.server: ChatServer | None = None

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def answered(self, status: int = 200) -> Counter:
        with self.lock:
            return Counter((lang, text) for lang, text, s, _ in self.calls if s == status)

    def respond(self, body: dict) -> tuple[int, str | dict, dict]:
        system = next(m["content"] for m in body["messages"] if m["role"] == "system")
        text = next(m["content"] for m in body["messages"] if m["role"] == "user")
        language = _LANGUAGE.search(system).group(1).lower()
        with self.lock:
            answered = sum(1 for c in self.calls if c[2] == 200)
            stall = self.stall_after is not None and answered >= self.stall_after
        if stall:
            self.stalled.set()
            self.release.wait(30)
            return 503, "stalled", {}  # too late: the client is dead; never counted as an answer
        with self.lock:
            self.attempts[(language, text)] += 1
            n = self.attempts[(language, text)]
        good = fake_translate(text, language)
        if self.healed:
            status, reply, headers = 200, good, {}
        elif "refuseme" in text:
            status, reply, headers = 400, "This model's maximum context length is 8192 tokens.", {}
        elif "unauthorized" in text:
            status, reply, headers = 401, "Incorrect API key provided.", {}
        elif "forbidden" in text:
            status, reply, headers = 403, "This key may not use this model.", {}
        elif "nomodel" in text:
            status, reply, headers = 404, "The model 'fake-mt' does not exist.", {}
        elif "declineme" in text:  # OpenAI's shape of a refusal: no content, a "refusal" text
            status, headers = 200, {}
            reply = {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model"),
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {
                         "role": "assistant", "content": None, "refusal": "I'm sorry, I can't help with that."}}]}
        elif "contentfilter" in text:
            status, headers = 200, {}
            reply = {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model"),
                     "choices": [{"index": 0, "finish_reason": "content_filter",
                                  "message": {"role": "assistant", "content": good[: len(good) // 2]}}]}
        elif "fivehundred" in text and n == 1:
            status, reply, headers = 500, "boom", {}
        elif "ratelimit" in text and n == 1:
            status, reply, headers = 429, "slow down", {"Retry-After": "0.4"}
        elif "echoenglish" in text or ("echoonce" in text and n == 1):
            status, reply, headers = 200, text, {}
        elif "mangle" in text:
            status, reply, headers = 200, fake_translate(text, language, keep_placeholders=False), {}
        elif "brackets" in text and n == 1:
            status, reply, headers = 200, f"<{good}>", {}
        elif "preamble" in text:
            status, reply, headers = 200, PREAMBLES[language].format(good), {}
        else:
            status, reply, headers = 200, good, {}
        with self.lock:
            self.calls.append((language, text, status, system))
        return status, reply, headers

    def start(self) -> FakeTranslator:
        self.server = ChatServer(respond=self.respond).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.stop()


@pytest.fixture()
def server():
    fake = FakeTranslator().start()
    yield fake
    fake.stop()


def _sample(i: int, question: str, answer: str, image: bool = True) -> dict:
    sample = {"id": f"{i:012d}", "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image:
        sample["image"] = f"{i:012d}.jpg"
    return sample


SAMPLES = [
    _sample(0, "What is on the table?\n<image>", "A cat sits on the table at [0.12, 0.40, 0.55, 0.89] with 3 toys."),
    _sample(1, "<image>\nfivehundred how many cats are there?", "There are 2 cats, one is sleeping."),
    _sample(2, "<image>\nratelimit what colour is the car?", "The car is red and costs 1,200 dollars."),
    _sample(3, "<image>\nDescribe the picture.", "echoenglish the picture shows a big dog near a tree."),
    _sample(4, "<image>\nWhat is written in the code?", "mangle it prints `x = 5` and then 7 lines."),
    _sample(5, "<image>\nechoonce what is the man holding now?", "He holds an umbrella in his hand."),
    _sample(6, "brackets tell me a story about cats please", "Once upon a time a cat lived in a house.", image=False),
    _sample(7, "What is on the table?\n<image>", "A lamp stands on the table near the window."),
]


def _write(path, data) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    return str(path)


def _translate_args(data: str, out: str, server: FakeTranslator, languages: str = "ar,zh,fr", *extra: str):
    return ["translate", "--data_path", data, "--languages", languages, "--output_dir", out, "--base-url",
            server.base_url, "--model", "fake-mt", "--api-key", "k", "--parallel", "4", "--backoff", "0.01",
            "--quiet", *extra]


# --------------------------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------------------------


def test_parse_target_language():
    assert parse_target_language("ar") == "arabic"
    assert parse_target_language("zh-CN") == "chinese"
    assert parse_target_language("Japanese") == "japanese"
    with pytest.raises(ValueError):
        parse_target_language("en")
    with pytest.raises(ValueError):
        parse_target_language("de")


def test_mask_restore_roundtrip_and_native_digits():
    text = "Box [0.12, 0.40, 0.55, 0.89] has 3 cats, 1,200 dogs at 10:30, `x = 5` and COCO2017.\n```py\nprint(1)\n```"
    masked = mask(text)
    assert masked.spans == ["[0.12, 0.40, 0.55, 0.89]", "3", "1,200", "10:30", "`x = 5`", "```py\nprint(1)\n```"]
    assert "COCO2017" in masked.text and not re.search(r"\d(?!\d*\]\])", masked.text.replace("COCO2017", ""))
    assert restore(masked.text, masked.spans) == text
    # A model writing Arabic-Indic digits or full-width brackets in a placeholder still restores.
    assert restore("العدد [[٢]] و ［［1］］", masked.spans) == "العدد 3 و [0.12, 0.40, 0.55, 0.89]"


def test_split_image():
    assert split_image("What is it?\n<image>") == ("What is it?", 1)
    assert split_image("<image>\nWhat is it?") == ("What is it?", 1)
    assert split_image("no image") == ("no image", 0)


@pytest.mark.parametrize("translation, language, expected", [
    ("القطة كبيرة في الصورة [[1]].", "arabic", None),
    ("The cat is big in the picture [[1]].", "arabic", "script"),
    ("The cat is big in the picture [[1]].", "french", "English"),
    ("le chat est très grand dans l'image.", "french", "placeholders missing"),
    ("<القطة كبيرة في الصورة [[1]]>", "arabic", "angle bracket"),
    ("Here is the translation: القطة كبيرة في الصورة [[1]] والطاولة", "arabic", "echoes instructions"),
    ("猫很大[[1]]。", "chinese", None),
    ("猫はとても大きいです[[1]]。", "chinese", "chinese script"),  # kana is not Chinese
    ("القطة [[1]] [[1]] كبيرة في الصورة", "arabic", "repeated"),
    ("قط [[1]]", "arabic", "length ratio"),
])
def test_check_translation(translation, language, expected):
    source = "The cat is big in the picture [[1]] and very nice."
    problems = check_translation(source, translation, language, 1)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_clean_reply_strips_wrapping_only_when_source_had_none():
    assert clean_reply('"Le chat."', "The cat.") == "Le chat."
    assert clean_reply('"Le chat."', '"The cat."') == '"Le chat."'
    # A quoted source translated with the target's own quotation marks keeps them.
    for reply in ("«Bienvenue à Central Park»", "“欢迎来到中央公园”", "「セントラルパークへようこそ」"):
        assert clean_reply(reply, '"Welcome to Central Park"') == reply
    assert clean_reply("```\nLe chat.\n```", "The cat.") == "Le chat."


SOURCE_WITH_THE_WORD = "Can you give a translation of the sign?"


@pytest.mark.parametrize("reply", [
    "Translation: هل يمكنك إعطاء ترجمة للافتة؟",
    "Here is the translation:\n\nهل يمكنك إعطاء ترجمة للافتة؟",
    "Sure! Here's the Arabic translation of the text: هل يمكنك إعطاء ترجمة للافتة؟",
    "Translation (Arabic): هل يمكنك إعطاء ترجمة للافتة؟",
    "الترجمة: هل يمكنك إعطاء ترجمة للافتة؟",
    "إليك الترجمة إلى العربية:\nهل يمكنك إعطاء ترجمة للافتة؟",
    'Translation: "هل يمكنك إعطاء ترجمة للافتة؟"',
])
def test_a_preamble_at_the_start_is_removed_though_the_source_says_translation(reply):
    assert clean_reply(reply, SOURCE_WITH_THE_WORD) == "هل يمكنك إعطاء ترجمة للافتة؟"
    # Uncleaned, the same reply is rejected for its start, whatever words the source contains.
    problems = check_translation(SOURCE_WITH_THE_WORD, reply, "arabic")
    assert any(p.startswith("begins with a preamble") for p in problems), problems
    assert check_translation(SOURCE_WITH_THE_WORD, clean_reply(reply, SOURCE_WITH_THE_WORD), "arabic") == []


@pytest.mark.parametrize("reply,language,clean", [
    ("Voici la traduction : Pouvez-vous traduire le panneau ?", "french", "Pouvez-vous traduire le panneau ?"),
    ("Traducción: ¿Puedes dar una traducción del letrero?", "spanish", "¿Puedes dar una traducción del letrero?"),
    ("Перевод: Можете ли вы перевести табличку?", "russian", "Можете ли вы перевести табличку?"),
    ("翻译：你能翻译一下这个标志吗？", "chinese", "你能翻译一下这个标志吗？"),
    ("以下は翻訳です：標識を翻訳してもらえますか？", "japanese", "標識を翻訳してもらえますか？"),
    ("अनुवाद: क्या आप इस संकेत का अनुवाद दे सकते हैं?", "hindi", "क्या आप इस संकेत का अनुवाद दे सकते हैं?"),
    ("অনুবাদ: আপনি কি চিহ্নটির অনুবাদ দিতে পারেন?", "bengali", "আপনি কি চিহ্নটির অনুবাদ দিতে পারেন?"),
    ("ترجمہ: کیا آپ اس نشان کا ترجمہ دے سکتے ہیں؟", "urdu", "کیا آپ اس نشان کا ترجمہ دے سکتے ہیں؟"),
])
def test_preambles_in_the_target_language_are_removed(reply, language, clean):
    assert clean_reply(reply, SOURCE_WITH_THE_WORD) == clean
    assert any(p.startswith("begins with a preamble") for p in check_translation(SOURCE_WITH_THE_WORD, reply, language))


@pytest.mark.parametrize("source,reply", [
    # The source opens with that label itself: the reply's label is its translation, not a preamble.
    ("Translation: the sign says stop.", "Traduction : le panneau dit stop."),
    ("Translation: the sign says stop.", "الترجمة: اللافتة تقول توقف."),
    # Translation words later in the reply, or a label that is not about translating, are content.
    (SOURCE_WITH_THE_WORD, "Pouvez-vous donner une traduction du panneau ?"),
    ("Question: what does the translation say?", "Question : que dit la traduction ?"),
    ("The translation of the menu: soup and bread.", "La traduction du menu : soupe et pain."),
])
def test_text_that_only_looks_like_a_preamble_is_kept(source, reply):
    assert clean_reply(reply, source) == reply
    assert not any(p.startswith("begins with a preamble") for p in check_translation(source, reply, "french"))


def test_short_urdu_reply_to_an_arabic_request_is_rejected_by_its_urdu_only_letters():
    # 7 letters: far below the 30 from which the letter count alone decides, but ے and ہ never occur in Arabic.
    assert any("urdu" in p for p in check_translation("What animal is it?", "یہ بلی ہے", "arabic"))
    assert check_translation("What animal is it?", "إنها قطة", "arabic") == []
    assert check_translation("What animal is it?", "یہ بلی ہے", "urdu") == []


@pytest.mark.parametrize("source,reply,language,wrong", [
    ("What is the man holding in his hand?", "¿Qué sostiene el hombre en su mano?", "french", "spanish"),
    ("The cat is sleeping on the sofa.", "Le chat dort sur le canapé.", "spanish", "french"),
    # Real translations: names and titles copied from the English carry the other language's words and accents.
    ("The sign says 'El Paso Taqueria'.", "Le panneau indique « El Paso Taqueria ».", "french", None),
    ("The bus goes to Málaga and Bogotá.", "Le bus va à Málaga et Bogotá.", "french", None),
    ("Obama visited Madrid on July [[1]], [[2]].", "Obama a visité Madrid le [[1]] juillet [[2]].", "french", None),
    ("Yes, it is true.", "Oui, c'est vrai.", "french", None),
    ("The restaurant is called Le Petit Château.", "El restaurante se llama Le Petit Château.", "spanish", None),
    ("There are [[1]] people on the beach.", "Hay [[1]] personas en la playa.", "spanish", None),
    ("Yes, it is true.", "Sí, es verdad.", "spanish", None),
])
def test_french_and_spanish_are_told_apart(source, reply, language, wrong):
    problems = check_translation(source, reply, language, source.count("[["))
    assert problems == ([f"looks like {wrong}, not {language}"] if wrong else []), problems


@pytest.mark.parametrize("source,reply,language", [
    # Brands, product names and quoted signs copied from the English are Latin whatever the target: they used to be
    # counted against the target script (and a Han character as one letter, where detect_language weighs it two).
    ("The man is playing a Nintendo Wii game in the living room.", "男子正在客厅里玩Nintendo Wii游戏。", "chinese"),
    ("The laptop on the desk is a MacBook Pro.", "桌上的笔记本电脑是MacBook Pro。", "chinese"),
    ("The man is holding an iPhone.", "男人拿着一部iPhone。", "chinese"),
    ("The laptop on the desk is a MacBook Pro.", "机の上のノートパソコンはMacBook Proです。", "japanese"),
    ("There is a Starbucks coffee cup on the table.", "桌子上有一个Starbucks咖啡杯。", "chinese"),
    ("The bus is operated by Greyhound.", "这辆巴士由Greyhound运营。", "chinese"),
    ("The man is playing Nintendo Wii.", "Мужчина играет в Nintendo Wii.", "russian"),
    ("A Toyota Corolla is parked near the Starbucks.", "Toyota Corolla припаркована возле Starbucks.", "russian"),
    ("The man is playing Nintendo Wii.", "आदमी Nintendo Wii खेल रहा है।", "hindi"),
    ("The man is playing Nintendo Wii.", "الرجل يلعب Nintendo Wii.", "arabic"),
    ("The sign says 'Welcome to the park'.", "El letrero dice 'Welcome to the park'.", "spanish"),
    ("The sign says 'Welcome to the park'.", "На вывеске написано «Welcome to the park».", "russian"),
    ("The sign on the building says 'Bank of America'.", "Le panneau sur le bâtiment indique « Bank of America ».",
     "french"),
])
def test_names_and_quoted_text_copied_from_the_english_do_not_count_against_the_target(source, reply, language):
    assert check_translation(source, reply, language) == []


@pytest.mark.parametrize("reply,language,expected", [
    # ... while a reply that is English, or in another script, is still rejected, copied names or not.
    ("The man is playing Nintendo Wii in the living room.", "chinese", "not written in chinese script"),
    ("The man is playing Nintendo Wii in the living room.", "russian", "not written in russian script"),
    ("The man is playing Nintendo Wii in the living room.", "spanish", "still English"),
    ("The man plays Nintendo Wii in the living room.", "french", "still English"),  # reworded, still English
    ("The man plays Nintendo Wii in the living room.", "japanese", "not written in japanese script"),
    ("The man plays Nintendo Wii in the living room.", "arabic", "not written in arabic script"),
    ("Nintendo Wii", "hindi", "not written in hindi script"),  # only the copied words
    ("आदमी लिविंग रूम में Nintendo Wii खेल रहा है।", "russian", "not written in russian script"),
    ("男子正在客厅里玩Nintendo Wii游戏。", "japanese", "looks like chinese, not japanese"),
    ("El hombre juega a la Nintendo Wii en la sala.", "french", "looks like spanish, not french"),
])
def test_english_or_wrong_script_replies_with_copied_names_are_still_rejected(reply, language, expected):
    problems = check_translation("The man is playing Nintendo Wii in the living room.", reply, language)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("source,reply,accepted", [
    # Short Japanese answers are often Kanji alone, which reads as Chinese: they were rejected as Chinese.
    ("Red.", "赤。", True),
    ("Tokyo Station.", "東京駅。", True),
    ("A bicycle.", "自転車。", True),
    # A long Han-only reply to a Japanese request is Chinese.
    ("There is a red double-decker bus on the street.", "街道上有一辆红色双层巴士。", False),
    ("A red bus.", "一辆红色的公共汽车。", False),
])
def test_a_short_kanji_only_reply_is_not_taken_for_chinese(source, reply, accepted):
    problems = check_translation(source, reply, "japanese")
    assert (problems == []) if accepted else ("looks like chinese, not japanese" in problems), problems


# A chat model declining in the target language, for a short turn (no length check below 40 characters).
REFUSALS = {
    "french": "Je suis désolé, je ne peux pas faire cela.",
    "spanish": "Lo siento, pero no puedo ayudar con esa solicitud.",
    "russian": "Извините, я не могу помочь с этим запросом.",
    "chinese": "抱歉，我无法完成这个请求。",
    "japanese": "申し訳ありませんが、そのリクエストにはお応えできません。",
    "arabic": "عذرًا، لا أستطيع المساعدة في هذا الطلب.",
    "hindi": "क्षमा करें, मैं इस अनुरोध में मदद नहीं कर सकता।",
    "bengali": "দুঃখিত, আমি এই অনুরোধে সাহায্য করতে পারব না।",
    "urdu": "معذرت، میں اس درخواست میں مدد نہیں کر سکتا۔",
}


@pytest.mark.parametrize("language", sorted(REFUSALS))
def test_a_refusal_in_the_target_language_is_rejected(language):
    problems = check_translation("What colour is the bus?", REFUSALS[language], language)
    assert any(p.startswith("reads as a refusal") for p in problems), problems


@pytest.mark.parametrize("reply,language", [
    ("Je suis désolé, mais je ne peux pas lire le texte.", "french"),
    ("Lo siento, pero no puedo leer el texto.", "spanish"),
    ("抱歉，我无法看清这段文字。", "chinese"),
    ("দুঃখিত, আমি লেখাটি পড়তে পারছি না।", "bengali"),
])
def test_a_source_that_apologises_itself_is_translated_with_the_apology(reply, language):
    assert check_translation("I'm sorry, but I can't read the text.", reply, language) == []


@pytest.mark.parametrize("source,reply,language,expected", [
    # A dialogue the model went on to make up.
    ("The cat is sleeping peacefully on the wooden table near the window.",
     "Le chat dort paisiblement sur la table en bois près de la fenêtre.\nHuman: Et le chien ?\nGPT: Il dort aussi.",
     "french", "adds dialogue turns (gpt:, human:)"),
    ("What is on the table?", "桌子上有什么？ USER: 还有呢？ ASSISTANT: 一只猫。", "chinese", "adds dialogue turns"),
    # Invented text for a short source (no ratio check below 40 characters).
    ("What is this?", "Qu'est-ce que c'est ? " + "Il s'agit d'une longue description inventée du chien. " * 50,
     "french", "implausibly long for a short source"),
    ("What is this?", "这是什么？" + "这是一段关于狗和花园的很长的编造描述。" * 5, "chinese",
     "implausibly long for a short source"),
    # The English copied back beside its translation.
    ("It is a small brown dog.", "C'est un petit chien brun. It is a small brown dog.", "french",
     "echoes the English source"),
    ("It is a small brown dog.", "这是一只棕色的小狗。It is a small brown dog.", "chinese",
     "echoes the English source"),
    ("The cat is sleeping on the red sofa.", "The cat is sleeping on the sofa. Кошка спит на красном диване.",
     "russian", "echoes the English source"),  # most of it, not verbatim
    # Notes and wishes the model adds, in English or in the target language, on a line of their own or not.
    ("The cat is sleeping peacefully on the wooden table near the window.",
     "Le chat dort paisiblement sur la table en bois près de la fenêtre.\n\nNote: 'peacefully' was rendered as "
     "'paisiblement'.", "french", "adds a note or comment (note:, rendered as)"),
    ("What is this?", "Qu'est-ce que c'est ? Hope this helps!", "french", "adds a note or comment (hope this helps)"),
    ("The bicycle is parked against a green fence by the road.",
     "Le vélo est garé contre une clôture verte au bord de la route. Let me know if you need anything else.",
     "french", "adds a note or comment (anything else, if you need, let me know)"),
    ("What color is the large bus in the street?",
     "Quelle est la couleur du grand bus dans la rue ? J'espère que cela vous aide !", "french",
     "adds a note or comment (j'espère que cela)"),
    ("It is a small brown dog.", "C'est un petit chien brun. (Remarque : « brown » peut aussi se dire « marron ».)",
     "french", "adds a note or comment (remarque :)"),
    ("It is a small brown dog.", "Es un pequeño perro marrón. Espero que esto te sirva.", "spanish",
     "adds a note or comment (espero que esto)"),
    ("It is a small brown dog.", "这是一只棕色的小狗。（注：也可以译为褐色。）", "chinese", "adds a note or comment"),
    # Any language: a line more than the source is text added.
    ("It is a small brown dog.", "यह एक छोटा भूरा कुत्ता है।\nयह बहुत प्यारा है।", "hindi",
     "has 2 lines where the source has 1"),
    # The wrong language in the right script, told by letters the target never writes.
    ("The cat is sleeping peacefully on the wooden table near the window.",
     "Кіт спокійно спить на дерев'яному столі біля вікна.", "russian", "looks like ukrainian, not russian"),
    ("What is the cat doing on the wooden table?", "Що робить кіт на дерев'яному столі?", "russian",
     "looks like ukrainian, not russian"),
    ("What is the cat doing on the wooden table?", "گربه روی میز چوبی چه کار می\u200cکند؟", "arabic",
     "looks like persian, not arabic"),
    ("It is a small brown dog.", "این یک سگ کوچک قهوه\u200cای است.", "arabic", "looks like persian, not arabic"),
])
def test_additions_copies_and_a_related_language_are_rejected(source, reply, language, expected):
    """Replies the check took as good (corrupt: false, merged into training data): made-up turns, invented text for
    a short source, the English copied back, notes and wishes, Ukrainian for Russian, Persian for Arabic."""
    problems = check_translation(source, clean_reply(reply, source), language)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("source,reply,language", [
    # What the checks above look for, where it is the translation: the source says it too.
    ("Note: the picture is blurry.", "Remarque : l'image est floue.", "french"),
    ("Note: the picture is blurry.", "Nota: la imagen está borrosa.", "spanish"),
    ("Note: the picture is blurry.", "注：图片很模糊。", "chinese"),
    ("Note: the picture is blurry.", "ملاحظة: الصورة ضبابية.", "arabic"),
    ("The student got a grade: 15 out of 20.", "L'élève a obtenu une note : 15 sur 20.", "french"),
    ("I hope this helps you find the dog.", "J'espère que cela vous aidera à trouver le chien.", "french"),
    ("The screen shows 'User: admin' at the top.", "L'écran affiche « User: admin » en haut.", "french"),
    ("The man in the picture is a user of the system.", "L'homme sur la photo est un utilisateur du système.",
     "french"),
    ("Can you translate the sign?", "Pouvez-vous traduire le panneau ?", "french"),
    ("1. A red car\n2. A blue bus\n3. A green truck", "1. Une voiture rouge\n2. Un bus bleu\n3. Un camion vert",
     "french"),
    ("Sure! The image shows a cat.", "Bien sûr ! L'image montre un chat.", "french"),
    ("Sure! The image shows a cat.", "当然！图片显示了一只猫。", "chinese"),
    # Quoted English titles and signs copied into a translation of their own: a part of the source, not all of it.
    ("The book is titled 'The Old Man and the Sea'.", "Le livre s'intitule « The Old Man and the Sea ».", "french"),
    ("The book is titled 'The Old Man and the Sea'.", "这本书的书名是《The Old Man and the Sea》。", "chinese"),
    ("The title is 'Harry Potter and the Chamber of Secrets'.",
     "Le titre est « Harry Potter and the Chamber of Secrets ».", "french"),
    ("The sign reads 'Welcome to Central Park'.", "На вывеске написано «Welcome to Central Park».", "russian"),
    ("The New York Times.", "Le New York Times.", "french"),
    # Short sources with natural translations, well under the bound.
    ("Where is the dog sitting in this picture?", "এই ছবিতে কুকুরটি কোথায় বসে আছে?", "bengali"),
    ("Where is the dog sitting in this picture?", "اس تصویر میں کتا کہاں بیٹھا ہے؟", "urdu"),
    ("What is the cat doing on the wooden table?", "ماذا تفعل القطة على الطاولة الخشبية؟", "arabic"),
    ("What is the man holding?", "Что держит мужчина?", "russian"),
])
def test_translations_that_only_resemble_additions_or_copies_are_accepted(source, reply, language):
    assert check_translation(source, clean_reply(reply, source), language) == []


def test_a_bare_courtesy_opener_is_removed_unless_the_source_opens_so():
    source = "What is the cat doing on the wooden table?"
    assert clean_reply("Sure! Que fait le chat sur la table en bois ?", source) == (
        "Que fait le chat sur la table en bois ?")
    assert clean_reply("Certainly,\n¿Qué hace el gato sobre la mesa de madera?", source) == (
        "¿Qué hace el gato sobre la mesa de madera?")
    # Uncleaned, it is rejected for its start.
    problems = check_translation(source, "Sure! Que fait le chat sur la table en bois ?", "french")
    assert any(p.startswith("begins with a preamble ('Sure!')") for p in problems), problems
    # The source opens with assent itself: the reply's opening is its translation.
    assert clean_reply("Bien sûr ! L'image montre un chat.", "Sure! The image shows a cat.") == (
        "Bien sûr ! L'image montre un chat.")


UMBRELLA = "The man on the left is holding a large umbrella while walking his dog in the rain."


@pytest.mark.parametrize("source,reply,language", [
    # Only the end translated: what is left passes the script and language checks, which judge the words the reply
    # does not share with the English.
    ("What is the man on the left holding?", "What is the man on the left держит?", "russian"),
    (UMBRELLA, UMBRELLA[:-12] + "в дождь.", "russian"),
    (UMBRELLA, UMBRELLA[:-12] + "تحت المطر.", "arabic"),
    (UMBRELLA, UMBRELLA[:-12] + "在雨中。", "chinese"),
    (UMBRELLA, UMBRELLA[:-12] + "बारिश में।", "hindi"),
    ("What is the man on the left holding?", "Que tient the man on the left ?", "french"),
    # One sentence of a turn left in English: less than half of the source, but a run of it.
    ("The man is holding it. It is a dog.", "Мужчина держит это. It is a dog.", "russian"),
    ("The man is riding a bicycle down the busy street near the old market. Several people are walking on the "
     "sidewalk beside him. He is wearing a red helmet.",
     "El hombre va en bicicleta por la concurrida calle cerca del viejo mercado. Varias personas caminan por la acera "
     "a su lado. He is wearing a red helmet.", "spanish"),
])
def test_a_reply_left_partly_in_english_is_rejected(source, reply, language):
    """Such replies were accepted (corrupt: false, merged into training data) although the docs promise a
    translation "not left in English"."""
    problems = check_translation(source, clean_reply(reply, source), language)
    assert any(p.startswith("partly left in English") for p in problems), problems


@pytest.mark.parametrize("source,reply,language", [
    # Names, brands, titles and technical terms a translation keeps in English, in a Latin-script target ...
    ("The man is wearing a New York Yankees cap.", "El hombre lleva una gorra de los New York Yankees.", "spanish"),
    ("The laptop runs Microsoft Office and Google Chrome.", "El portátil ejecuta Microsoft Office y Google Chrome.",
     "spanish"),
    ("The book is called The Lord of the Rings.", "Le livre s'appelle The Lord of the Rings.", "french"),
    ("The article explains how deep learning models recognize faces.",
     "L'article explique comment les modèles de deep learning reconnaissent les visages.", "french"),
    ("The sign says 'Welcome to the park' in big letters.", "Le panneau dit 'Welcome to the park' en grandes lettres.",
     "french"),
    # ... and in others: names, quoted signs (quoted in the English only, too) and terms.
    ("Harry Potter and the Chamber of Secrets is a book.", "Harry Potter and the Chamber of Secrets — это книга.",
     "russian"),
    ("He is playing Call of Duty on a PlayStation.", "Он играет в Call of Duty на PlayStation.", "russian"),
    ("The shirt says 'keep calm and carry on'.", "На футболке написано keep calm and carry on.", "russian"),
    ("The chart compares the GPU memory bandwidth of the models.", "图表比较了各模型的GPU memory bandwidth。",
     "chinese"),
    ("The poster advertises the movie Star Wars: The Force Awakens.",
     "ポスターは映画Star Wars: The Force Awakensを宣伝しています。", "japanese"),
    ("The man is editing a video in Final Cut Pro on a MacBook Pro.",
     "आदमी MacBook Pro पर Final Cut Pro में वीडियो एडिट कर रहा है।", "hindi"),
    ("The sign says 'Welcome to the park' in big letters.", "تقول اللافتة 'Welcome to the park' بأحرف كبيرة.",
     "arabic"),
    ("The file is named train_model_final.py on the desktop.", "文件名为train_model_final.py，在桌面上。", "chinese"),
])
def test_names_brands_and_terms_kept_in_english_are_not_a_reply_left_in_english(source, reply, language):
    assert check_translation(source, clean_reply(reply, source), language) == []


@pytest.mark.parametrize("reply,clean", [
    ("```Машина на фото красная.```", "Машина на фото красная."),  # the first word was taken for a language tag
    ("```\nМашина на фото красная.\n```", "Машина на фото красная."),
    ("```text\nМашина на фото красная.\n```", "Машина на фото красная."),
])
def test_a_code_fence_is_removed_without_the_reply_s_first_word(reply, clean):
    source = "The car in the photo is red."
    assert clean_reply(reply, source) == clean
    assert check_translation(source, clean_reply(reply, source), "russian") == []


@pytest.mark.parametrize("text,masked,spans", [
    # The pattern backtracked to the integer part: "3" was masked and ".5kg" left to the model.
    ("It weighs 3.5kg.", "It weighs [[1]]kg.", ["3.5"]),
    ("Zoom 1.5x here.", "Zoom [[1]]x here.", ["1.5"]),
    ("A 2.5mm screw and a 1,200mAh battery.", "A [[1]]mm screw and a [[2]]mAh battery.", ["2.5", "1,200"]),
    ("It opens at 10:30am.", "It opens at [[1]]am.", ["10:30"]),
    # As before: an integer glued to letters is a word the model handles, a number alone is masked.
    ("The 3rd of 4K TVs weighs 3kg.", "The 3rd of 4K TVs weighs 3kg.", []),
    ("It weighs 3.5 kg, or 12%.", "It weighs [[1]] kg, or [[2]].", ["3.5", "12%"]),
])
def test_a_decimal_glued_to_a_unit_is_masked_whole(text, masked, spans):
    result = mask(text)
    assert (result.text, result.spans) == (masked, spans)
    assert restore(result.text, result.spans) == text


@pytest.mark.parametrize("value,text", [
    ("Describe the scene <image> in detail please.", "Describe the scene  in detail please."),
    ("Look at this<image>, what is it?", "Look at this, what is it?"),
    ("What is it?\n<image>", "What is it?"),
])
def test_an_image_in_mid_sentence_is_removed_as_training_removes_it(value, text):
    """It was replaced by a line break, which split the sentence sent to the model in two."""
    assert split_image(value) == (text, 1)
    # Training's normalisation (palo.train.preprocess.normalize_image_turns) of the English turn, which the
    # translated turn follows: the placeholder on its own first line, then the text.
    assert join_image(*split_image(value)) == "<image>\n" + value.replace("<image>", "").strip()


@pytest.mark.parametrize("source,reply,language", [
    ("Transfer: the money was sent to the shop owner.", "Перевод: деньги были отправлены владельцу магазина.",
     "russian"),
    ("Transfer to account: the money was sent.", "Перевод на счёт: деньги были отправлены.", "russian"),
    ("Conversion: five miles is about eight kilometres.", "Перевод: пять миль — это около восьми километров.",
     "russian"),
    ("Interpreter: please sit down.", "翻译：请坐。", "chinese"),
])
def test_a_label_that_translates_the_source_s_opening_label_is_kept(source, reply, language):
    """"Перевод" is a transfer as well as a translation: the reply's translation of the source's "Transfer:" was
    stripped as a preamble."""
    assert clean_reply(reply, source) == reply
    assert check_translation(source, reply, language) == []


@pytest.mark.parametrize("source,reply,clean", [
    # The word's other meaning elsewhere in the source, or a source whose opening is no such label: a preamble.
    ("What is the transfer fee?", "Перевод: Какова комиссия за перевод?", "Какова комиссия за перевод?"),
    ("Transfer the files to the laptop.", "Перевод: Перенесите файлы на ноутбук.", "Перенесите файлы на ноутбук."),
    ("Who is the interpreter here?", "翻译：这里谁是口译员？", "这里谁是口译员？"),
])
def test_a_preamble_word_with_a_second_meaning_is_still_a_preamble_elsewhere(source, reply, clean):
    assert clean_reply(reply, source) == clean


# --------------------------------------------------------------------------------------------------------------
# End to end over HTTP
# --------------------------------------------------------------------------------------------------------------


def test_translate_end_to_end(tmp_path, server, capsys):
    data = _write(tmp_path / "in.json", SAMPLES)
    out = str(tmp_path / "out")
    assert main(_translate_args(data, out, server)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"]["tokens"] > 0 and report["requests"]["retries"] >= 6  # 500 + 429, x3 languages

    for language in ("arabic", "chinese", "french"):
        with open(os.path.join(out, f"{language}.json"), encoding="utf-8") as f:
            result = json.load(f)
        assert [s["id"] for s in result] == [s["id"] for s in SAMPLES]  # input order, nothing lost
        key = f"{language}_conversation"
        for source, sample in zip(SAMPLES, result):
            # Every field kept, English conversations untouched, translated turns alongside.
            assert {k: sample[k] for k in source} == source
            assert [t["from"] for t in sample[key]] == [t["from"] for t in source["conversations"]]
            human = sample[key][0]["value"]
            if "image" in source:
                assert human.startswith("<image>\n") and human.count("<image>") == 1
            if not sample["corrupt"]:
                for turn in sample[key]:
                    assert detect_language(turn["value"]) == language
        by_id = {s["id"]: s for s in result}
        assert [s["corrupt"] for s in result] == [False, False, False, True, True, False, False, False]
        gpt0 = by_id["000000000000"][key][1]["value"]
        assert "[0.12, 0.40, 0.55, 0.89]" in gpt0 and "3" in gpt0
        assert "1,200" in by_id["000000000002"][key][1]["value"]

        review = [json.loads(line) for line in open(os.path.join(out, f"{language}.review.jsonl"), encoding="utf-8")]
        assert [(r["id"], r["turn"]) for r in review] == [("000000000003", 1), ("000000000004", 1)]
        assert all(r["corrected"] is None and r["language"] == language for r in review)
        assert any("unchanged" in p or "English" in p for p in review[0]["problems"])
        assert any("placeholders missing" in p for p in review[1]["problems"])

    calls = [(lang, text, status) for lang, text, status, _ in server.calls]
    for language in ("arabic", "chinese", "french"):
        per_text = Counter(text for lang, text, _ in calls if lang == language)
        # Retried after 500 / 429; a rejected reply asked once more (stricter), then flagged; never a third time.
        assert per_text["fivehundred how many cats are there?"] == 2
        assert per_text["ratelimit what colour is the car?"] == 2
        assert per_text["echoenglish the picture shows a big dog near a tree."] == 2
        assert per_text["echoonce what is the man holding now?"] == 2
        assert per_text["brackets tell me a story about cats please"] == 2
        # The question shared by samples 0 and 7 went out once.
        assert per_text["What is on the table?"] == 1
    # The stricter retry tells the model what was wrong.
    strict = [system for lang, text, status, system in server.calls if text.startswith("echoonce")]
    assert "rejected" not in strict[0] and "rejected" in strict[1]


def test_malformed_conversations_are_refused_before_any_request(tmp_path, server, capsys):
    """A string would be translated letter by letter, a missing list would come out empty and "finished"."""
    for bad in ("What is this?", None, [], [{"from": "human", "value": 5}]):
        sample = {"id": "bad", "conversations": bad}
        data = _write(tmp_path / "in.json", [SAMPLES[0], sample])
        calls = len(server.calls)
        out = tmp_path / "out"
        assert main(_translate_args(data, str(out), server, "ar")) == 2
        err = capsys.readouterr().err
        assert f"--data_path {data}: sample 1 (id 'bad'): 'conversations' must be a non-empty list" in err, bad
        assert len(server.calls) == calls and not out.exists()


@pytest.mark.parametrize("field,sample", [
    ("conversations[0].value", _sample(1, "<image>\nWhat does the sign \ud83d say?", "It says hello.")),
    ("image", dict(_sample(1, "<image>\nWhat is it?", "A dog."), image="\udc00.jpg")),
])
def test_a_lone_surrogate_is_refused_before_any_request(tmp_path, server, capsys, field, sample):
    """Half an emoji (``"\\ud83d"``) is valid JSON but no text: it cannot be hashed, sent or written as UTF-8."""
    data = tmp_path / "in.json"
    data.write_text(json.dumps([SAMPLES[0], sample]), encoding="ascii")  # ensure_ascii: the escape as scraped
    out = tmp_path / "out"
    assert main(_translate_args(str(data), str(out), server, "ar")) == 2
    err = capsys.readouterr().err
    assert f"--data_path {data}: sample 1 (id '000000000001'): {field} holds a lone surrogate" in err, err
    assert server.calls == [] and not out.exists()


def test_preambles_never_reach_the_data(tmp_path, server):
    """A server that announces every translation ("Translation: ...", "以下是翻译：", "Sure! Here is ..."), for turns
    that themselves talk about translation: the preamble is removed at once (no second request), never kept."""
    samples = [
        _sample(0, "<image>\npreamble can you give a translation of the sign?", "preamble the translation says stop."),
        _sample(1, "<image>\nHere is the translation request preamble: what is on the table?",
                "preamble a cat sits on the table."),
    ]
    out = str(tmp_path / "out")
    assert main(_translate_args(_write(tmp_path / "in.json", samples), out, server)) == 0
    for language in ("arabic", "chinese", "french"):
        result = json.load(open(os.path.join(out, f"{language}.json"), encoding="utf-8"))
        for source, sample in zip(samples, result):
            assert sample["corrupt"] is False
            for english, turn in zip(source["conversations"], sample[f"{language}_conversation"]):
                text, images = split_image(english["value"])
                assert turn["value"] == "<image>\n" * images + fake_translate(text, language)
    per_text = Counter((lang, text) for lang, text, _, _ in server.calls)
    assert set(per_text.values()) == {1}  # accepted on the first reply: stripped, not retried
    assert not os.path.getsize(os.path.join(out, "arabic.review.jsonl"))


def test_retry_after_is_honoured(tmp_path, server):
    data = _write(tmp_path / "in.json", [SAMPLES[2]])
    start = time.monotonic()
    assert main(_translate_args(data, str(tmp_path / "out"), server, "ar")) == 0
    assert time.monotonic() - start >= 0.4


def test_second_run_is_served_from_the_cache(tmp_path, server, capsys):
    data = _write(tmp_path / "in.json", SAMPLES)
    cache = str(tmp_path / "shared.sqlite")
    assert main(_translate_args(data, str(tmp_path / "a"), server, "ar,fr", "--cache", cache)) == 0
    first = len(server.calls)
    capsys.readouterr()
    # A fresh output folder (nothing to resume from): everything comes from the cache, rejections included.
    assert main(_translate_args(data, str(tmp_path / "b"), server, "ar,fr", "--cache", cache)) == 0
    assert len(server.calls) == first
    report = json.loads(capsys.readouterr().out)
    assert report["languages"]["arabic"]["corrupt"] == 2
    for language in ("arabic", "french"):
        with open(tmp_path / "a" / f"{language}.json", encoding="utf-8") as fa, \
                open(tmp_path / "b" / f"{language}.json", encoding="utf-8") as fb:
            assert json.load(fa) == json.load(fb)


def test_texts_differing_only_in_protected_spans_are_sent_once(tmp_path, server):
    """The cache and the in-flight memo are keyed by the masked text the model sees: turns that differ only in their
    numbers, coordinates or code are one request per language, and each gets its own spans back. A turn that is
    nothing but such spans (a bounding-box answer) is kept as it is, without a request."""
    box = "[0.12, 0.40, 0.55, 0.89]"
    samples = [_sample(i, f"<image>\nWhere is cat number {i + 1}?",
                       f"It sits at [0.{i}1, 0.2, 0.3, 0.4] with {i + 2} toys.") for i in range(4)]
    samples.append(_sample(4, "<image>\nGive the bounding box of the cat.", box))
    out = str(tmp_path / "out")
    assert main(_translate_args(_write(tmp_path / "in.json", samples), out, server, "ar,fr")) == 0
    per_text = Counter((lang, text) for lang, text, _, _ in server.calls)
    for language in ("arabic", "french"):
        assert per_text[(language, "Where is cat number [[1]]?")] == 1
        assert per_text[(language, "It sits at [[1]] with [[2]] toys.")] == 1
        result = json.load(open(os.path.join(out, f"{language}.json"), encoding="utf-8"))
        for i, sample in enumerate(result[:4]):
            question, answer = (t["value"] for t in sample[f"{language}_conversation"])
            assert question == "<image>\n" + fake_translate("Where is cat number [[1]]?", language).replace(
                "[[1]]", str(i + 1))
            assert f"[0.{i}1, 0.2, 0.3, 0.4]" in answer and str(i + 2) in answer and not sample["corrupt"]
        assert result[4][f"{language}_conversation"][1]["value"] == box and not result[4]["corrupt"]
    assert not any(text == "[[1]]" for _, text in per_text)
    assert len(per_text) == 2 * 3  # per language: the two masked templates and the bounding-box question


def test_a_cache_keyed_by_raw_texts_is_still_read(tmp_path, server):
    """Caches written before keys were masked hold the restored translation under the raw text: a rerun with such
    a cache sends nothing for those texts."""
    from palo.data.translate import TranslationCache

    cache = str(tmp_path / "old.sqlite")
    legacy = TranslationCache(cache)
    legacy.put("fake-mt", "arabic", "There are 3 cats.", "يوجد 3 القطة", [])
    legacy.put("fake-mt", "arabic", "What is on the table?", "ماذا على الطاولة؟", [])
    legacy.close()
    data = _write(tmp_path / "in.json", [_sample(0, "<image>\nWhat is on the table?", "There are 3 cats.")])
    out = str(tmp_path / "out")
    assert main(_translate_args(data, out, server, "ar", "--cache", cache)) == 0
    assert server.calls == []
    result = json.load(open(os.path.join(out, "arabic.json"), encoding="utf-8"))
    assert [t["value"] for t in result[0]["arabic_conversation"]] == ["<image>\nماذا على الطاولة؟", "يوجد 3 القطة"]

    # A rejection stored that way is asked again under --retry_rejected, as the masked text.
    legacy = TranslationCache(cache)
    legacy.put("fake-mt", "arabic", "There are 3 cats.", "There are 3 cats.", ["left unchanged (still English)"])
    legacy.close()
    assert main(_translate_args(data, str(tmp_path / "again"), server, "ar", "--cache", cache, "--retry_rejected")) == 0
    assert [text for _, text, _, _ in server.calls] == ["There are [[1]] cats."]


def test_memory_does_not_grow_with_the_languages_translated(tmp_path, server, capsys):
    """A run keeps where each finished record is in its log, not the record: LLaVA-Instruct-150K into 9 languages is
    about 1.4M translated samples, tens of GB as Python objects. Two more languages over the same input must not
    raise the run's peak by a fair share of what their translations weigh (kept in memory, they raised it by
    about their whole size)."""
    import tracemalloc

    words = "is on at it we go up by to an".split()  # short English words: long translations, a small input
    samples = [_sample(i, "<image>\nDescribe it.", " ".join(words[(i + k) % 10] for k in range(3000)) + f" {i}.")
               for i in range(200)]
    data = _write(tmp_path / "in.json", samples)
    assert main(_translate_args(_write(tmp_path / "one.json", samples[:1]), str(tmp_path / "warm"), server)) == 0
    peaks = {}
    for languages in ("ar", "ar,zh,fr"):
        tracemalloc.start()
        try:
            assert main(_translate_args(data, str(tmp_path / languages), server, languages)) == 0
            peaks[languages] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    capsys.readouterr()
    added = sum(os.path.getsize(tmp_path / "ar,zh,fr" / f"{language}.json") for language in ("chinese", "french"))
    assert peaks["ar,zh,fr"] - peaks["ar"] < 0.25 * added, (peaks, added)


def test_the_input_is_read_one_sample_at_a_time(tmp_path, server, capsys, monkeypatch):
    """The English input is indexed by byte offset, not loaded: a run's peak memory stays well under the input's
    size (loaded, it was several times that size)."""
    import tracemalloc

    from palo.data.json_index import JsonArrayIndex

    # The index's scan works through 4 MB chunks with scratch arrays several times that size, a constant that would
    # dwarf this small input; smaller chunks leave the run's own memory to be measured.
    build = JsonArrayIndex.build
    monkeypatch.setattr(JsonArrayIndex, "build", classmethod(lambda cls, path, **kw: build(path, chunk_size=1 << 16,
                                                                                             **kw)))
    answer = "The cat sits on the big table near the window and looks at the birds in the garden. " * 15
    data = _write(tmp_path / "in.json", [_sample(i, "<image>\nDescribe it.", answer + f"It has {i} toys.")
                                         for i in range(3000)])  # one request per text: they differ in a number
    assert main(_translate_args(data, str(tmp_path / "warm"), server, "ar", "--limit", "2")) == 0
    tracemalloc.start()
    try:
        assert main(_translate_args(data, str(tmp_path / "out"), server, "ar")) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    capsys.readouterr()
    assert peak < os.path.getsize(data) / 3, (peak, os.path.getsize(data))


def test_apply_review_merges_corrections(tmp_path, server, capsys):
    data = _write(tmp_path / "in.json", SAMPLES)
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "ar")) == 0
    review_path = out / "arabic.review.jsonl"
    entries = [json.loads(line) for line in open(review_path, encoding="utf-8")]
    entries[0]["corrected"] = "تظهر الصورة كلبا كبيرا بالقرب من شجرة."
    # entries[1] left uncorrected: that sample must stay corrupt.
    with open(review_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    assert main(["apply-review", "--data_path", str(out / "arabic.json"), "--review", str(review_path)]) == 0
    with open(out / "arabic.json", encoding="utf-8") as f:
        result = json.load(f)
    assert result[3]["corrupt"] is False
    assert result[3]["arabic_conversation"][1]["value"] == "تظهر الصورة كلبا كبيرا بالقرب من شجرة."
    assert result[4]["corrupt"] is True
    # A translate rerun rebuilds the set from the progress log: the correction survives, no request is made.
    calls = len(server.calls)
    capsys.readouterr()
    assert main(_translate_args(data, str(out), server, "ar")) == 0
    assert len(server.calls) == calls
    with open(out / "arabic.json", encoding="utf-8") as f:
        assert json.load(f) == result


def test_apply_review_reads_the_set_one_sample_at_a_time(tmp_path, capsys, monkeypatch):
    """A translated set is as large as its English input (150K samples): apply-review holds only the corrected
    samples, and rewrites the set in place sample by sample."""
    import tracemalloc

    from palo.data.json_index import JsonArrayIndex

    build = JsonArrayIndex.build  # small scan chunks: see test_the_input_is_read_one_sample_at_a_time
    monkeypatch.setattr(JsonArrayIndex, "build", classmethod(lambda cls, path, **kw: build(path, chunk_size=1 << 16,
                                                                                             **kw)))
    answer = "The cat sits on the big table near the window. " * 25
    samples = [dict(_sample(i, "<image>\nDescribe it.", answer), corrupt=i == 7,
                    arabic_conversation=[{"from": "human", "value": "<image>\nصفها."},
                                         {"from": "gpt", "value": "القطة على الطاولة. " * 20}]) for i in range(3000)]
    data = _write(tmp_path / "arabic.json", samples)
    review = _write(tmp_path / "arabic.review.jsonl", [])
    with open(review, "w", encoding="utf-8") as f:
        f.write(json.dumps({"language": "arabic", "index": 7, "turn": 1, "source": answer,
                            "corrected": "القطة الكبيرة على الطاولة."}, ensure_ascii=False) + "\n")
    size = os.path.getsize(data)
    tracemalloc.start()
    try:
        assert main(["apply-review", "--data_path", data, "--review", review]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert json.loads(capsys.readouterr().out)["samples_cleared"] == 1
    result = json.load(open(data, encoding="utf-8"))
    assert result[7]["arabic_conversation"][1]["value"] == "القطة الكبيرة على الطاولة." and not result[7]["corrupt"]
    assert result[:7] + result[8:] == samples[:7] + samples[8:]
    assert peak < size / 3, (peak, size)


def test_apply_review_after_a_killed_run_keeps_corrections_past_a_torn_log_line(tmp_path, server, capsys):
    """A translate run killed mid-write leaves a torn last line in the progress log; the corrections appended by
    apply-review must start a line of their own, or the next resume cuts them off with the torn line."""
    data = _write(tmp_path / "in.json", SAMPLES)
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "ar")) == 0
    with open(out / "arabic.progress.jsonl", "a", encoding="utf-8") as f:
        f.write('{"index": 3, "hash": "torn')
    review_path = out / "arabic.review.jsonl"
    entries = [json.loads(line) for line in open(review_path, encoding="utf-8")]
    entries[0]["corrected"] = "تظهر الصورة كلبا كبيرا بالقرب من شجرة."
    with open(review_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    assert main(["apply-review", "--data_path", str(out / "arabic.json"), "--review", str(review_path)]) == 0
    calls = len(server.calls)
    capsys.readouterr()
    assert main(_translate_args(data, str(out), server, "ar")) == 0
    assert len(server.calls) == calls
    with open(out / "arabic.json", encoding="utf-8") as f:
        result = json.load(f)
    assert result[3]["corrupt"] is False
    assert result[3]["arabic_conversation"][1]["value"] == "تظهر الصورة كلبا كبيرا بالقرب من شجرة."


def test_apply_review_names_a_malformed_review_line(tmp_path, server, capsys):
    data = _write(tmp_path / "in.json", SAMPLES)
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "ar")) == 0
    review_path = out / "arabic.review.jsonl"
    lines = open(review_path, encoding="utf-8").read().splitlines()
    lines[0] = lines[0][:-1] + ","  # a reviewer's typo on line 1: the corrections after it must not vanish quietly
    review_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = (out / "arabic.json").read_bytes()
    capsys.readouterr()
    assert main(["apply-review", "--data_path", str(out / "arabic.json"), "--review", str(review_path)]) == 2
    assert f"{review_path}:1: not valid JSON" in capsys.readouterr().err
    assert (out / "arabic.json").read_bytes() == before
    review_path.write_text('{"corrected": "نص"}\n', encoding="utf-8")  # not an entry translate wrote
    assert main(["apply-review", "--data_path", str(out / "arabic.json"), "--review", str(review_path)]) == 2
    assert f"{review_path}:1: missing key(s) index, language, turn" in capsys.readouterr().err
    assert (out / "arabic.json").read_bytes() == before
    # A correction that is not text, beside a good one: refused before the set or the resume log is touched (the
    # set rewritten without the log would lose the good correction at the next translate rerun).
    entries = [json.loads(line) for line in lines[1:]] + [json.loads(lines[0][:-1] + "}")]
    entries[0]["corrected"], entries[1]["corrected"] = "تظهر الصورة كلبا كبيرا بالقرب من شجرة.", 123
    review_path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    log = (out / "arabic.progress.jsonl").read_bytes()
    assert main(["apply-review", "--data_path", str(out / "arabic.json"), "--review", str(review_path)]) == 2
    assert "'corrected' must be a string or null, got int" in capsys.readouterr().err
    assert (out / "arabic.json").read_bytes() == before and (out / "arabic.progress.jsonl").read_bytes() == log


def test_apply_review_puts_image_back_in_front(tmp_path, server):
    data = _write(tmp_path / "in.json", [_sample(0, "echoenglish what is this thing here?\n<image>", "It is a cat.")])
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "ar")) == 0
    entries = [json.loads(line) for line in open(out / "arabic.review.jsonl", encoding="utf-8")]
    assert entries[0]["turn"] == 0 and entries[0]["translation"].startswith("<image>\n")
    entries[0]["corrected"] = "ما هذا الشيء هنا؟"
    _write(out / "fixed.jsonl", [])
    with open(out / "fixed.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps(entries[0], ensure_ascii=False) + "\n")
    assert main(["apply-review", "--data_path", str(out / "arabic.json"), "--review", str(out / "fixed.jsonl"),
                 "--output", str(out / "fixed.json")]) == 0
    with open(out / "fixed.json", encoding="utf-8") as f:
        sample = json.load(f)[0]
    assert sample["corrupt"] is False
    assert sample["arabic_conversation"][0]["value"] == "<image>\nما هذا الشيء هنا؟"


def test_unfinished_samples_exit_1_and_resume(tmp_path, server):
    """A server that keeps failing leaves samples unfinished (not flagged); the rerun finishes them."""
    data = _write(tmp_path / "in.json", SAMPLES[:3])
    out = str(tmp_path / "out")
    server.stall_after = None
    # fivehundred fails once; with --max_retries 0 the first run cannot get past it.
    assert main(_translate_args(data, out, server, "ar", "--max_retries", "0")) == 1
    assert not os.path.exists(os.path.join(out, "arabic.json"))  # no partial final output
    assert main(_translate_args(data, out, server, "ar", "--max_retries", "0")) == 0
    with open(os.path.join(out, "arabic.json"), encoding="utf-8") as f:
        assert [s["corrupt"] for s in json.load(f)] == [False, False, False]


def test_a_request_the_endpoint_refuses_is_rejected_not_left_unfinished(tmp_path, server, capsys):
    """A 400 (context length exceeded, a content filter on the prompt) comes back however often it is asked: the
    sample is finished as rejected, so the language's file is written; --retry_rejected asks again."""
    samples = [SAMPLES[0], _sample(1, "<image>\nrefuseme describe the picture.", "A big dog stands near a tree.")]
    data = _write(tmp_path / "in.json", samples)
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "ar")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"]["refused"] == 1 and report["languages"]["arabic"]["corrupt"] == 1
    with open(out / "arabic.json", encoding="utf-8") as f:
        assert [s["corrupt"] for s in json.load(f)] == [False, True]
    [entry] = [json.loads(line) for line in open(out / "arabic.review.jsonl", encoding="utf-8")]
    assert (entry["index"], entry["turn"]) == (1, 0)
    assert entry["problems"] == [entry["problems"][0]] and entry["problems"][0].startswith("request refused: ")
    assert "HTTP 400" in entry["problems"][0] and "maximum context length" in entry["problems"][0]
    assert server.answered(400)[("arabic", "refuseme describe the picture.")] == 1  # neither retried nor stricter

    server.healed = True
    assert main(_translate_args(data, str(out), server, "ar", "--retry_rejected")) == 0
    with open(out / "arabic.json", encoding="utf-8") as f:
        assert [s["corrupt"] for s in json.load(f)] == [False, False]


@pytest.mark.parametrize("cue,status,says", [
    ("unauthorized", 401, "the endpoint refused the API key (HTTP 401): check --api_key"),
    ("forbidden", 403, "the endpoint denied access (HTTP 403)"),
    ("nomodel", 404, "the endpoint has no such model or path (HTTP 404): check --model and --base_url"),
])
def test_a_refused_key_or_model_stops_the_run_at_the_first_request(tmp_path, server, capsys, cue, status, says):
    """Every request would fail alike: the run sent one per sample and ended with "rerun to resume". It is about the
    run's settings, not a text: its samples stay unfinished (rejecting them would flag the whole set corrupt)."""
    samples = [_sample(i, f"<image>\n{cue} what is on table number {i}?", "A dog.") for i in range(6)]
    data = _write(tmp_path / "in.json", samples)
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "ar,fr", "--parallel", "1")) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert says in report["stopped"] and f"error: {says}" in captured.err
    assert len(server.calls) == 1 and server.calls[0][2] == status  # stopped at the first, not retried
    # Nothing flagged corrupt or finished: a rerun with the setting fixed translates every sample.
    assert [(r["unfinished"], r["corrupt"]) for r in report["languages"].values()] == [(6, 0), (6, 0)]
    assert not (out / "arabic.json").exists() and not (out / "arabic.progress.jsonl").read_text()
    server.healed = True
    capsys.readouterr()
    assert main(_translate_args(data, str(out), server, "ar,fr")) == 0
    assert [s["corrupt"] for s in json.load(open(out / "arabic.json", encoding="utf-8"))] == [False] * 6


def test_a_reply_the_model_refused_is_rejected_not_retried_or_left_unfinished(tmp_path, server, capsys):
    """A 200 with ``content: null`` and a ``refusal`` was read as a malformed body: retried, then the sample left
    unfinished on every rerun. It is rejected as the endpoint's 400 is, with the refusal in the review file."""
    samples = [SAMPLES[0], _sample(1, "<image>\ndeclineme describe the picture.", "A big dog stands near a tree.")]
    data = _write(tmp_path / "in.json", samples)
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "fr")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"]["refused"] == 1 and report["languages"]["french"]["corrupt"] == 1
    with open(out / "french.json", encoding="utf-8") as f:
        assert [s["corrupt"] for s in json.load(f)] == [False, True]
    [entry] = [json.loads(line) for line in open(out / "french.review.jsonl", encoding="utf-8")]
    assert (entry["index"], entry["turn"]) == (1, 0)
    assert entry["problems"] == ["request refused: the model declined (refusal): I'm sorry, I can't help with that."]
    assert server.answered()[("french", "declineme describe the picture.")] == 1  # neither retried nor stricter


def test_a_reply_stopped_by_a_content_filter_is_rejected(server):
    """Half a translation that reads well is still half: any finish reason but "stop" rejects it."""
    from palo.data.translate import Translator

    translator = Translator("fake-mt", api_key="k", base_url=server.base_url, backoff=0.01)
    result = translator.translate("contentfilter the cat sleeps on the red table near the window.", "french")
    assert result.problems == ["generation stopped by 'content_filter', not 'stop'"]


def test_retry_rejected_retranslates_the_corrupt_samples_of_the_output_folder(tmp_path, server, capsys):
    data = _write(tmp_path / "in.json", SAMPLES[:5])  # 3 and 4 are rejected
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "ar")) == 0
    with open(out / "arabic.json", encoding="utf-8") as f:
        assert [s["corrupt"] for s in json.load(f)] == [False, False, False, True, True]
    server.healed = True
    calls = len(server.calls)
    assert main(_translate_args(data, str(out), server, "ar", "--retry_rejected")) == 0
    with open(out / "arabic.json", encoding="utf-8") as f:
        result = json.load(f)
    assert [s["corrupt"] for s in result] == [False] * 5
    assert result[3]["arabic_conversation"][1]["value"] == fake_translate(
        "echoenglish the picture shows a big dog near a tree.", "arabic")
    assert not os.path.getsize(out / "arabic.review.jsonl")
    # Only the rejected turns were asked again; the accepted ones came from the cache.
    assert sorted(text for _, text, _, _ in server.calls[calls:]) == [
        "echoenglish the picture shows a big dog near a tree.", "mangle it prints [[1]] and then [[2]] lines."]
    capsys.readouterr()
    assert main(_translate_args(data, str(out), server, "ar", "--retry_rejected")) == 0  # nothing left to retry
    assert len(server.calls) == calls + 2


def test_retry_rejected_keeps_the_turns_a_reviewer_corrected(tmp_path, server, capsys):
    """A sample left corrupt after a review (one turn corrected, one still rejected) was retranslated whole by
    --retry_rejected: the reviewer's turn was replaced by the model's rejected attempt again."""
    data = _write(tmp_path / "in.json", [_sample(0, "<image>\nechoenglish what is on the big table?",
                                                 "echoenglish a cat sits on the big table.")])
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "fr")) == 0
    entries = [json.loads(line) for line in open(out / "french.review.jsonl", encoding="utf-8")]
    assert [e["turn"] for e in entries] == [0, 1]
    entries[1]["corrected"] = "un chat est assis sur la grande table."
    review = _write(tmp_path / "review.jsonl", [])
    with open(review, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    assert main(["apply-review", "--data_path", str(out / "french.json"), "--review", review]) == 0
    calls = len(server.calls)
    capsys.readouterr()
    assert main(_translate_args(data, str(out), server, "fr", "--retry_rejected")) == 0  # turn 0 still fails
    [sample] = json.load(open(out / "french.json", encoding="utf-8"))
    assert sample["corrupt"] is True
    assert sample["french_conversation"][1]["value"] == "un chat est assis sur la grande table."
    assert [(e["turn"], e["corrected"]) for e in map(json.loads, open(out / "french.review.jsonl",
                                                                         encoding="utf-8"))] == [(0, None)]
    # Only the still-rejected turn was asked again (the first try and the stricter retry).
    assert {text for _, text, _, _ in server.calls[calls:]} == {"echoenglish what is on the big table?"}
    server.healed = True
    assert main(_translate_args(data, str(out), server, "fr", "--retry_rejected")) == 0
    [sample] = json.load(open(out / "french.json", encoding="utf-8"))
    assert sample["corrupt"] is False
    assert sample["french_conversation"] == [
        {"from": "human", "value": "<image>\n" + fake_translate("echoenglish what is on the big table?", "french")},
        {"from": "gpt", "value": "un chat est assis sur la grande table."}]


def test_an_input_sample_flagged_corrupt_stays_corrupt(tmp_path, server, capsys):
    """An input sample already flagged "corrupt": true came out of translate with "corrupt": false."""
    flagged = dict(_sample(1, "<image>\nWhat is on the chair?", "A dog sits on the chair."), corrupt=True)
    data = _write(tmp_path / "in.json", [_sample(0, "<image>\nWhat is on the table?", "A cat sits on the table."),
                                         flagged])
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "fr")) == 0
    assert json.loads(capsys.readouterr().out)["languages"]["french"]["corrupt"] == 1
    assert [s["corrupt"] for s in json.load(open(out / "french.json", encoding="utf-8"))] == [False, True]
    # --retry_rejected has no rejected turn of it to ask again: nothing is sent, and it stays flagged.
    calls = len(server.calls)
    assert main(_translate_args(data, str(out), server, "fr", "--retry_rejected")) == 0
    assert len(server.calls) == calls
    assert [s["corrupt"] for s in json.load(open(out / "french.json", encoding="utf-8"))] == [False, True]


def test_a_review_leaves_an_input_sample_flagged_corrupt_corrupt_as_translate_does(tmp_path, server, capsys):
    """apply-review cleared a sample the English input had flagged corrupt once its rejected turn was corrected; a
    translate rerun then wrote it corrupt again (the input's flag) while its report counted 0 corrupt."""
    flagged = dict(_sample(0, "<image>\nWhat is on the chair?", "echoenglish a dog sits on the chair."), corrupt=True)
    data = _write(tmp_path / "in.json", [flagged, _sample(1, "<image>\nWhat is on the table?",
                                                          "echoenglish a cat sits on the table.")])
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "fr")) == 0
    assert json.loads(capsys.readouterr().out)["languages"]["french"]["corrupt"] == 2
    review = out / "french.review.jsonl"
    entries = [json.loads(line) for line in open(review, encoding="utf-8")]
    assert [(e["index"], e["turn"]) for e in entries] == [(0, 1), (1, 1)]
    for entry, text in zip(entries, ("un chien est assis sur la chaise.", "un chat est assis sur la table.")):
        entry["corrected"] = text
    review.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    assert main(["apply-review", "--data_path", str(out / "french.json"), "--review", str(review)]) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert (report["samples_cleared"], report["samples_flagged_in_input"]) == (1, 1)
    assert "the English input flagged them corrupt itself" in printed.err
    reviewed = json.load(open(out / "french.json", encoding="utf-8"))
    assert [s["corrupt"] for s in reviewed] == [True, False]
    assert reviewed[0]["french_conversation"][1]["value"] == "un chien est assis sur la chaise."
    # A rerun rebuilds the same set from the log, and its report counts what it wrote.
    assert main(_translate_args(data, str(out), server, "fr")) == 0
    assert json.loads(capsys.readouterr().out)["languages"]["french"]["corrupt"] == 1
    assert json.load(open(out / "french.json", encoding="utf-8")) == reviewed
    # A log whose last record cleared the flag (an apply-review before this rule): the report still counts what the
    # rerun writes.
    log = out / "french.progress.jsonl"
    last = json.loads(log.read_text(encoding="utf-8").splitlines()[-2])  # apply-review's record of sample 0
    assert last["index"] == 0 and last["input_corrupt"] is True
    del last["input_corrupt"]
    last["sample"]["corrupt"] = False
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(last, ensure_ascii=False) + "\n")
    assert main(_translate_args(data, str(out), server, "fr")) == 0
    assert json.loads(capsys.readouterr().out)["languages"]["french"]["corrupt"] == 1
    assert [s["corrupt"] for s in json.load(open(out / "french.json", encoding="utf-8"))] == [True, False]


def test_an_output_dir_that_is_a_file_is_an_error_line(tmp_path, server, capsys):
    """--output_dir naming an existing file died with a FileExistsError traceback."""
    data = _write(tmp_path / "in.json", SAMPLES[:1])
    (tmp_path / "notadir").write_text("", encoding="utf-8")
    assert main(_translate_args(data, str(tmp_path / "notadir"), server, "fr")) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write --output_dir {tmp_path / 'notadir'}" in err and "Traceback" not in err
    assert len(server.calls) == 0


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_one_is_refused_and_leaves_a_finished_set_alone(tmp_path, server, capsys, limit):
    """--limit 0 (or -1, taken as 0) made a run over no samples: "complete", so it replaced the finished
    <language>.json and its review file with empty ones and exited 0."""
    data = _write(tmp_path / "in.json", SAMPLES[:2])
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "fr")) == 0
    capsys.readouterr()
    kept = {name: (out / name).read_bytes() for name in ("french.json", "french.review.jsonl")}
    calls = len(server.calls)
    with pytest.raises(SystemExit) as stop:
        main(_translate_args(data, str(out), server, "fr", "--limit", limit))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --limit: must be at least 1, got {limit}" in err and "Traceback" not in err
    assert {name: (out / name).read_bytes() for name in kept} == kept and len(server.calls) == calls


def test_a_sample_file_refuses_a_negative_limit(tmp_path):
    """A negative limit was taken as 0: no samples, which the translate runner took for a finished set."""
    from palo.data.sample_file import SampleFile

    data = _write(tmp_path / "in.json", SAMPLES[:2])
    assert [len(SampleFile(data, "--data_path", limit=n)) for n in (None, 0, 1, 5)] == [2, 0, 1, 2]
    with pytest.raises(ValueError, match=r"--data_path .*in\.json: limit must be at least 0, got -1"):
        SampleFile(data, "--data_path", limit=-1)


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused(tmp_path, server, capsys, timeout):
    """--timeout 0 or less was taken: every request then timed out at once through the whole retry schedule, and
    the run ended saying "requests kept failing"."""
    data = _write(tmp_path / "in.json", SAMPLES[:1])
    with pytest.raises(SystemExit) as stop:
        main(_translate_args(data, str(tmp_path / "out"), server, "fr", "--timeout", timeout))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --timeout: " in err and timeout in err and "Traceback" not in err
    assert server.calls == [] and not (tmp_path / "out").exists()


def test_resume_takes_the_other_fields_from_the_current_input(tmp_path, server):
    """Resume matches finished samples by their conversations: ids, images and other fields fixed in the input
    since (or samples with the same conversations swapped) must reach the output, without a new request."""
    data = _write(tmp_path / "in.json", SAMPLES[:4])
    out = tmp_path / "out"
    assert main(_translate_args(data, str(out), server, "ar")) == 0
    changed = [dict(s, id=f"fixed-{i}", image=f"coco/train2017/{i}.jpg", source="llava") for i, s in
               enumerate(SAMPLES[:4])]
    _write(tmp_path / "in.json", changed)
    calls = len(server.calls)
    assert main(_translate_args(data, str(out), server, "ar")) == 0
    assert len(server.calls) == calls
    with open(out / "arabic.json", encoding="utf-8") as f:
        result = json.load(f)
    for source, sample in zip(changed, result):
        assert list(sample) == [*source, "arabic_conversation", "corrupt"]  # the output form, as a fresh run's
        assert {k: sample[k] for k in source} == source
    assert [json.loads(line)["id"] for line in open(out / "arabic.review.jsonl", encoding="utf-8")] == ["fixed-3"]


def test_an_unexpected_error_stops_the_run_says_what_it_was_and_keeps_what_finished(tmp_path, server, capsys,
                                                                                   monkeypatch):
    """A defect (not a failed call) would hit every sample and each costs requests: the run stops taking work."""
    from palo.data.translate import runner

    real = runner.translate_sample
    seen: list[int] = []

    def translate_sample(sample, language, translator, index, previous=None):
        seen.append(index)
        if index == 1:
            raise KeyError("surprise")
        return real(sample, language, translator, index, previous)

    monkeypatch.setattr(runner, "translate_sample", translate_sample)
    data = _write(tmp_path / "in.json", SAMPLES)
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert main(_translate_args(data, out, server, "ar", "--parallel", "1")) == 1
    captured = capsys.readouterr()
    errors = json.loads(captured.out)["languages"]["arabic"]["errors"]
    error = "unexpected KeyError: 'surprise' (the run stopped)"
    assert errors == [{"index": 1, "id": SAMPLES[1].get("id"), "error": error}]
    assert "Traceback" in captured.err and "stopped on an unexpected error" in captured.err and seen == [0, 1]
    monkeypatch.setattr(runner, "translate_sample", real)
    assert main(_translate_args(data, out, server, "ar")) == 0  # the rerun finishes, sample 0 from the log


def test_a_second_run_on_one_output_folder_is_refused_before_reading_or_asking(tmp_path, server, capsys):
    from palo.jsonl import JsonlAppender

    data = _write(tmp_path / "in.json", SAMPLES[:2])
    out = tmp_path / "out"
    out.mkdir()
    with JsonlAppender(str(out / "arabic.progress.jsonl")):  # another run is writing it
        assert main(_translate_args(data, str(out), server, "ar,zh")) == 2
    assert "arabic.progress.jsonl: another process is writing this file" in capsys.readouterr().err
    assert len(server.calls) == 0
    assert main(_translate_args(data, str(out), server, "ar,zh")) == 0  # the lock of the refused run is gone


def test_resume_after_kill(tmp_path, server):
    """SIGKILL mid-run, rerun: every sample once, in order; no source string answered twice."""
    questions = ["What is on the table?", "Describe the picture.", "What colour is the sky?"]
    things = "cat dog bird fish frog horse cow goat duck lion bear wolf fox owl bee ant".split()
    samples = [_sample(i, f"<image>\n{questions[i % 3]}", f"The image shows a {thing} sitting on a mat.")
               for i, thing in enumerate(things)]
    data = _write(tmp_path / "in.json", samples)
    out = tmp_path / "out"
    server.stall_after = 9  # answer 9 requests, then hang every later one until the client is dead
    cmd = [sys.executable, "-m", "palo.data.cli", *_translate_args(data, str(out), server, "ar"), "--parallel", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert server.stalled.wait(60), proc.stderr.read().decode() if proc.poll() is not None else "no stall"
        time.sleep(1.0)  # let the client record what it already got (generous: CI machines can be loaded)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    progress = out / "arabic.progress.jsonl"
    done_before = len(progress.read_text(encoding="utf-8").splitlines())
    assert 0 < done_before < len(samples)
    assert not (out / "arabic.json").exists()
    server.stall_after = None
    server.release.set()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    with open(out / "arabic.json", encoding="utf-8") as f:
        result = json.load(f)
    assert [s["id"] for s in result] == [s["id"] for s in samples]
    assert len(progress.read_text(encoding="utf-8").splitlines()) == len(samples)  # nothing written twice
    answered = server.answered()
    distinct = {("arabic", t) for t in questions} | {("arabic", s["conversations"][1]["value"]) for s in samples}
    assert set(answered) == distinct
    assert max(answered.values()) == 1, [k for k, v in answered.items() if v > 1]


# Real translations of the same masked turn: the check must accept each (no false rejections in any language).
GOOD = {
    "chinese": "图片中有[[1]]只猫坐在桌子上，旁边有一盏红色的灯。",
    "japanese": "画像には[[1]]匹の猫がテーブルの上に座っていて、隣に赤いランプがあります。",
    "french": "L'image montre [[1]] chats assis sur la table, à côté d'une lampe rouge.",
    "spanish": "La imagen muestra [[1]] gatos sentados en la mesa, junto a una lámpara roja.",
    "russian": "На изображении [[1]] кошки сидят на столе рядом с красной лампой.",
    "arabic": "تُظهر الصورة [[1]] قطط تجلس على الطاولة بجانب مصباح أحمر.",
    "hindi": "तस्वीर में [[1]] बिल्लियाँ मेज़ पर बैठी हैं, पास में एक लाल लैंप है।",
    "bengali": "ছবিতে [[1]]টি বিড়াল টেবিলের উপর বসে আছে, পাশে একটি লাল বাতি।",
    "urdu": "تصویر میں [[1]] بلیاں میز پر بیٹھی ہیں، ساتھ میں ایک سرخ لیمپ ہے۔",
}


@pytest.mark.parametrize("language", sorted(GOOD))
def test_check_accepts_real_translations(language):
    source = "The image shows [[1]] cats sitting on the table, next to a red lamp."
    assert check_translation(source, GOOD[language], language, 1) == []
    # ... and rejects the same text for a language of another script.
    other = "russian" if language != "russian" else "hindi"
    assert check_translation(source, GOOD[language], other, 1) != []


@pytest.mark.parametrize("cache_file", [True, False])
def test_a_text_whose_owner_finishes_between_lookup_and_lock_is_not_sent_again(tmp_path, server, cache_file):
    """The interleaving CI once hit under load, forced: a second thread looks the text up (nothing yet), then the
    owner translates it, caches it and leaves the in-flight memo, and only then does the second thread take the
    lock. It must be answered from what the owner left (the cache, or without a cache file the memo), not send the
    text again."""
    from palo.data.translate import TranslationCache, Translator

    cache = TranslationCache(str(tmp_path / "cache.sqlite") if cache_file else None)
    translator = Translator("fake-mt", api_key="k", base_url=server.base_url, cache=cache, backoff=0.01)
    real_lookup = translator._lookup
    looked, owner_done = threading.Event(), threading.Event()
    second = {}

    def lookup(masked, text, language):
        found = real_lookup(masked, text, language)
        if threading.current_thread().name == "second" and not looked.is_set():
            looked.set()
            assert owner_done.wait(10)  # the owner runs to its end here
        return found

    translator._lookup = lookup
    text = "The cat sleeps on the red table."
    worker = threading.Thread(target=lambda: second.update(result=translator.translate(text, "french")),
                              name="second")
    worker.start()
    assert looked.wait(10)
    first = translator.translate(text, "french")
    owner_done.set()
    worker.join(10)
    assert not first.cached and second["result"].cached
    assert second["result"].translation == first.translation == fake_translate(text, "french")
    assert [t for _, t, _, _ in server.calls] == [text]


def test_a_full_disk_under_the_progress_log_stops_the_run_in_one_line_and_keeps_what_finished(tmp_path, server,
                                                                                              capsys, monkeypatch):
    """A log write failing (ENOSPC) raised in the worker threads: "Exception in thread" tracebacks, then every
    unfinished sample blamed on requests that had not failed."""
    import errno

    from palo.jsonl import JsonlAppender

    real_write = JsonlAppender.write
    written = []

    def fills_up(self, record):
        if len(written) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(record["index"])
        return real_write(self, record)

    monkeypatch.setattr(JsonlAppender, "write", fills_up)
    data = _write(tmp_path / "in.json", SAMPLES)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(_translate_args(data, str(out), server, "fr", "--parallel", "2")) == 1
    captured = capsys.readouterr()
    log = out / "french.progress.jsonl"
    assert captured.err.splitlines() == [
        f"error: cannot write the progress log {log}: No space left on device; the run stopped, the samples "
        "finished are kept: rerun the same command with room to resume"]
    assert captured.out == ""
    assert sorted(json.loads(line)["index"] for line in log.read_text(encoding="utf-8").splitlines()) \
        == sorted(written)
    monkeypatch.setattr(JsonlAppender, "write", real_write)
    assert main(_translate_args(data, str(out), server, "fr")) == 0  # room again: resumes and finishes
    assert len(json.load(open(out / "french.json", encoding="utf-8"))) == len(SAMPLES)


def test_a_translation_cache_on_a_full_disk_is_one_line(tmp_path, server, capsys, monkeypatch):
    """The cache in the output folder on a full disk: a bare ``sqlite3.OperationalError: disk I/O error`` traceback
    when it is opened (here a file-size limit makes the same error), the run's defect handler when it is written."""
    import sqlite3

    from palo.data.translate import cache, runner

    data = _write(tmp_path / "in.json", SAMPLES[:3])
    out = tmp_path / "out"
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)); from palo.data.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", limited, *_translate_args(data, str(out), server, "fr")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: cannot write the translation cache {out / 'translation_cache.sqlite'}: disk I/O " \
                          "error\n"
    assert len(server.calls) == 0

    # Written mid-run: the disk is full, so SQLite's unclear error is put down to it.
    def full(*args):
        raise sqlite3.OperationalError("disk I/O error")

    real_put, real_free = cache.TranslationCache.put, runner.nearly_full
    monkeypatch.setattr(cache.TranslationCache, "put", full)
    monkeypatch.setattr(runner, "nearly_full", lambda path: 0)
    capsys.readouterr()
    assert main(_translate_args(data, str(out), server, "fr", "--parallel", "1")) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: cannot write the translation cache {out / 'translation_cache.sqlite'}: disk I/O error (the disk "
        "holding it is full: 0 KiB free); the run stopped, the samples finished are kept: rerun the same command "
        "with room to resume"]
    monkeypatch.setattr(cache.TranslationCache, "put", real_put)
    monkeypatch.setattr(runner, "nearly_full", real_free)
    assert main(_translate_args(data, str(out), server, "fr")) == 0  # room again: the same folder finishes
