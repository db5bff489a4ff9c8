"""Tests for palo.data.languages: sentences written for these tests in each PALO language, the ``<image>`` token,
mixed scripts, Urdu against Arabic, Spanish against French without accents, and scripts PALO does not serve."""

from __future__ import annotations

import unicodedata

import pytest

from palo.data.languages import LANGUAGES, OTHER, detect_language, sample_language
from palo.testing.corpus import SAMPLES

SENTENCES = {
    "english": [
        "A brown dog is sleeping on the porch next to a pair of boots.",
        "What color is the car parked in front of the building?",
        "There are two children playing with a kite at the beach.",
        "Describe the image in detail.",
    ],
    "chinese": [
        "一只棕色的狗正在门廊上睡觉，旁边有一双靴子。",
        "停在大楼前面的汽车是什么颜色的？",
        "两个孩子正在海滩上放风筝。",
        "详细描述这张图片。",
    ],
    "french": [
        "Un chien brun dort sur le porche à côté d'une paire de bottes.",
        "De quelle couleur est la voiture garée devant le bâtiment ?",
        "Deux enfants jouent avec un cerf-volant sur la plage.",
        "Décrivez l'image en détail.",
        "Le chat dort sur le lit.",  # no diacritics: the stopwords decide
        "Il y a deux chats sur le canapé.",
    ],
    "spanish": [
        "Un perro marrón duerme en el porche junto a un par de botas.",
        "¿De qué color es el coche aparcado frente al edificio?",
        "Dos niños juegan con una cometa en la playa.",
        "Describe la imagen con detalle.",
        "La mujer lleva un vestido rojo y un sombrero.",  # no diacritics
        "Hay un gato y un perro en la imagen.",
    ],
    "russian": [
        "Коричневая собака спит на крыльце рядом с парой сапог.",
        "Какого цвета машина, припаркованная перед зданием?",
        "Двое детей запускают воздушного змея на пляже.",
    ],
    "japanese": [
        "茶色の犬が玄関で寝ていて、隣にブーツが一足あります。",
        "建物の前に停まっている車は何色ですか？",
        "二人の子供が浜辺で凧をあげています。",
        "東京駅の写真です。",  # mostly Han, one syllable of Kana
        "コーヒーカップ",  # Katakana only
    ],
    "arabic": [
        "كلب بني ينام على الشرفة بجانب زوج من الأحذية.",
        "ما لون السيارة المتوقفة أمام المبنى؟",
        "طفلان يلعبان بطائرة ورقية على الشاطئ.",
        "صف الصورة بالتفصيل.",
    ],
    "hindi": [
        "एक भूरा कुत्ता जूतों की जोड़ी के पास बरामदे में सो रहा है।",
        "इमारत के सामने खड़ी कार किस रंग की है?",
        "दो बच्चे समुद्र तट पर पतंग उड़ा रहे हैं।",
    ],
    "bengali": [
        "একটি বাদামি কুকুর এক জোড়া বুটের পাশে বারান্দায় ঘুমাচ্ছে।",
        "ভবনের সামনে দাঁড়ানো গাড়িটি কী রঙের?",
        "দুটি শিশু সমুদ্র সৈকতে ঘুড়ি ওড়াচ্ছে।",
    ],
    "urdu": [
        "ایک بھورا کتا جوتوں کی جوڑی کے پاس برآمدے میں سو رہا ہے۔",
        "عمارت کے سامنے کھڑی گاڑی کس رنگ کی ہے؟",
        "دو بچے ساحل سمندر پر پتنگ اڑا رہے ہیں۔",
        "تصویر کی تفصیل بیان کریں",  # no Urdu full stop, no ے: ی and ک still decide
    ],
}


def test_sentences_cover_every_language():
    assert set(SENTENCES) == set(LANGUAGES)


@pytest.mark.parametrize(
    ("language", "sentence"), [(lang, s) for lang, sentences in SENTENCES.items() for s in sentences]
)
def test_one_sentence(language, sentence):
    assert detect_language(sentence) == language


@pytest.mark.parametrize("language", LANGUAGES)
def test_decomposed_text_is_read_as_composed(language):
    """NFD text (accents as combining marks, as some tools write it): French read as English before."""
    for sentence in SENTENCES[language]:
        assert detect_language(unicodedata.normalize("NFD", sentence)) == language


def test_decomposed_accents_still_decide():
    """Where the accents decide (no French stopword but "un"), NFD text was English."""
    assert detect_language(unicodedata.normalize("NFD", "Un garçon très âgé à côté.")) == "french"


@pytest.mark.parametrize("language", LANGUAGES)
def test_image_token_is_ignored(language):
    for sentence in SENTENCES[language]:
        assert detect_language("<image>\n" + sentence) == language
        assert detect_language(sentence + "\n<image>") == language
    # Short CJK text would lose to the five Latin letters of "image" if the token counted.
    assert detect_language("<image>\n这是什么？") == "chinese"


@pytest.mark.parametrize("language", LANGUAGES)
def test_test_corpus(language):
    """The sentences of palo.testing.corpus, written independently of these tests."""
    for sentence in SAMPLES[language]:
        assert detect_language(sentence) == language


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The script with most letters wins.
        ("<image>\nWhat is in this picture? 请用中文回答。", "english"),
        ("这张图片显示了一台 MacBook 笔记本电脑，放在木桌上。", "chinese"),
        ("यह एक laptop है जो मेज पर रखा हुआ है।", "hindi"),
        ("Привет! The dog is running across the green field.", "english"),
        ("На фото видна надпись STOP на красном дорожном знаке.", "russian"),
        ("تصویر میں ایک iPhone میز پر رکھا ہوا ہے۔", "urdu"),
        # Han with any Kana is Japanese.
        ("これは東京タワーの写真で、夜景がとても綺麗です。", "japanese"),
        # A multi-turn exchange: the longer Spanish answer outweighs the English question.
        ("What is this? Es un perro pequeño que está durmiendo en el sofá con una manta.", "spanish"),
        # Digits and punctuation of any script do not count.
        ("١٢٣ 123 ... ?!؟ ۔ — «»", OTHER),
    ],
)
def test_mixed_text(text, expected):
    assert detect_language(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t",
        "<image>",
        "<image>\n",
        "12345 + 678 = ?",
        "이 사진에는 무엇이 있나요?",  # Korean
        "ในภาพนี้มีอะไรบ้าง",  # Thai
        "Τι δείχνει αυτή η εικόνα;",  # Greek
        "מה יש בתמונה הזאת?",  # Hebrew
        "ಈ ಚಿತ್ರದಲ್ಲಿ ಏನಿದೆ?",  # Kannada
    ],
)
def test_other(text):
    assert detect_language(text) == OTHER


def test_urdu_against_arabic_letters():
    # The same words differ only in the letter forms: Arabic kaf/yeh/teh marbuta against Urdu keheh/farsi yeh.
    assert detect_language("كتاب كبير في المكتبة") == "arabic"
    assert detect_language("کتاب کبیر فی المکتبہ") == "urdu"
    # Urdu-only letters win over a stray Arabic form.
    assert detect_language("یہ ٹرین بہت تیز چلتی ہے، يعني") == "urdu"


def test_sample_language():
    sample = {
        "id": "1",
        "image": "coco/train2017/000000000001.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nاس تصویر میں کیا ہے؟"},
            {"from": "gpt", "value": "تصویر میں ایک سرخ بس پل پر کھڑی ہے۔"},
        ],
    }
    assert sample_language(sample) == "urdu"
    sample["conversations"] = [
        {"from": "human", "value": "<image>\n¿Qué hay en la imagen?"},
        {"from": "gpt", "value": "Hay un autobús rojo sobre un puente."},
    ]
    assert sample_language(sample) == "spanish"


def test_sample_language_without_text():
    assert sample_language({"id": "x"}) == OTHER
    assert sample_language({"conversations": []}) == OTHER
    assert sample_language({"conversations": [{"from": "human", "value": None}, "junk"]}) == OTHER


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("图片中有一个 iPhone 和一台 MacBook Pro 笔记本电脑。", "chinese"),
        ("この画像には、MacBook Pro と iPhone が写っています。", "japanese"),
        ("बोर्ड पर Central Park लिखा है।", "hindi"),
        ("বোর্ডে Central Park লেখা আছে।", "bengali"),
    ],
)
def test_latin_names_do_not_outweigh_cjk_or_indic_text(text, expected):
    """Han and Kana counted like one Latin letter each, and Devanagari/Bengali vowel signs not at all, so a product
    name or two in Latin letters made these sentences "english"."""
    assert detect_language(text) == expected


# Merged samples whose answer quotes a sign in English (an ordinary OCR-style LLaVA answer).
QUOTING_SAMPLES = {
    "hindi": ("बोर्ड पर क्या लिखा है?", 'बोर्ड पर "Welcome to Central Park New York" लिखा है।'),
    "bengali": ("বোর্ডে কী লেখা আছে?", 'বোর্ডে "Welcome to Central Park New York" লেখা আছে।'),
    "chinese": ("牌子上写着什么？", '牌子上写着 "Welcome to Central Park, New York"。'),
    "japanese": ("看板には何と書いてありますか？", "看板には「Welcome to Central Park, New York」と書いてあります。"),
    "urdu": ("بورڈ پر کیا لکھا ہے؟", 'بورڈ پر "Welcome to Central Park New York" لکھا ہے۔'),
    "russian": ("Что написано на табличке?", 'На табличке написано "Welcome to Central Park New York".'),
}


def _quoting_sample(language: str) -> dict:
    question, answer = QUOTING_SAMPLES[language]
    return {"id": language, "image": "a.jpg",
            "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}


@pytest.mark.parametrize("language", sorted(QUOTING_SAMPLES))
def test_a_quoted_english_sign_does_not_decide_the_language(language):
    """The quoted sign's Latin letters outnumbered the Hindi, Bengali, Chinese and Japanese around it: validate,
    stats and the trainer's metadata counted these samples as English."""
    assert sample_language(_quoting_sample(language)) == language


@pytest.mark.parametrize("language", LANGUAGES)
def test_sample_language_takes_the_label_merge_writes(language):
    """merge labels every translated sample ("language": "hindi"), but the label was ignored and the text guessed
    at instead."""
    sample = {"language": language, "conversations": [{"from": "human", "value": "<image>\nWhat is on the sign?"},
                                                      {"from": "gpt", "value": '"Welcome to Central Park"'}]}
    assert sample_language(sample) == language
    # A label that is not a PALO language (a typo, another tool's value) is not trusted: the text decides.
    assert sample_language({**sample, "language": "klingon"}) == "english"
    assert sample_language({**sample, "language": ["hindi"]}) == "english"


def test_an_english_text_quoting_latin_text_is_still_decided_by_all_of_it():
    """Quotations are only set aside for Latin text inside another PALO script; Latin-only text is unchanged."""
    assert detect_language('What is in this picture? 请用中文回答。') == "english"
    assert detect_language('The sign says "Stop" in big letters on a red background.') == "english"
