"""The PALO web demo (Gradio 6): chat about an image in any of the ten languages, answers streamed from a worker.

Run ``python palo/serve/gradio_web_server.py --controller http://localhost:10000 --model-list-mode reload``
(``--controller`` abbreviates ``--controller-url``) or ``python -m palo.serve.gradio_web_server``.

The flows are the original demo's (``docs/formats.md`` §7.8): the model list comes from the
controller (``once`` at start, with ``?model=`` preselection, or ``reload`` on every page load); a question with an
image starts a fresh ``vicuna_v1`` conversation; the prompt goes to the worker chosen by the controller and the
answer streams in with a ``▌`` cursor; errors are shown in the chat; chats and votes are appended as JSON lines to
``<log dir>/YYYY-MM-DD-conv.json`` and images saved under ``<log dir>/serve_images/``. Each paragraph is shown in
the direction of its first letter (Arabic and Urdu right-to-left), and the answer to a question asked in such a
language starts right-to-left whatever its first letter.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: import ``palo`` from this checkout, not files next to this one
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # through palo.cli, before the imports below: a missing extra is one line
    from palo.cli import module_main

    sys.exit(module_main("palo.serve.gradio_web_server"))

import argparse
import datetime
import hashlib
import html
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from palo.constants import DEFAULT_IMAGE_TOKEN
from palo.conversation import Conversation, conv_templates, stop_string
from palo.image_io import ImageLoadError, load_image, viewed
from palo.jsonl import atomic_write
from palo.serve.protocol import MODERATION_MSG, SERVER_ERROR_MSG, iter_chunks
from palo.serve.utils import (
    add_worker_key_argument,
    build_logger,
    end_with_launcher,
    log_dir,
    masked_args,
    refuse_unservable,
    service_url,
    violates_moderation,
    worker_key_headers,
)

CONV_MODE = "vicuna_v1"  # PALO serves with this template for every new conversation
CURSOR = "▌"
NO_ANSWER_MSG = "(no answer)"  # an answer that ended before its first word
MAX_TEXT_CHARS, MAX_TEXT_CHARS_WITH_IMAGE = 1536, 1200
MAX_NEW_TOKENS_CAP = 1536
WORKER_TIMEOUT_S = 10.0  # between two pieces of the worker's stream (the original's value)
STILL_WRITING = "the answer is still being written: send this once it is done"
_RTL_CHARS = re.compile(r"[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc]")  # Hebrew, Arabic (Urdu, Persian...) blocks
_STRONG_CHARS = re.compile(r"[^\W\d_]")

RLM = "\u200f"  # RIGHT-TO-LEFT MARK: a strong right-to-left character, invisible
CSS = """
#chatbot .message, #chatbot .prose, #question textarea,
#chatbot .message-content :is(p, li, h1, h2, h3, h4, h5, h6, blockquote, td, th) {
  unicode-bidi: plaintext; text-align: start;
}
footer { display: none !important; }
"""
TITLE_MD = "# 🌍 PALO: A Polyglot Large Multimodal Model for 5B People"
TOS_MD = ("**Terms of use.** A research preview for non-commercial use only. It may produce offensive or wrong "
          "content and must not be used for illegal, harmful, violent, racist or sexual purposes. Chats are logged.")


def is_rtl(text: str) -> bool:
    """Whether text reads right to left: its first letter is in a right-to-left script (Arabic, Urdu, ...)."""
    match = _STRONG_CHARS.search(re.sub(r"<[^>]*>", "", text))
    return bool(match and _RTL_CHARS.match(match.group(0)))


def chatbot_messages(state: Conversation) -> list[dict[str, str]]:
    """The conversation in Gradio's messages format; the answer to a question asked in an RTL language starts RTL.

    Every paragraph takes the direction of its first letter (the CSS's ``unicode-bidi: plaintext``); an answer to an
    RTL question starts with an invisible right-to-left mark, so that its first paragraph reads right-to-left even
    when it opens with a Latin word or a number. (A ``<div dir="rtl">`` around such messages did that too, but
    Gradio's copy buttons copied the markup with the text.)
    """
    messages = state.to_gradio_chatbot()
    rtl = False
    for message in messages:
        if message["role"] == "user":
            rtl = is_rtl(message["content"])
        elif rtl and isinstance(message["content"], str):
            message["content"] = RLM + message["content"]
    return messages


def refusal_notice(reason: str) -> str:
    """The Markdown shown under the textbox for a message that was not sent, ``reason`` escaped: rendered as it is, a
    reason's ``<image>`` would be taken for an HTML tag and vanish."""
    return f"⚠️ **Not sent:** {html.escape(reason)}"


def neutralised(text: str) -> str:
    """``text`` with each ``<image>`` written as ``(image)``: a placeholder in an answer kept in the conversation would
    put one more ``<image>`` than there are images into every later prompt, and the worker refuses those."""
    return text.replace(DEFAULT_IMAGE_TOKEN, "(image)")


def answer_pending(state: Conversation) -> bool:
    """Whether the conversation's last answer is open: not generated yet, or still being written."""
    if len(state.messages) <= state.offset:
        return False
    role, message = state.messages[-1]
    return role == state.roles[1] and (message is None or (isinstance(message, str) and message.endswith(CURSOR)))


_FAILED_ANSWER = re.compile(r"\(error_code: \d+\)\Z")


def read_upload(path: str | None) -> Any:
    """The image box's file, read as every path reads images (:func:`palo.image_io.load_image`), or None.

    Raises:
        ImageLoadError: Naming the file as the user knows it (its base name, not the path of Gradio's copy).
    """
    if path is None:
        return None
    try:
        return load_image(path)
    except ImageLoadError as exc:
        raise ImageLoadError(str(exc).replace(path, os.path.basename(path))) from None


def answer_failed(state: Conversation) -> bool:
    """Whether the conversation's last answer is an error :meth:`WebServer.http_bot` wrote (nothing to vote on)."""
    if len(state.messages) <= state.offset or state.messages[-1][0] != state.roles[1]:
        return False
    message = state.messages[-1][1]
    return isinstance(message, str) and (message.startswith(SERVER_ERROR_MSG) or bool(_FAILED_ANSWER.search(message)))


class WebServer:
    """The demo's logic, independent of the Gradio layout (so it can be tested without a browser).

    Args:
        controller_url: The controller's base URL.
        moderate: Check inputs with the OpenAI moderation endpoint (needs ``OPENAI_API_KEY``).
        logger: Where to log.
        worker_key: The controller's ``--worker-key``: sent with the refresh of the workers (which a keyed
            controller refuses without it) and the streams (a worker may be such a controller, one level down).
    """

    def __init__(self, controller_url: str, moderate: bool = False, logger: Any = None,
                 worker_key: str | None = None) -> None:
        self.controller_url = controller_url.rstrip("/")
        self.moderate = moderate
        self.logger = logger or logging.getLogger(__name__)
        # One kept-alive client for the controller and the workers (thread-safe; Gradio runs handlers in threads):
        # a client per call would pay a new TLS context and connection for each message.
        self.http = httpx.Client(headers={"User-Agent": "PALO Client", **worker_key_headers(worker_key)})
        # Guards a conversation's open answer: two handlers (a send and a second send while the first waits in
        # Gradio's queue, each with its chained answer) run in threads of their own.
        self._answers = threading.Lock()

    # -- controller ----------------------------------------------------------------------------------------------
    def get_model_list(self) -> list[str]:
        """Refresh the workers and list their models (empty when the controller cannot be reached)."""
        try:
            self.http.post(self.controller_url + "/refresh_all_workers", timeout=30).raise_for_status()
            models = self.http.post(self.controller_url + "/list_models", timeout=10).json()["models"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            self.logger.error("cannot list models from %s: %s", self.controller_url, exc)
            return []
        return sorted(models)

    def worker_address(self, model: str) -> str | None:
        """A worker's address for ``model`` ("" when none serves it), or None when the controller did not answer."""
        try:
            return self.http.post(self.controller_url + "/get_worker_address", json={"model": model},
                                  timeout=10).json().get("address", "")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self.logger.error("controller unreachable: %s", exc)
            return None

    # -- logging -------------------------------------------------------------------------------------------------
    def _conv_log(self) -> str:
        t = datetime.datetime.now()
        return os.path.join(log_dir(), f"{t.year}-{t.month:02d}-{t.day:02d}-conv.json")

    def _append_log(self, record: dict[str, Any]) -> None:
        try:
            os.makedirs(log_dir(), exist_ok=True)
            with open(self._conv_log(), "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        except (OSError, UnicodeEncodeError) as exc:  # a lone surrogate in the text: not worth a lost chat
            self.logger.error("cannot write the conversation log: %s", exc)

    def _save_images(self, images: list[Any]) -> list[str]:
        hashes = []
        day = datetime.datetime.now().strftime("%Y-%m-%d")
        for image in images:
            digest = hashlib.md5(image.tobytes()).hexdigest()
            hashes.append(digest)
            path = os.path.join(log_dir(), "serve_images", day, f"{digest}.jpg")
            if not os.path.isfile(path):
                jpeg = io.BytesIO()
                image.convert("RGB").save(jpeg, format="JPEG")
                try:
                    # Through a temp file of its own and renamed: a crash mid-write leaves no torn file that is never
                    # written again, and sessions saving the same image at once (an example clicked by several
                    # users) do not share one temp file (a pid-named one was moved away under the others).
                    atomic_write(path, [jpeg.getvalue()])
                except OSError as exc:
                    self.logger.error("cannot save an image: %s", exc)
        return hashes

    def vote(self, state: Conversation | None, kind: str, model: str, ip: str | None) -> None:
        """Log an upvote, downvote or flag (nothing without a conversation)."""
        if state is None:
            return
        self._append_log({"tstamp": round(time.time(), 4), "type": kind, "model": model, "state": state.dict(),
                          "ip": ip})

    # -- chat flows ----------------------------------------------------------------------------------------------
    @staticmethod
    def new_state() -> Conversation:
        return conv_templates[CONV_MODE].copy()

    def add_text(self, state: Conversation | None, text: str, image: Any,
                 image_process_mode: str = "Default") -> Conversation:
        """Append the user's message (and an empty answer slot) to the conversation.

        Returns:
            The new state; ``skip_next`` is set when nothing should be generated (empty input, moderated input, a
            text holding a lone surrogate). A refused input leaves the conversation as it was (:meth:`submit` also
            says why).

        Raises:
            ValueError: For a text whose ``<image>`` placeholders do not match the images (none without an image,
                at most one with it), or while the last answer is still open (being written, or about to be): the
                conversation is left as it was.
        """
        return self.submit(state, text, image, image_process_mode)[0]

    def submit(self, state: Conversation | None, text: str, image: Any,
               image_process_mode: str = "Default") -> tuple[Conversation, str]:
        """:meth:`add_text`, also giving why a message was refused.

        Returns:
            The new state, and ``""`` (the message was taken, or there was none) or why it was refused: moderation,
            or a lone surrogate. As in the original demo, a refused text never enters the conversation: it would be
            in every later prompt, and Regenerate would send it to the worker unchecked.

        Raises:
            ValueError: As :meth:`add_text`.
        """
        state = state or self.new_state()
        text = (text or "").strip()
        if not text and image is None:  # nothing to send, whatever else is going on
            state.skip_next = True
            return state, ""
        if answer_pending(state):  # said before any other check (or a moderation request) is made
            raise ValueError(STILL_WRITING)
        try:
            # Checked here, not when sending: a lone surrogate (half an emoji, which a browser sends when a paste cuts
            # one in two and Gradio's JSON decoding keeps) cannot be UTF-8 encoded for the worker, and once in the
            # conversation it would fail every later turn as a network error.
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            state.skip_next = True
            return state, (f"the message holds a lone surrogate {text[exc.start]!a} at character {exc.start + 1} "
                           "(half of an emoji), which is not Unicode text: please type it again")
        if text.count(DEFAULT_IMAGE_TOKEN) > (image is not None):
            raise ValueError(f"{DEFAULT_IMAGE_TOKEN} marks where the image goes: type it at most once, and only with "
                             "an image attached")
        if self.moderate and violates_moderation(text, self.logger):
            state.skip_next = True  # nothing to answer; the conversation (and what Regenerate redoes) is unchanged
            return state, MODERATION_MSG
        text = text[: MAX_TEXT_CHARS_WITH_IMAGE if image is not None else MAX_TEXT_CHARS]
        if image is not None:
            image = viewed(image)  # as the worker reads an image: upright, transparency on white, 16-bit scaled
            if "<image>" not in text:
                text = text + "\n<image>"
            message: Any = (text, image, image_process_mode)
        else:
            message = text
        with self._answers:  # checked again: another send of this conversation may have been taken meanwhile
            if answer_pending(state):
                raise ValueError(STILL_WRITING)
            if image is not None and state.get_images(return_pil=True):  # one image per conversation: a new image
                state = self.new_state()  # starts a new one
            state.append_message(state.roles[0], message)
            state.append_message(state.roles[1], None)
            state.skip_next = False
        return state, ""

    def regenerate(self, state: Conversation | None, image_process_mode: str = "Default") -> Conversation:
        """Clear the last answer (re-applying the current image mode to the last image) to generate it again."""
        state = state or self.new_state()
        with self._answers:
            if len(state.messages) < state.offset + 2 or answer_pending(state):  # nothing to redo, or being written
                state.skip_next = True
                return state
            state.messages[-1][-1] = None
            previous = state.messages[-2][1]
            if isinstance(previous, tuple):
                state.messages[-2][1] = previous[:2] + (image_process_mode,)
            state.skip_next = False
        return state

    def claim(self, state: Conversation | None) -> bool:
        """Take the conversation's open answer to generate it (it shows the cursor from now on); False when it has
        none to take: none was asked for (a refused or empty send), or another handler has it already.

        Each send chains an answer handler, also a send refused because an answer is still open; the open answer
        is generated by whichever handler claims it first, once.
        """
        with self._answers:
            if (state is None or len(state.messages) < state.offset + 2 or state.messages[-1][0] != state.roles[1]
                    or state.messages[-1][1] is not None):
                return False
            state.messages[-1][1] = CURSOR
            return True

    def http_bot(self, state: Conversation, model: str, temperature: float, top_p: float, max_new_tokens: int,
                 ip: str | None = None, claimed: bool = False) -> Iterator[Conversation]:
        """Generate the answer to the last message, yielding the state after each streamed piece (nothing when the
        conversation has no open answer: a turn that was refused, or none yet, or one another handler generates).

        Args:
            claimed: The caller has :meth:`claim` ed the answer already.
        """
        if not claimed and not self.claim(state):
            yield state if state is not None else self.new_state()
            return
        try:
            yield from self._generate(state, model, temperature, top_p, max_new_tokens, ip)
        finally:  # however it ended: an answer left with the cursor would be open for good (nothing could be sent)
            if state.messages[-1][1] == CURSOR:
                state.messages[-1][1] = NO_ANSWER_MSG

    def _generate(self, state: Conversation, model: str, temperature: float, top_p: float, max_new_tokens: int,
                  ip: str | None) -> Iterator[Conversation]:
        start = time.time()
        if len(state.messages) == state.offset + 2:  # first round: rebuild the state from the PALO template
            fresh = self.new_state()
            fresh.append_message(fresh.roles[0], state.messages[-2][1])
            fresh.append_message(fresh.roles[1], CURSOR)
            # The claimed answer and the rebuilt one are one list, so the answer shows in either state: until this
            # handler's first update the session still holds the old one (where a second handler finds it claimed).
            claimed = state.messages[-1]
            claimed[0] = fresh.roles[1]
            fresh.messages[-1] = claimed
            state = fresh
        for message in state.messages[state.offset:]:  # answers kept before this one, whoever wrote them
            if message[0] == state.roles[1] and isinstance(message[1], str):
                message[1] = neutralised(message[1])
        address = self.worker_address(model) if model else ""
        if not address:
            reason = (f"the controller at {self.controller_url} does not answer" if address is None else
                      f"no worker serves model {model!r}" if model else "no model is selected")
            state.messages[-1][-1] = f"{SERVER_ERROR_MSG} ({reason})"
            yield state
            return
        slot = state.messages[-1]  # this answer's own: written by reference, whatever else holds the state
        with self._answers:  # rendered with the answer open, as the template expects; no claim sees it open
            slot[1] = None
            prompt = state.get_prompt()
            slot[1] = CURSOR
        images = state.get_images(return_pil=True)
        image_hashes = self._save_images(images)
        stop = stop_string(state)
        payload = {
            "model": model, "prompt": prompt, "temperature": float(temperature), "top_p": float(top_p),
            "max_new_tokens": max(1, min(int(max_new_tokens), MAX_NEW_TOKENS_CAP)), "stop": stop,
            "images": state.get_images(),
        }
        self.logger.info("==== request ====\n%s", {**payload, "images": f"{len(images)} image(s)"})
        try:
            yield state
            with self.http.stream("POST", address + "/worker_generate_stream", json=payload,
                                  timeout=WORKER_TIMEOUT_S) as response:
                chunks = iter_chunks(response.iter_bytes())
                if response.status_code >= 400:
                    # PALO's services send their errors as protocol chunks; anything else (a proxy's 503, a port
                    # taken by another service) was read as an empty answer, logged as a chat and offered for votes.
                    body = response.read()
                    chunks = list(iter_chunks([body]))
                    if not chunks or "error_code" not in chunks[0]:
                        raise ValueError(f"HTTP {response.status_code}: {body[:200]!r}")
                for chunk in chunks:
                    # Answer or error, it is kept in the conversation and so in every later prompt: no placeholder
                    # may survive in it (a model asked which tag marks the image answers "<image>").
                    if chunk.get("error_code", 0) == 0:
                        slot[1] = neutralised(str(chunk.get("text", ""))[len(prompt):].strip()) + CURSOR
                        yield state
                    else:
                        error = neutralised(str(chunk.get("text")))
                        slot[1] = f"{error} (error_code: {chunk.get('error_code')})"
                        yield state
                        return
        except (httpx.HTTPError, ValueError) as exc:
            self.logger.error("worker %s failed: %s", address, exc)
            slot[1] = f"{SERVER_ERROR_MSG} (error_code: 4)"
            yield state
            return
        finally:  # also when the page went away mid-answer (the generator closed): no cursor is left in the answer
            if slot[1].endswith(CURSOR):
                # An empty answer would render as an open turn, running the next question into this one's prompt.
                slot[1] = slot[1][: -len(CURSOR)] or NO_ANSWER_MSG
        yield state
        self._append_log({"tstamp": round(time.time(), 4), "type": "chat", "model": model, "start": round(start, 4),
                          "finish": round(time.time(), 4), "state": state.dict(), "images": image_hashes, "ip": ip})


def unopened_upload(preprocess: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An image box's ``preprocess`` that hands an uploaded file's path over unopened.

    ``gr.Image(type="filepath", image_mode=None)`` hands over the path too, but opens the file with Pillow first: a
    file Pillow cannot identify, or one over Pillow's own pixel limit, failed there with Gradio's error (its
    temporary path in it) before ``on_add`` could say why under the textbox. (An instance's method, not a subclass:
    Gradio writes a ``.pyi`` file beside the module of every component class.)
    """
    def unopened(payload: Any) -> Any:
        if payload is None or payload.path is None or (payload.url or "").startswith("data:"):
            return preprocess(payload)  # nothing uploaded, or a data: URL Gradio decodes itself
        return str(payload.path)

    return unopened


def build_demo(server: WebServer, models: list[str], model_list_mode: str = "once", embed: bool = False):
    """Lay out the Gradio 6 app around :class:`WebServer`."""
    import gradio as gr  # (no ``from __future__ import annotations`` here: Gradio reads ``gr.Request`` hints)

    from palo.conversation import IMAGE_PROCESS_MODES
    from palo.serve.examples import example_rows

    def ip_of(request: gr.Request | None) -> str | None:
        return getattr(getattr(request, "client", None), "host", None)

    with gr.Blocks(title="PALO") as demo:
        state = gr.State()
        if not embed:
            gr.Markdown(TITLE_MD)
        with gr.Row():
            with gr.Column(scale=3):
                model_selector = gr.Dropdown(choices=models, value=models[0] if models else None, interactive=True,
                                             show_label=False, container=False, elem_id="model_selector")
                # A file path, unopened: on_add reads it (a corrupt, non-image or oversized file is refused there,
                # with the reason under the textbox). image_mode None: Gradio's "RGB" would turn transparency black
                # (for data: URLs, which Gradio decodes itself); the loader lays it on white.
                imagebox = gr.Image(type="filepath", image_mode=None, label="Image", elem_id="imagebox")
                imagebox.preprocess = unopened_upload(imagebox.preprocess)
                image_process_mode = gr.Radio(list(IMAGE_PROCESS_MODES), value="Default",
                                              label="Preprocess for non-square image", visible=False)
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.1, interactive=True, label="Temperature")
                    top_p = gr.Slider(0.0, 1.0, value=0.7, step=0.1, interactive=True, label="Top P")
                    max_output_tokens = gr.Slider(64, 1024, value=512, step=64, interactive=True,
                                                  label="Max output tokens")
            with gr.Column(scale=8):
                # No "share" button: it posts to a Hugging Face Space's discussions, and does nothing elsewhere.
                chatbot = gr.Chatbot(elem_id="chatbot", label="PALO Chatbot", height=550, buttons=["copy", "copy_all"])
                with gr.Row():
                    textbox = gr.Textbox(show_label=False, placeholder="Enter text and press ENTER — any of the 10 "
                                         "languages / اكتب سؤالك / اپنا سوال لکھیں", container=False, scale=8,
                                         elem_id="question", rtl=False)
                    submit_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                # Why the last message was not sent (empty otherwise), next to what the user typed, which stays there
                # to be fixed (a gr.Warning would be a toast that vanishes).
                notice = gr.Markdown("", elem_id="notice")
                with gr.Row():
                    upvote_btn = gr.Button("👍 Upvote", interactive=False)
                    downvote_btn = gr.Button("👎 Downvote", interactive=False)
                    flag_btn = gr.Button("⚠️ Flag", interactive=False)
                    regenerate_btn = gr.Button("🔄 Regenerate", interactive=False, elem_id="regenerate")
                    clear_btn = gr.Button("🗑️ Clear", interactive=False, elem_id="clear")
        try:
            examples = example_rows()
        except OSError as exc:  # a read-only home or cache: the demo works without its examples
            server.logger.warning("no example images (%s): the page is served without examples", exc)
            examples = []
        if examples:
            gr.Examples(examples=examples, inputs=[imagebox, textbox],
                        label="Examples (Hindi, Arabic, Urdu, Spanish, Chinese, Bengali, Russian, English)")
        if not embed:
            gr.Markdown(TOS_MD)

        vote_buttons = [upvote_btn, downvote_btn, flag_btn]
        all_buttons = vote_buttons + [regenerate_btn, clear_btn]

        def buttons(enabled: bool) -> list[Any]:
            return [gr.update(interactive=enabled) for _ in all_buttons]

        def on_add(s, text, image, mode):
            unchanged = [gr.update() for _ in all_buttons]  # nothing to answer: the buttons stay as they are
            try:
                s, refusal = server.submit(s, text, read_upload(image), mode)
            except ValueError as exc:  # an unreadable image, a misplaced <image>, or an answer still being written
                # The conversation is left as it is: its open answer (maybe still waiting in Gradio's queue) is
                # generated all the same, by whichever answer handler claims it.
                s = s or server.new_state()
                refusal = str(exc)
            if refusal:
                # The reason goes under the textbox, and the text and image stay for the user to fix. They are left
                # as they are, not sent back: a refused text may hold a lone surrogate, which Gradio's orjson cannot
                # encode (the whole reply would fail).
                return [s, chatbot_messages(s), gr.update(), gr.update()] + unchanged + [refusal_notice(refusal)]
            if s.skip_next:  # nothing typed
                return [s, chatbot_messages(s), "", None] + unchanged + [gr.update()]
            # Disabled until the answer is complete, so nobody regenerates or votes on a half-written answer.
            return [s, chatbot_messages(s), "", None] + buttons(False) + [""]

        def on_bot(s, model, temp, p, max_tokens, request: gr.Request):
            if not server.claim(s):  # nothing to answer (an empty or refused send), or another handler answers it:
                s = s or server.new_state()  # the buttons and the notice stay as they are
                yield [s, chatbot_messages(s)] + [gr.update() for _ in all_buttons] + [gr.update()]
                return
            state = s
            for state in server.http_bot(s, model, temp, p, max_tokens, ip_of(request), claimed=True):
                yield [state, chatbot_messages(state)] + buttons(False) + [gr.update()]
            # No votes on an error (as in the original demo); a notice about a send refused while this answer was
            # being written is out of date now.
            votes = [gr.update(interactive=not answer_failed(state)) for _ in vote_buttons]
            yield [state, chatbot_messages(state)] + votes + [gr.update(interactive=True)] * 2 + [""]

        def on_regenerate(s, mode):
            s = server.regenerate(s or server.new_state(), mode)
            if s.skip_next:  # nothing to redo, or its answer is still open: everything stays as it is
                return [s, chatbot_messages(s), gr.update(), gr.update()] + [gr.update() for _ in all_buttons] + [
                    gr.update()]
            return [s, chatbot_messages(s), "", None] + buttons(False) + [""]

        def on_clear():
            s = server.new_state()
            return [s, [], "", None] + buttons(False) + [""]

        def make_vote(kind: str):
            def on_vote(s, model, request: gr.Request):
                if s is not None:
                    server.vote(s, kind, model, ip_of(request))
                return ["", gr.update(interactive=False), gr.update(interactive=False), gr.update(interactive=False)]

            return on_vote

        bot_inputs = [state, model_selector, temperature, top_p, max_output_tokens]
        bot_outputs = [state, chatbot] + all_buttons + [notice]
        add_outputs = [state, chatbot, textbox, imagebox] + all_buttons + [notice]
        answering = []
        for trigger in (textbox.submit, submit_btn.click):
            # Queued, unlike the original's: an error Gradio raises before on_add runs is shown only for a queued
            # event (a bare "Error" otherwise). .success: when adding failed, nothing is generated.
            answering.append(trigger(on_add, [state, textbox, imagebox, image_process_mode], add_outputs,
                                     show_progress="hidden").success(on_bot, bot_inputs, bot_outputs))
        answering.append(regenerate_btn.click(on_regenerate, [state, image_process_mode], add_outputs,
                                              queue=False).success(on_bot, bot_inputs, bot_outputs))
        clear_btn.click(on_clear, None, add_outputs, queue=False)
        # The chat's own trash icon (Gradio shows one) emptied the screen only: the next question still carried the
        # old conversation. It clears as the Clear button does, stopping an answer being written.
        chatbot.clear(on_clear, None, add_outputs, queue=False, cancels=answering)
        for button, kind in zip(vote_buttons, ("upvote", "downvote", "flag")):
            button.click(make_vote(kind), [state, model_selector], [textbox] + vote_buttons, queue=False)

        # Only the model list: the conversation starts empty (None) in each page session, and every handler takes
        # None. In reload mode the list waits on the controller's refresh of all workers, which can end after the
        # first message was sent (had it set the state too, it would have wiped that turn) or after the user picked
        # a model: the shown model is replaced only when ?model= names another or it is no longer served.
        def on_load(shown, request: gr.Request):
            choices = server.get_model_list() if model_list_mode == "reload" else models
            wanted = dict(request.query_params).get("model") if request is not None else None
            if wanted in choices:
                return gr.update(choices=choices, value=wanted, visible=True)
            if shown in choices:
                return gr.update(choices=choices, visible=True)  # whatever is shown now stays
            return gr.update(choices=choices, value=choices[0] if choices else None, visible=True)

        demo.load(on_load, [model_selector], [model_selector], queue=False)
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PALO web demo (Gradio)")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="bind address (0.0.0.0 to accept remote clients)")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--controller-url", type=service_url, default="http://localhost:21001")
    parser.add_argument("--concurrency-count", type=int, default=10)
    parser.add_argument("--model-list-mode", type=str, default="once", choices=["once", "reload"])
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--moderate", action="store_true")
    parser.add_argument("--embed", action="store_true")
    add_worker_key_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_unservable(parser, args, body_cap=False)  # gradio would say so in a traceback
    end_with_launcher()
    logger = build_logger("gradio_web_server", "gradio_web_server.log")
    logger.info("args: %s", masked_args(args))
    server = WebServer(args.controller_url, moderate=args.moderate, logger=logger, worker_key=args.worker_key)
    models = server.get_model_list()
    demo = build_demo(server, models, args.model_list_mode, args.embed)
    demo.queue(default_concurrency_limit=args.concurrency_count, api_open=False)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, show_error=True)
    return 0
