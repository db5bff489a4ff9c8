"""Tests for palo.conversation: template texts and prompt rendering against strings written out by hand
from docs/formats.md (§3.3-3.5), plus the web-demo helpers (images, chat display, logging state)."""

import base64
import json
from io import BytesIO

import pytest
from PIL import Image

from palo import conversation
from palo.conversation import (
    Conversation,
    SeparatorStyle,
    conv_mode_for_checkpoint,
    conv_templates,
    default_conversation,
    infer_conv_mode,
    stop_string,
)

# System prompts typed out from docs/formats.md §3.3, independently of the module's constants.
SYS_V0 = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
SYS_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
SYS_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question "
    "does not make any sense, or is not factually coherent, explain why instead of answering something not "
    "correct. If you don't know the answer to a question, please don't share false information."
)
SYS_MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural "
    "language.The visual content will be provided with the following format: <Image>visual content</Image>."
)
SYS_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
SYS_MPT = (
    "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
    "helpful and honest answers."
)
SYS_CHATML = "<|im_start|>system\nAnswer the questions."

# A two-round multilingual chat: English question with an image, Arabic follow-up, answer pending.
Q1 = "<image>\nWhat is unusual about this image?"
A1 = "A man is ironing clothes on an ironing board attached to the back of a moving taxi."
Q2 = "ما لون سيارة الأجرة؟"


def render(key, turns):
    conv = conv_templates[key].copy()
    for i, text in enumerate(turns):
        conv.append_message(conv.roles[i % 2], text)
    return conv.get_prompt()


def _v0_examples():
    # The pre-filled exchange is free text; take it from the template and check its shape separately.
    (_, question), (_, answer) = conv_templates["v0"].messages
    return question, answer


def _expected_two_rounds(key):
    single = "###Human: " + Q1 + "###Assistant: " + A1 + "###Human: " + Q2 + "###Assistant:"
    two = " USER: " + Q1 + " ASSISTANT: " + A1 + "</s>USER: " + Q2 + " ASSISTANT:"
    mpt = (
        "<|im_end|><|im_start|>user\n" + Q1 + "<|im_end|><|im_start|>assistant\n" + A1
        + "<|im_end|><|im_start|>user\n" + Q2 + "<|im_end|><|im_start|>assistant\n"
    )
    llama = "\n<</SYS>>\n\n" + Q1 + " [/INST] " + A1 + " </s><s>[INST] " + Q2 + " [/INST]"
    if key in ("default", "v0"):
        question, answer = _v0_examples()
        return SYS_V0 + "###Human: " + question + "###Assistant: " + answer + single
    return {
        "v1": SYS_V1 + two,
        "vicuna_v1": SYS_V1 + two,
        "llava_v1": SYS_V0 + two,
        "v1_mmtag": SYS_MMTAG + two,
        "llava_v0": SYS_V0 + single,
        "v0_mmtag": SYS_MMTAG + single,
        "llama_2": "[INST] <<SYS>>\n" + SYS_LLAMA_2 + llama,
        "llava_llama_2": "[INST] <<SYS>>\n" + SYS_LLAVA_LLAMA_2 + llama,
        "mistral_instruct": "[INST] " + Q1 + " [/INST] " + A1 + " </s>[INST] " + Q2 + " [/INST]",
        "plain": Q1 + "\n" + A1 + "\n" + Q2 + "\n",
        "v0_plain": Q1 + "\n" + A1 + "\n" + Q2 + "\n",
        "mpt": SYS_MPT + mpt,
        "chatml_direct": SYS_CHATML + mpt,
        "mistral_direct": SYS_CHATML + mpt,
    }[key]


ALL_KEYS = [
    "default", "v0", "v1", "vicuna_v1", "llama_2", "mistral_instruct", "chatml_direct", "mistral_direct",
    "plain", "v0_plain", "llava_v0", "v0_mmtag", "llava_v1", "v1_mmtag", "llava_llama_2", "mpt",
]


# ----------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------


def test_template_keys_are_exactly_the_original_ones():
    assert sorted(conv_templates) == sorted(ALL_KEYS)


@pytest.mark.parametrize(
    "key, system, roles, style, sep, sep2, version, offset",
    [
        ("v0", SYS_V0, ("Human", "Assistant"), SeparatorStyle.SINGLE, "###", None, "Unknown", 2),
        ("v1", SYS_V1, ("USER", "ASSISTANT"), SeparatorStyle.TWO, " ", "</s>", "v1", 0),
        ("llama_2", SYS_LLAMA_2, ("USER", "ASSISTANT"), SeparatorStyle.LLAMA_2, "<s>", "</s>", "llama_v2", 0),
        ("plain", "", ("", ""), SeparatorStyle.PLAIN, "\n", None, "Unknown", 0),
        ("llava_v0", SYS_V0, ("Human", "Assistant"), SeparatorStyle.SINGLE, "###", None, "Unknown", 0),
        ("v0_mmtag", SYS_MMTAG, ("Human", "Assistant"), SeparatorStyle.SINGLE, "###", None, "v0_mmtag", 0),
        ("llava_v1", SYS_V0, ("USER", "ASSISTANT"), SeparatorStyle.TWO, " ", "</s>", "v1", 0),
        ("v1_mmtag", SYS_MMTAG, ("USER", "ASSISTANT"), SeparatorStyle.TWO, " ", "</s>", "v1_mmtag", 0),
        ("llava_llama_2", SYS_LLAVA_LLAMA_2, ("USER", "ASSISTANT"), SeparatorStyle.LLAMA_2,
         "<s>", "</s>", "llama_v2", 0),
        ("mpt", SYS_MPT, ("<|im_start|>user\n", "<|im_start|>assistant\n"), SeparatorStyle.MPT,
         "<|im_end|>", None, "mpt", 0),
        ("mistral_instruct", "", ("USER", "ASSISTANT"), SeparatorStyle.LLAMA_2, "", "</s>", "llama_v2", 0),
        ("chatml_direct", SYS_CHATML, ("<|im_start|>user\n", "<|im_start|>assistant\n"), SeparatorStyle.MPT,
         "<|im_end|>", None, "mpt", 0),
    ],
)
def test_template_fields(key, system, roles, style, sep, sep2, version, offset):
    conv = conv_templates[key]
    assert (conv.system, conv.roles, conv.sep_style, conv.sep, conv.sep2, conv.version, conv.offset) == (
        system, roles, style, sep, sep2, version, offset,
    )
    assert len(conv.messages) == offset


def test_system_prompt_traps():
    assert "being safe.  Your" in conv_templates["llama_2"].system
    assert "language.The visual" in conv_templates["v1_mmtag"].system
    assert "curious user" in conv_templates["vicuna_v1"].system
    assert "curious human" in conv_templates["llava_v1"].system


def test_aliases_and_default():
    assert conv_templates["default"] is conv_templates["v0"]
    assert conv_templates["v1"] is conv_templates["vicuna_v1"]
    assert conv_templates["plain"] is conv_templates["v0_plain"]
    assert conv_templates["mistral_direct"] is conv_templates["chatml_direct"]
    assert default_conversation is conv_templates["vicuna_v1"]


def test_v0_example_exchange():
    question, answer = _v0_examples()
    assert [role for role, _ in conv_templates["v0"].messages] == ["Human", "Assistant"]
    assert "renewable" in question and "non-renewable" in question
    for n in range(1, 8):
        assert f"\n{n}. " in answer
    assert "\n8. " not in answer


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ALL_KEYS)
def test_two_round_multilingual_prompt(key):
    assert render(key, [Q1, A1, Q2, None]) == _expected_two_rounds(key)


def test_reference_example_two():
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    )
    assert render("vicuna_v1", ["<image>\nQ1", "A1", "Q2", None]) == expected


def test_reference_example_single():
    expected = SYS_V0 + "###Human: <image>\nQ1###Assistant: A1###Human: Q2###Assistant:"
    assert render("llava_v0", ["<image>\nQ1", "A1", "Q2", None]) == expected


def test_reference_example_mpt():
    expected = (
        SYS_MPT + "<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
    )
    assert render("mpt", ["<image>\nQ1", "A1", "Q2", None]) == expected


def test_reference_example_llama_2():
    expected = "[INST] <<SYS>>\n" + SYS_LLAMA_2 + "\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
    assert render("llama_2", ["<image>\nQ1", "A1", "Q2", None]) == expected


def test_fully_answered_chinese_rounds_end_with_sep2():
    q2, a2 = "图片里的出租车是什么颜色？", "出租车是黄色的。"
    expected = SYS_V1 + " USER: " + Q1 + " ASSISTANT: " + A1 + "</s>USER: " + q2 + " ASSISTANT: " + a2 + "</s>"
    assert render("vicuna_v1", [Q1, A1, q2, a2]) == expected
    expected_llama = (
        "[INST] <<SYS>>\n" + SYS_LLAMA_2 + "\n<</SYS>>\n\n" + Q1 + " [/INST] " + A1 + " </s><s>[INST] " + q2
        + " [/INST] " + a2 + " </s>"
    )
    assert render("llama_2", [Q1, A1, q2, a2]) == expected_llama


def test_open_first_turn():
    assert render("vicuna_v1", [Q1, None]) == SYS_V1 + " USER: " + Q1 + " ASSISTANT:"
    assert render("llava_v0", [Q1, None]) == SYS_V0 + "###Human: " + Q1 + "###Assistant:"
    assert (render("mpt", [Q1, None])
            == SYS_MPT + "<|im_end|><|im_start|>user\n" + Q1 + "<|im_end|><|im_start|>assistant\n")
    assert render("plain", [Q1, None]) == Q1 + "\n"


def test_llama_2_requires_a_user_first_message():
    conv = conv_templates["llama_2"].copy()
    conv.append_message("ASSISTANT", "hi")
    with pytest.raises(ValueError):
        conv.get_prompt()
    conv = conv_templates["llama_2"].copy()
    conv.append_message("USER", None)
    with pytest.raises(ValueError):
        conv.get_prompt()


# ----------------------------------------------------------------------------------------------------
# Demo image tuples
# ----------------------------------------------------------------------------------------------------


def _image(size=(40, 20), color=(255, 0, 0)):
    return Image.new("RGB", size, color)


def _demo_conv(key, text, mode="Default", image=None):
    conv = conv_templates[key].copy()
    conv.append_message(conv.roles[0], (text, image or _image(), mode))
    conv.append_message(conv.roles[1], None)
    return conv


@pytest.mark.parametrize(
    "text, moved",
    [
        ("<image>\nWhat is this?", "<image>\nWhat is this?"),
        ("What is <image> this?", "<image>\nWhat is  this?"),  # Only the token goes; inner spaces stay.
        ("¿Qué tiene de extraño esta imagen?\n<image>", "<image>\n¿Qué tiene de extraño esta imagen?"),
        ("<image> इस फ्रिज में <image>", "<image>\nइस फ्रिज में"),
    ],
)
def test_demo_tuple_moves_image_to_front(text, moved):
    assert _demo_conv("vicuna_v1", text).get_prompt() == SYS_V1 + " USER: " + moved + " ASSISTANT:"
    assert _demo_conv("llava_v0", text).get_prompt() == SYS_V0 + "###Human: " + moved + "###Assistant:"
    assert _demo_conv("llama_2", text).get_prompt() == (
        "[INST] <<SYS>>\n" + SYS_LLAMA_2 + "\n<</SYS>>\n\n" + moved + " [/INST]"
    )
    assert _demo_conv("mpt", text).get_prompt() == (
        SYS_MPT + "<|im_end|><|im_start|>user\n" + moved + "<|im_end|><|im_start|>assistant\n"
    )


def test_demo_tuple_mmtag_adds_image_exchange():
    text = "What is this?\n<image>"
    assert _demo_conv("v1_mmtag", text).get_prompt() == (
        SYS_MMTAG + " USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What is this? ASSISTANT:"
    )
    assert _demo_conv("v0_mmtag", text).get_prompt() == (
        SYS_MMTAG + "###Human: <Image><image></Image>###Assistant: Received.###Human: What is this?###Assistant:"
    )


def test_demo_tuple_does_not_change_state():
    conv = _demo_conv("vicuna_v1", "What is <image> this?")
    before = [list(m) for m in conv.messages]
    conv.get_prompt()
    assert conv.messages == before
    assert isinstance(conv.messages[0][1], tuple)


def test_demo_tuple_after_the_first_turn_keeps_its_text():
    conv = _demo_conv("vicuna_v1", "<image>\nQ1")
    conv.messages[-1][-1] = "A1"
    conv.append_message("USER", ("Q2 <image>", _image(), "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == SYS_V1 + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 <image> ASSISTANT:"


# ----------------------------------------------------------------------------------------------------
# copy(), dict(), to_gradio_chatbot()
# ----------------------------------------------------------------------------------------------------


def test_copy_is_independent():
    template = conv_templates["vicuna_v1"]
    conv = template.copy()
    conv.append_message("USER", Q1)
    conv.append_message("ASSISTANT", None)
    assert template.messages == []

    other = conv.copy()
    other.messages[-1][-1] = "partial answer"
    other.append_message("USER", Q2)
    other.system = "changed"
    assert conv.messages == [["USER", Q1], ["ASSISTANT", None]]
    assert conv.system == SYS_V1

    v0 = conv_templates["v0"].copy()
    v0.messages[0][1] = "changed"
    assert conv_templates["v0"].messages[0][1] != "changed"


def test_dict_is_json_serialisable_and_drops_images():
    conv = _demo_conv("vicuna_v1", "What is this?\n<image>")
    conv.messages[-1][-1] = "A cat."
    state = conv.dict()
    assert set(state) == {"system", "roles", "messages", "offset", "sep", "sep2"}
    decoded = json.loads(json.dumps(state, ensure_ascii=False))
    assert decoded == {
        "system": SYS_V1,
        "roles": ["USER", "ASSISTANT"],
        "messages": [["USER", "What is this?\n<image>"], ["ASSISTANT", "A cat."]],
        "offset": 0,
        "sep": " ",
        "sep2": "</s>",
    }


def test_to_gradio_chatbot_messages_format():
    conv = _demo_conv("vicuna_v1", "What is this?\n<image>")
    conv.messages[-1][-1] = "A red rectangle."
    conv.append_message("USER", Q2)
    conv.append_message("ASSISTANT", None)
    chat = conv.to_gradio_chatbot()
    assert [m["role"] for m in chat] == ["user", "assistant", "user"]
    prefix, suffix = '<img src="data:image/png;base64,', '" alt="user upload image" />What is this?'
    first = chat[0]["content"]
    assert first.startswith(prefix) and first.endswith(suffix)
    shown = Image.open(BytesIO(base64.b64decode(first[len(prefix) : -len(suffix)])))
    assert shown.format == "PNG" and shown.size == (40, 20)
    assert chat[1:] == [{"role": "assistant", "content": "A red rectangle."}, {"role": "user", "content": Q2}]


def test_to_gradio_chatbot_hides_template_examples():
    conv = conv_templates["v0"].copy()
    assert conv.to_gradio_chatbot() == []
    conv.append_message("Human", "Hello")
    assert conv.to_gradio_chatbot() == [{"role": "user", "content": "Hello"}]


# ----------------------------------------------------------------------------------------------------
# get_images()
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, band", [((40, 20), "rows"), ((20, 40), "cols")])
def test_get_images_pad_geometry(size, band):
    conv = _demo_conv("vicuna_v1", "<image>\nQ", mode="Pad", image=_image(size))
    (padded,) = conv.get_images(return_pil=True)
    assert padded.size == (40, 40)
    background, red = (122, 116, 104), (255, 0, 0)
    for k in range(40):
        for edge in (0, 9, 30, 39):
            xy = (k, edge) if band == "rows" else (edge, k)
            assert padded.getpixel(xy) == background
        for inner in (10, 20, 29):
            xy = (k, inner) if band == "rows" else (inner, k)
            assert padded.getpixel(xy) == red


def test_get_images_base64_png():
    conv = _demo_conv("vicuna_v1", "<image>\nQ", mode="Pad")
    (b64,) = conv.get_images()
    decoded = Image.open(BytesIO(base64.b64decode(b64)))
    assert decoded.format == "PNG" and decoded.size == (40, 40)
    assert decoded.convert("RGB").getpixel((0, 0)) == (122, 116, 104)


@pytest.mark.parametrize(
    "size, mode, expected",
    [
        ((40, 20), "Default", (40, 20)),  # Small images are never upscaled.
        ((40, 20), "Crop", (40, 20)),
        ((40, 20), "Resize", (336, 336)),
        ((1000, 1000), "Default", (400, 400)),  # Shortest side capped at 400.
        ((1600, 400), "Default", (800, 200)),  # Longest side capped at 800.
        ((300, 1200), "Default", (200, 800)),  # Same for portrait.
        ((1200, 900), "Default", (533, 400)),  # 400 * 4/3 = 533.3, truncated.
        ((1000, 500), "Pad", (400, 400)),
    ],
)
def test_get_images_sizes(size, mode, expected):
    conv = _demo_conv("vicuna_v1", "<image>\nQ", mode=mode, image=_image(size))
    (image,) = conv.get_images(return_pil=True)
    assert image.size == expected


def test_the_demos_pad_of_a_sliver_stays_within_the_pixel_limit(monkeypatch):
    padded, expand2square = [], conversation.expand2square

    def expand(image, background):
        padded.append(image.size)
        return expand2square(image, background)

    monkeypatch.setattr(conversation, "expand2square", expand)
    conv = _demo_conv("vicuna_v1", "<image>\nQ", mode="Pad", image=Image.new("RGB", (1, 9000), (255, 0, 0)))
    (image,) = conv.get_images(return_pil=True)
    assert padded == [(1, 8000)]  # the 9000x9000 square (243 MB) is never made
    assert image.size == (400, 400)


def test_get_images_only_user_tuples_and_bad_mode():
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message("USER", Q1)
    conv.append_message("ASSISTANT", None)
    assert conv.get_images() == []
    with pytest.raises(ValueError):
        _demo_conv("vicuna_v1", "<image>\nQ", mode="Stretch").get_images()


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, stop",
    [("vicuna_v1", "</s>"), ("llava_v1", "</s>"), ("llava_v0", "###"), ("mpt", "<|im_end|>"), ("llama_2", "<s>"),
     ("plain", "\n")],
)
def test_stop_string(key, stop):
    assert stop_string(conv_templates[key]) == stop


@pytest.mark.parametrize(
    "name, mode",
    [
        ("PALO-7B", "vicuna_v1"),
        ("MBZUAI/MobilePALO-1.7B", "vicuna_v1"),
        ("palo-13b-lora", "vicuna_v1"),
        ("MobileVLM-1.7B", "v1"),
        ("llava-v1.5-13b", "llava_v1"),
        ("llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
        ("llava-v1.6-mistral-7b", "mistral_instruct"),
        ("llava-v1.6-34b", "chatml_direct"),
        ("LLaVA-Lightning-MPT-7B-preview", "mpt"),
        ("LLaVA-13b-delta-v0", "llava_v0"),
    ],
)
def test_infer_conv_mode(name, mode):
    assert infer_conv_mode(name) == mode
    assert mode in conv_templates


@pytest.mark.parametrize("model_type, mode", [
    ("palo", "vicuna_v1"), ("mobilevlm", "vicuna_v1"), ("llama", "vicuna_v1"),
    ("llava_llama", "llava_v1"), ("llava", "llava_v1"),
])
@pytest.mark.parametrize("folder", ["", "my-finetune", "my-mpt-finetune", "llama-2-ft", "mistral-run", "PALO-7B",
                                    "llava-v1.6-34b", "LLaVA-13b-delta-v0"])
def test_a_checkpoints_template_comes_from_its_config_whatever_its_folder_is_called(model_type, mode, folder):
    """The same LLaVA-1.5 checkpoint got mpt, llava_llama_2 or mistral_instruct prompts (and a plain LLaMA
    llava_v0) depending only on the name of the folder it was copied into."""
    config = type("Config", (), {"model_type": model_type})()
    assert conv_mode_for_checkpoint(config, folder) == mode


def test_conversation_constructor_accepts_tuples():
    conv = Conversation(system="s", roles=["A", "B"], messages=(("A", "x"),), offset=0, sep_style=SeparatorStyle.TWO,
                        sep=" ", sep2="</s>")
    conv.messages[0][1] = "y"
    assert conv.roles == ("A", "B")
    assert conv.get_prompt() == "s A: y "


def test_the_chat_view_encodes_each_image_once(monkeypatch):
    """A streamed answer redraws the chat per piece; a photo's preview was encoded again each time."""
    import palo.conversation as conversation

    calls = []
    encode = conversation.encode_image_base64
    monkeypatch.setattr(conversation, "encode_image_base64", lambda image: calls.append(1) or encode(image))
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], ("hi\n<image>", Image.new("RGB", (900, 600), "red"), "Default"))
    conv.append_message(conv.roles[1], "a")
    views = [conv.to_gradio_chatbot() for _ in range(5)]
    assert len(calls) == 1 and all(view == views[0] for view in views)
    conv.append_message(conv.roles[0], ("and?\n<image>", Image.new("RGB", (900, 600), "blue"), "Default"))
    conv.append_message(conv.roles[1], None)
    view = conv.to_gradio_chatbot()
    assert len(calls) == 2 and view[0] == views[0][0] and view[2]["content"] != view[0]["content"]
