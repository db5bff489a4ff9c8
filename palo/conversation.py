"""Conversation templates and prompt rendering, compatible with the original PALO/LLaVA prompts.

A :class:`Conversation` holds a system prompt, two role names and a list of ``[role, message]`` turns,
and renders them into the single prompt string the language model was trained on. The rendering rules
(one per :class:`SeparatorStyle`) and the template texts in :data:`conv_templates` are part of the
trained model's input format: a single changed space shifts the tokenisation and degrades answers, so
they are reproduced character for character from the original code.

Messages are usually strings. The web demo also stores the first live user message as a tuple
``(text, PIL.Image.Image, process_mode)`` so that the image travels with the conversation state;
:meth:`Conversation.get_prompt` reduces it to text with the ``<image>`` placeholder moved to the front,
and :meth:`Conversation.get_images` turns the attached images into what the model worker expects.

A message of ``None`` (normally the last, assistant, turn) means "the model answers here": the prompt
ends with an open assistant turn.

Templates are module-level singletons; always call :meth:`Conversation.copy` before appending messages.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import weakref
from io import BytesIO
from typing import Any

from PIL import Image

from palo.constants import DEFAULT_IMAGE_TOKEN
from palo.image_io import fit_square_canvas

# A text turn, a demo image turn (text, image, process mode), or None for "generate here".
Message = str | tuple[str, Image.Image, str] | None
# A piece of the rendered prompt and whether the model is trained to produce it (see get_prompt_segments).
Segment = tuple[str, bool]

# Values of the demo's (hidden) "Preprocess for non-square image" radio.
IMAGE_PROCESS_MODES = ("Crop", "Resize", "Pad", "Default")

# Background for "Pad": the CLIP image mean (0.4815, 0.4578, 0.4082) scaled to 0..255, so the padded
# band looks like "no signal" to the vision tower after normalisation.
PAD_BACKGROUND = (122, 116, 104)
# "Resize" squashes to the CLIP ViT-L/14-336 input size.
RESIZE_SIZE = (336, 336)
# The demo caps what it ships to the worker: longest side <= 800 px and shortest side <= 400 px.
MAX_LONG_EDGE = 800
MAX_SHORT_EDGE = 400

# The mmtag convention: the image goes in its own first exchange, acknowledged by the assistant.
MMTAG_IMAGE_TURN = "<Image><image></Image>"
MMTAG_IMAGE_REPLY = "Received."
# ChatML's system turn tag: MPT-style system prompts carry it, and a system message given in a chat gets it.
MPT_SYSTEM_PREFIX = "<|im_start|>system\n"


class SeparatorStyle(enum.Enum):
    """How turns are joined into one prompt string (see :meth:`Conversation.get_prompt`)."""

    SINGLE = enum.auto()  # "Role: text###" for every turn (vicuna v0).
    TWO = enum.auto()  # "Role: text" + sep after user turns, + sep2 after assistant turns (vicuna v1).
    MPT = enum.auto()  # ChatML: role tag + text + "<|im_end|>".
    PLAIN = enum.auto()  # Bare texts, no roles (stage-1 pre-training).
    LLAMA_2 = enum.auto()  # "[INST] ... [/INST] answer </s>" with a <<SYS>> block in the first turn.


@dataclasses.dataclass
class Conversation:
    """A chat history plus the template that renders it into a prompt.

    Attributes:
        system: System prompt, rendered before the first turn.
        roles: (user role, assistant role) names as they appear in the prompt.
        messages: ``[role, message]`` pairs. Lists rather than tuples because the web server edits the
            last answer in place while streaming (``conv.messages[-1][-1] = partial_text``).
        offset: Number of leading pre-filled example messages that are part of the template, not of the
            live chat; they are rendered but hidden from the chat display and image extraction.
        sep_style: The rendering rule.
        sep: First separator (its meaning depends on ``sep_style``).
        sep2: Second separator, or None for styles that use only one.
        version: Template version; a version containing ``"mmtag"`` switches on the mmtag image turn.
        skip_next: Set by the web server when a turn was rejected, so the bot does not answer it.
    """

    system: str
    roles: tuple[str, str]
    messages: list[list[Any]]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    def __post_init__(self) -> None:
        # Templates are declared with tuples for readability; normalise so every instance can be edited
        # in place the same way.
        self.roles = tuple(self.roles)
        self.messages = [list(m) for m in self.messages]

    # ------------------------------------------------------------------------------------------------
    # Prompt rendering
    # ------------------------------------------------------------------------------------------------

    def get_prompt(self) -> str:
        """Renders the conversation into the model's prompt string.

        The demo image tuple (first live user turn) is first reduced to text: every ``<image>`` is
        removed, the text stripped and ``<image>\\n`` put in front; with an ``mmtag`` version the image
        goes into an extra first exchange (``<Image><image></Image>`` / ``Received.``) instead. Any other
        tuple message contributes its text unchanged.

        Returns:
            The prompt: the concatenation of :meth:`get_prompt_segments`. If the last message is None it
            ends with an open assistant turn.

        Raises:
            ValueError: For LLAMA_2 when the first message is missing or not from the user.
        """
        return "".join(text for text, _ in self.get_prompt_segments())

    def get_prompt_segments(self) -> list[Segment]:
        """Renders the prompt as consecutive ``(text, supervised)`` pieces.

        This is the one rendering of the conversation: :meth:`get_prompt` joins these texts, and training
        derives its label mask from the flags. A piece is supervised when it is what the model must
        produce: an assistant answer together with the end separator that follows it, exactly as rendered
        (TWO: ``answer</s>``; LLAMA_2: ``answer </s>``; SINGLE: ``answer###``; MPT: ``answer<|im_end|>``;
        PLAIN: ``caption\\n``). The system prompt, user turns, role tags, the space after a role tag and
        any image placeholder are not. An open (None or empty) assistant turn has no supervised piece.

        Turn ``i`` counts as the assistant's when ``i`` is odd: turns alternate, user first, the same rule
        the TWO separators follow.

        Returns:
            ``[(text, supervised), ...]`` with no empty texts and no two neighbours sharing a flag.

        Raises:
            ValueError: For LLAMA_2 when the first message is missing or not from the user.
        """
        messages = self._messages_for_prompt()
        renderer = _RENDERERS[self.sep_style]
        return renderer(self, messages)

    def _messages_for_prompt(self) -> list[tuple[str, str | None]]:
        """Applies the demo image rule and reduces all messages to (role, text or None)."""
        messages: list[tuple[str, str | None]] = [(role, _message_text(msg)) for role, msg in self.messages]
        # The demo rule targets the first live user turn. For every template but v0/default (offset 2,
        # never used with images) that is message 0, exactly where the original code looks.
        first = self.offset
        if first < len(self.messages) and isinstance(self.messages[first][1], tuple):
            role, text = messages[first]
            bare = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            if "mmtag" in self.version:
                messages[first] = (role, bare)
                messages[first:first] = [(self.roles[0], MMTAG_IMAGE_TURN), (self.roles[1], MMTAG_IMAGE_REPLY)]
            else:
                messages[first] = (role, DEFAULT_IMAGE_TOKEN + "\n" + bare)
        return messages

    def append_message(self, role: str, message: Message) -> None:
        """Appends one turn.

        Args:
            role: One of ``self.roles``.
            message: The text, a demo image tuple ``(text, image, process_mode)``, or None to leave the
                turn open for the model.
        """
        self.messages.append([role, message])

    # ------------------------------------------------------------------------------------------------
    # Images (web demo)
    # ------------------------------------------------------------------------------------------------

    def get_images(self, return_pil: bool = False) -> list[Image.Image] | list[str]:
        """Collects the images attached to live user turns, prepared for the model worker.

        Each image is first processed by its turn's mode: ``"Pad"`` expands it to a square on the
        :data:`PAD_BACKGROUND` colour (centred), ``"Resize"`` squashes it to 336x336, and ``"Crop"`` and
        ``"Default"`` leave it as is (the worker's own preprocessing does the rest). It is then
        downscaled, keeping the aspect ratio, so the longest side is at most 800 px and the shortest at
        most 400 px.

        Args:
            return_pil: Return PIL images instead of base64-encoded PNG strings.

        Returns:
            One entry per image, in conversation order: PIL images, or base64 PNG strings as sent in
            the worker request's ``"images"`` list.

        Raises:
            ValueError: For an unknown process mode.
        """
        images: list[Any] = []
        for _, msg in self._live_user_turns():
            if not isinstance(msg, tuple):
                continue
            _, image, mode = msg
            image = _downscale(process_image(image, mode))
            images.append(image if return_pil else encode_image_base64(image))
        return images

    def to_gradio_chatbot(self) -> list[dict[str, str]]:
        """Converts the live part of the chat to Gradio's *messages* chatbot format.

        An image turn is shown as an inline ``<img>`` tag (data URL, PNG, downscaled like
        :meth:`get_images`) followed by its text with the ``<image>`` placeholders removed. An assistant
        turn that is still None (waiting for the first streamed token) is left out, so no empty bubble
        is drawn.

        Returns:
            ``[{"role": "user" | "assistant", "content": str}, ...]``.
        """
        chat: list[dict[str, str]] = []
        for i, (_, msg) in enumerate(self.messages[self.offset :]):
            if msg is None:
                continue
            if isinstance(msg, tuple):
                text, image, _ = msg
                b64 = _preview(image)
                img_tag = f'<img src="data:image/png;base64,{b64}" alt="user upload image" />'
                msg = img_tag + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            chat.append({"role": "user" if i % 2 == 0 else "assistant", "content": msg})
        return chat

    def _live_user_turns(self) -> list[list[Any]]:
        # Turns alternate user/assistant starting after the pre-filled examples.
        return self.messages[self.offset :][::2]

    # ------------------------------------------------------------------------------------------------
    # Copying and logging
    # ------------------------------------------------------------------------------------------------

    def copy(self) -> Conversation:
        """Returns an independent copy: its message list and turns can be edited freely.

        Images inside tuple messages are shared, not copied; nothing here mutates them.
        """
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])

    def dict(self) -> dict[str, Any]:
        """Returns the JSON-serialisable state the web server writes to its conversation log.

        Image tuples are reduced to their text (images are logged separately, by hash).

        Returns:
            ``{"system", "roles", "messages", "offset", "sep", "sep2"}``.
        """
        return {
            "system": self.system,
            "roles": list(self.roles),
            "messages": [[role, _message_text(msg)] for role, msg in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


def _message_text(message: Message) -> str | None:
    """The text of a message; a demo image tuple contributes its first element."""
    if isinstance(message, tuple):
        return message[0]
    return message


# ----------------------------------------------------------------------------------------------------
# One renderer per separator style. Each takes (role, text-or-None) pairs, already reduced to text, and
# returns (text, supervised) segments; get_prompt() is their concatenation, so the prompt and the label
# mask cannot drift apart. An empty text renders like None, as in the original code (which tested
# truthiness).
# ----------------------------------------------------------------------------------------------------


def _push(segments: list[Segment], text: str, supervised: bool) -> None:
    """Appends ``text``, merging it into the last segment when the flags agree; empty text adds nothing."""
    if not text:
        return
    if segments and segments[-1][1] == supervised:
        segments[-1] = (segments[-1][0] + text, supervised)
    else:
        segments.append((text, supervised))


def _is_answer(index: int) -> bool:
    # Turns alternate user/assistant starting with the user.
    return index % 2 == 1


def _render_single(conv: Conversation, messages: list[tuple[str, str | None]]) -> list[Segment]:
    segments: list[Segment] = []
    _push(segments, conv.system + conv.sep, False)
    for i, (role, text) in enumerate(messages):
        if not text:
            _push(segments, f"{role}:", False)
            continue
        # At inference the prompt ends at "role:", so the model itself generates the space before its answer:
        # for answers the space is supervised (it is often its own "▁" token, e.g. before CJK or Devanagari).
        _push(segments, f"{role}:", False)
        _push(segments, " " + text + conv.sep, _is_answer(i))
    return segments


def _render_two(conv: Conversation, messages: list[tuple[str, str | None]]) -> list[Segment]:
    seps = (conv.sep, conv.sep2)
    segments: list[Segment] = []
    _push(segments, conv.system + conv.sep, False)
    for i, (role, text) in enumerate(messages):
        if not text:
            _push(segments, f"{role}:", False)
            continue
        # At inference the prompt ends at "ASSISTANT:", so the model itself generates the space before its
        # answer: it is supervised (often its own "▁" token, e.g. before CJK or Devanagari text).
        _push(segments, f"{role}:", False)
        _push(segments, " " + text + seps[i % 2], _is_answer(i))
    return segments


def _render_mpt(conv: Conversation, messages: list[tuple[str, str | None]]) -> list[Segment]:
    # ChatML roles already carry "<|im_start|>role\n", so no ": " between role and text.
    segments: list[Segment] = []
    _push(segments, conv.system + conv.sep, False)
    for i, (role, text) in enumerate(messages):
        _push(segments, role, False)
        if text:
            _push(segments, text + conv.sep, _is_answer(i))
    return segments


def _render_plain(conv: Conversation, messages: list[tuple[str, str | None]]) -> list[Segment]:
    # The plain template has no sep2; the original would fail concatenating None after an answer.
    # Ending answers with sep ("\n") matches what stage-1 training sees (caption + "\n").
    seps = (conv.sep, conv.sep2 if conv.sep2 is not None else conv.sep)
    segments: list[Segment] = []
    _push(segments, conv.system, False)
    for i, (_, text) in enumerate(messages):
        if text:
            _push(segments, text + seps[i % 2], _is_answer(i))
    return segments


def _render_llama_2(conv: Conversation, messages: list[tuple[str, str | None]]) -> list[Segment]:
    segments: list[Segment] = []
    for i, (role, text) in enumerate(messages):
        if i == 0:
            if not text:
                raise ValueError("LLAMA_2 prompts need a first message with text")
            if role != conv.roles[0]:
                raise ValueError(f"LLAMA_2 prompts must start with the user role {conv.roles[0]!r}, got {role!r}")
            # PALO always wraps; LLaVA skips the block for an empty system prompt (mistral_instruct).
            # Every PALO LLAMA_2 template has a system prompt, so following LLaVA changes nothing there.
            if conv.system:
                text = f"<<SYS>>\n{conv.system}\n<</SYS>>\n\n{text}"
        if not text:
            continue  # An open assistant turn: the prompt already ends with "[/INST]".
        if _is_answer(i):
            # The prompt ends at "[/INST]": the space before the answer is the model's to generate.
            _push(segments, f" {text} {conv.sep2}", True)
        else:
            _push(segments, f"{conv.sep}[INST] {text} [/INST]", False)
    # The original strips the leading "<s>" with a character-set strip (BOS is added by the tokenizer).
    # It is exact because what follows is always "[INST]", which holds none of "<", "s", ">".
    return _lstrip_segments(segments, conv.sep)


def _lstrip_segments(segments: list[Segment], chars: str) -> list[Segment]:
    """``str.lstrip(chars)`` applied to the concatenation of ``segments``, keeping the flags."""
    out = list(segments)
    while out:
        text, supervised = out[0]
        stripped = text.lstrip(chars)
        if stripped:
            out[0] = (stripped, supervised)
            break
        out.pop(0)  # Wholly stripped: the strip goes on into the next segment.
    return out


_RENDERERS = {
    SeparatorStyle.SINGLE: _render_single,
    SeparatorStyle.TWO: _render_two,
    SeparatorStyle.MPT: _render_mpt,
    SeparatorStyle.PLAIN: _render_plain,
    SeparatorStyle.LLAMA_2: _render_llama_2,
}


# ----------------------------------------------------------------------------------------------------
# Demo image helpers
# ----------------------------------------------------------------------------------------------------


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad an image to a square, centred, with ``background_color``.

    A wide image is pasted at ``(0, (W - H) // 2)`` on a W x W canvas, a tall one at ``((H - W) // 2, 0)``; the canvas
    keeps the image's mode. This is the ``pad`` rule PALO trained with, and the demo's "Pad" choice.

    The one implementation: :mod:`palo.mm_utils` re-exports it under the same, original LLaVA name (this module
    stays free of torch and transformers, so the web demo can use it too).
    """
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def process_image(image: Image.Image, mode: str) -> Image.Image:
    """Applies the demo's "Preprocess for non-square image" choice.

    Args:
        image: The uploaded image.
        mode: One of :data:`IMAGE_PROCESS_MODES`. ``"Crop"`` and ``"Default"`` leave the image alone, as
            in the original demo (the worker's processor centre-crops anyway).

    Returns:
        The processed image.

    Raises:
        ValueError: For an unknown mode.
    """
    if mode == "Pad":
        return expand2square(fit_square_canvas(image if image.mode == "RGB" else image.convert("RGB")), PAD_BACKGROUND)
    if mode == "Resize":
        return image.resize(RESIZE_SIZE)
    if mode in ("Crop", "Default"):
        return image
    raise ValueError(f"Invalid image process mode {mode!r}; expected one of {IMAGE_PROCESS_MODES}")


def _downscale(image: Image.Image) -> Image.Image:
    """Caps the size at 800 px (long side) / 400 px (short side), keeping the aspect ratio.

    The target short side is the smallest of: what keeps the long side within 800, 400, and the current
    short side (never upscale). Sizes are truncated to integers like the original, and the image is
    resized only when that target differs from its current size.
    """
    width, height = image.size
    long_side, short_side = max(width, height), min(width, height)
    aspect = long_side / short_side
    # max(1, ...) only guards extreme aspect ratios (> 800:1) that would otherwise give a 0-px side.
    new_short = max(1, int(min(MAX_LONG_EDGE / aspect, MAX_SHORT_EDGE, short_side)))
    new_long = int(new_short * aspect)
    if new_long == long_side:
        return image
    size = (new_short, new_long) if height > width else (new_long, new_short)
    return image.resize(size)


# The chat view's PNG of each image, made once: a streamed answer redraws the chat for every piece, and encoding a
# large photo's preview each time cost about 0.1 s of CPU per piece.
_PREVIEWS: dict[int, str] = {}  # id of a live image -> its preview (images compare by pixels: no hashing)


def _preview(image: Image.Image) -> str:
    """:func:`encode_image_base64` of the downscaled image, cached for as long as the image lives."""
    b64 = _PREVIEWS.get(id(image))
    if b64 is None:
        b64 = _PREVIEWS[id(image)] = encode_image_base64(_downscale(image))
        weakref.finalize(image, _PREVIEWS.pop, id(image), None)  # before the id can name another image
    return b64


def encode_image_base64(image: Image.Image) -> str:
    """Encodes an image as a base64 PNG string (the worker protocol's image format)."""
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------------
# Helpers for callers
# ----------------------------------------------------------------------------------------------------


def stop_string(conv: Conversation) -> str | None:
    """The string that ends a model answer for this template.

    TWO-style templates end answers with ``sep2`` (``</s>``); every other style uses ``sep``
    (docs/formats.md §3.5; the original web demo's other rule: docs/compat.md#serving).

    Args:
        conv: A conversation or template.

    Returns:
        The stop string (None only for a template without the separator it needs).
    """
    return conv.sep2 if conv.sep_style is SeparatorStyle.TWO else conv.sep


def infer_conv_mode(model_name: str) -> str:
    """Chooses a template key from a model name, as LLaVA's ``cli.py`` did.

    Nothing in the project calls this by default (templates come from the checkpoint's config,
    :func:`conv_mode_for_checkpoint`); it is a compatibility adapter for callers that explicitly opt in to
    name-based guessing. Prefer passing the template explicitly.

    PALO models (trained with ``--version v1``) always use ``vicuna_v1``, and MobileVLM uses ``v1`` (the
    same template). Other names follow LLaVA's ``cli.py``, checked in order on the lower-cased name:
    ``llama-2`` -> ``llava_llama_2``, ``mistral`` -> ``mistral_instruct``, ``v1.6-34b`` ->
    ``chatml_direct``, ``v1`` -> ``llava_v1``, ``mpt`` -> ``mpt``, else ``llava_v0``.

    Args:
        model_name: The model name, e.g. the last component of the checkpoint path
            (``"PALO-7B"``, ``"llava-v1.5-13b"``). Parent folders are not stripped here, so pass the name
            rather than a full path.

    Returns:
        A key of :data:`conv_templates`.
    """
    name = model_name.lower()
    if "palo" in name:
        return "vicuna_v1"
    if "mobilevlm" in name:
        return "v1"
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"


# ----------------------------------------------------------------------------------------------------
# Templates. System prompts are format constants: keep them character-exact (note the double space in
# the llama_2 prompt after "being safe." and the missing space in the mmtag prompt's "language.The").
# ----------------------------------------------------------------------------------------------------

_SYSTEM_VICUNA_V0 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_SYSTEM_VICUNA_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_SYSTEM_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_SYSTEM_MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_SYSTEM_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
_SYSTEM_MPT = (
    MPT_SYSTEM_PREFIX
    + "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
)
_SYSTEM_CHATML_DIRECT = MPT_SYSTEM_PREFIX + "Answer the questions."

_MPT_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

# The v0 template shows the model one worked exchange before the live chat (offset=2 hides it from the
# display). Only v0/default use it, and PALO never does, so the wording is ours, not the original's.
_V0_EXAMPLE_QUESTION = "What are the key differences between renewable and non-renewable energy sources?"
_V0_EXAMPLE_ANSWER = (
    "Renewable energy sources are those that nature replenishes on a human timescale, such as sunlight, "
    "wind, flowing water, geothermal heat and biomass. Non-renewable energy sources, such as coal, oil, "
    "natural gas and uranium, exist in fixed amounts that formed over millions of years and are used up "
    "as we consume them. The key differences are:\n"
    "1. Availability: renewable sources keep being replenished, while every unit of a non-renewable "
    "source that is extracted shrinks the remaining reserves.\n"
    "2. Environmental impact: burning fossil fuels releases greenhouse gases and air pollutants, whereas "
    "most renewable sources produce little or no emissions while generating energy.\n"
    "3. Cost: renewable installations can cost more to build, but their fuel is free and their running "
    "costs are low; non-renewable plants pay for fuel throughout their lives.\n"
    "4. Reliability: fossil and nuclear plants deliver steady output on demand, while solar and wind vary "
    "with the weather and the time of day and need storage or backup.\n"
    "5. Flexibility: renewable systems range from a single rooftop panel to large farms and suit remote "
    "places, while non-renewable plants are usually large and centralised.\n"
    "6. Sustainability: renewable sources can supply energy indefinitely, while relying on non-renewable "
    "sources cannot continue forever.\n"
    "7. Energy security: local renewable resources reduce dependence on imported fuels and on their "
    "volatile prices."
)

conv_vicuna_v0 = Conversation(
    system=_SYSTEM_VICUNA_V0,
    roles=("Human", "Assistant"),
    messages=(("Human", _V0_EXAMPLE_QUESTION), ("Assistant", _V0_EXAMPLE_ANSWER)),
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_vicuna_v1 = Conversation(
    system=_SYSTEM_VICUNA_V1,
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llama_2 = Conversation(
    system=_SYSTEM_LLAMA_2,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_llava_llama_2 = Conversation(
    system=_SYSTEM_LLAVA_LLAMA_2,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)

conv_mpt = Conversation(
    system=_SYSTEM_MPT,
    roles=_MPT_ROLES,
    version="mpt",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_chatml_direct = Conversation(
    system=_SYSTEM_CHATML_DIRECT,
    roles=_MPT_ROLES,
    version="mpt",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)

conv_llava_v0 = Conversation(
    system=_SYSTEM_VICUNA_V0,
    roles=("Human", "Assistant"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_llava_v0_mmtag = Conversation(
    system=_SYSTEM_MMTAG,
    roles=("Human", "Assistant"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0_mmtag",
)

conv_llava_v1 = Conversation(
    system=_SYSTEM_VICUNA_V0,  # llava_v1 keeps the "human" wording of v0, unlike vicuna_v1's "user".
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llava_v1_mmtag = Conversation(
    system=_SYSTEM_MMTAG,
    roles=("USER", "ASSISTANT"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1_mmtag",
)

# PALO trains (--version v1), evaluates (--conv-mode vicuna_v1) and serves with this template.
default_conversation = conv_vicuna_v1

# Aliases share one object, as in the original (e.g. "v1" and "vicuna_v1"); copy() before use.
conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
}


def conv_mode_for_checkpoint(config: Any, model_name: str = "") -> str:
    """The template a checkpoint was trained with, decided by its config alone.

    No behaviour follows from a folder or model name (identical checkpoint bytes must get identical prompts
    wherever they sit), so only ``model_type`` decides:

    * ``llava_llama`` and ``llava`` (LLaVA-1.5, whose release wrote ``llava``): ``llava_v1``, what LLaVA's
      ``cli.py`` chose for the released ``llava-v1.5-*`` names;
    * anything else: ``vicuna_v1``. That is what PALO checkpoints (``palo``, MobilePALO included) and MobileVLM
      ones (``mobilevlm``, its ``v1`` is the same template) were trained with, and :data:`default_conversation`
      for a plain LLaMA.

    A config cannot tell a LLaVA-1.5 fine-tune on LLaMA-2, Mistral or MPT (``llava_llama_2``,
    ``mistral_instruct``, ``mpt``) from a Vicuna-based one: those get the default above, and the caller's
    template (``--conv-mode``, ``conv_mode=``) overrides it. :func:`infer_conv_mode` still maps names in the wild
    to templates for callers that opt in explicitly.

    Args:
        config: The checkpoint's config (anything with ``model_type``).
        model_name: Ignored; kept so that callers written for the name-based rule keep working.

    Returns:
        A key of :data:`conv_templates`.
    """
    del model_name  # kept only for the signature: the template must not depend on where a checkpoint sits
    if getattr(config, "model_type", "") in ("llava_llama", "llava"):
        return "llava_v1"
    return "vicuna_v1"
