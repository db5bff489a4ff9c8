"""A small multilingual text corpus, written for this project, for training test tokenizers.

Ten sentences or so per PALO language about images, shapes and colours, plus the conversation-template words, so a
SentencePiece model trained on it covers every script PALO serves (Latin, Han, Kana, Cyrillic, Arabic, Devanagari,
Bengali, Urdu's Nastaliq forms).
"""

SAMPLES: dict[str, list[str]] = {
    "english": [
        "What is shown in this image?",
        "The picture shows a red circle next to a blue square.",
        "How many triangles are there? There are three green triangles.",
        "Describe the scene in detail, please.",
        "A man is ironing clothes on the back of a yellow taxi.",
        "The lake is calm and a wooden pier leads to the water.",
        "Which colour is the largest shape? The largest shape is purple.",
        "Is there anything unusual about this photo?",
    ],
    "chinese": [
        "这张图片里有什么？",
        "图片中有一个红色的圆形和一个蓝色的正方形。",
        "有几个三角形？有三个绿色的三角形。",
        "请详细描述这个场景。",
        "一个男人在黄色出租车的后面熨衣服。",
        "湖面很平静，一座木制码头通向水中。",
        "最大的形状是什么颜色？最大的形状是紫色的。",
    ],
    "french": [
        "Qu'est-ce qui est montré dans cette image ?",
        "L'image montre un cercle rouge à côté d'un carré bleu.",
        "Combien y a-t-il de triangles ? Il y a trois triangles verts.",
        "Décrivez la scène en détail, s'il vous plaît.",
        "Un homme repasse des vêtements à l'arrière d'un taxi jaune.",
        "Le lac est calme et une jetée en bois mène à l'eau.",
    ],
    "spanish": [
        "¿Qué se muestra en esta imagen?",
        "La imagen muestra un círculo rojo junto a un cuadrado azul.",
        "¿Cuántos triángulos hay? Hay tres triángulos verdes.",
        "Describe la escena con detalle, por favor.",
        "Un hombre plancha ropa en la parte trasera de un taxi amarillo.",
        "El lago está en calma y un muelle de madera llega hasta el agua.",
    ],
    "russian": [
        "Что изображено на этой картинке?",
        "На изображении красный круг рядом с синим квадратом.",
        "Сколько здесь треугольников? Здесь три зелёных треугольника.",
        "Опишите сцену подробно, пожалуйста.",
        "Мужчина гладит одежду на заднем сиденье жёлтого такси.",
        "Озеро спокойное, и деревянный причал ведёт к воде.",
    ],
    "japanese": [
        "この画像には何が写っていますか？",
        "画像には青い四角の隣に赤い丸があります。",
        "三角形はいくつありますか？緑の三角形が三つあります。",
        "場面を詳しく説明してください。",
        "男性が黄色いタクシーの後ろでアイロンをかけています。",
        "湖は静かで、木の桟橋が水へと続いています。",
    ],
    "arabic": [
        "ما الذي يظهر في هذه الصورة؟",
        "تُظهر الصورة دائرة حمراء بجانب مربع أزرق.",
        "كم عدد المثلثات؟ هناك ثلاثة مثلثات خضراء.",
        "صف المشهد بالتفصيل من فضلك.",
        "رجل يكوي الملابس على ظهر سيارة أجرة صفراء.",
        "البحيرة هادئة ورصيف خشبي يمتد إلى الماء.",
    ],
    "hindi": [
        "इस चित्र में क्या दिखाया गया है?",
        "चित्र में एक नीले वर्ग के पास एक लाल वृत्त है।",
        "कितने त्रिभुज हैं? तीन हरे त्रिभुज हैं।",
        "कृपया दृश्य का विस्तार से वर्णन करें।",
        "एक आदमी पीली टैक्सी के पीछे कपड़े इस्त्री कर रहा है।",
        "झील शांत है और लकड़ी का घाट पानी तक जाता है।",
    ],
    "bengali": [
        "এই ছবিতে কী দেখানো হয়েছে?",
        "ছবিতে একটি নীল বর্গের পাশে একটি লাল বৃত্ত আছে।",
        "কয়টি ত্রিভুজ আছে? তিনটি সবুজ ত্রিভুজ আছে।",
        "অনুগ্রহ করে দৃশ্যটি বিস্তারিতভাবে বর্ণনা করুন।",
        "একজন লোক একটি হলুদ ট্যাক্সির পেছনে কাপড় ইস্ত্রি করছে।",
        "হ্রদটি শান্ত এবং একটি কাঠের ঘাট জলের দিকে গেছে।",
    ],
    "urdu": [
        "اس تصویر میں کیا دکھایا گیا ہے؟",
        "تصویر میں ایک نیلے مربع کے ساتھ ایک سرخ دائرہ ہے۔",
        "کتنے مثلث ہیں؟ تین سبز مثلث ہیں۔",
        "براہ کرم منظر کو تفصیل سے بیان کریں۔",
        "ایک آدمی پیلی ٹیکسی کے پیچھے کپڑے استری کر رہا ہے۔",
        "جھیل پرسکون ہے اور لکڑی کا گھاٹ پانی تک جاتا ہے۔",
    ],
}

# Words of the conversation templates, so prompts tokenize into a few pieces rather than single characters.
TEMPLATE_TEXT = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: Human: Assistant: ### [INST] [/INST] <<SYS>> <</SYS>>",
    "You are a helpful language and vision assistant.",
]


def all_text() -> list[str]:
    """Every sentence of the corpus, all languages and the template words."""
    lines = list(TEMPLATE_TEXT)
    for sentences in SAMPLES.values():
        lines.extend(sentences)
    return lines
