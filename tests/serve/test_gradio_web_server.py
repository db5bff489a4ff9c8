"""The web demo: its chat flow against the live cluster, and the page served by a real process."""

from __future__ import annotations

import io
import json
import os
import sys

import httpx
import pytest
from fastapi import Request  # at module level: FastAPI resolves a route's string annotations in its globals
from serve_helpers import REPO, Service, free_port, listening_addresses, make_image, wait_until

from palo.serve.gradio_web_server import CURSOR, WebServer, chatbot_messages, is_rtl
from palo.serve.protocol import SERVER_ERROR_MSG

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def logdir(tmp_path, monkeypatch):
    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    return tmp_path


def test_arabic_question_streams_an_answer_shown_right_to_left(cluster, logdir):
    server = WebServer(cluster.url)
    assert "ckpt" in server.get_model_list()
    state = server.add_text(None, "ما الذي في هذه الصورة؟", make_image(), "Default")
    yielded = [(s, s.messages[-1][-1]) for s in server.http_bot(state, "ckpt", 0.0, 0.7, 24)]
    state, states = yielded[-1][0], [text for _, text in yielded]
    streamed = [m for m in states if m and m.endswith(CURSOR)]
    assert len(streamed) > 1 and not states[-1].endswith(CURSOR) and states[-1]
    shown = chatbot_messages(state)
    assert [m["role"] for m in shown] == ["user", "assistant"]
    assert all('dir="rtl"' in m["content"] for m in shown)  # question and answer
    assert "data:image/png;base64," in shown[0]["content"]
    records = [json.loads(line) for line in open(next(logdir.glob("*-conv.json")), encoding="utf-8")]
    assert records[-1]["type"] == "chat" and records[-1]["model"] == "ckpt" and len(records[-1]["images"]) == 1
    assert list(logdir.glob("serve_images/*/*.jpg"))

    # A follow-up in English is shown left-to-right; regenerate gives the same greedy answer.
    state = server.add_text(state, "And in English?", None)
    *_, state = server.http_bot(state, "ckpt", 0.0, 0.7, 8)
    assert 'dir="rtl"' not in chatbot_messages(state)[-1]["content"]
    answer = state.messages[-1][-1]
    *_, state = server.http_bot(server.regenerate(state), "ckpt", 0.0, 0.7, 8)
    assert state.messages[-1][-1] == answer
    server.vote(state, "upvote", "ckpt", "127.0.0.1")
    assert json.loads(open(next(logdir.glob("*-conv.json")), encoding="utf-8").readlines()[-1])["type"] == "upvote"


def test_errors_are_shown_in_the_chat(cluster, logdir):
    server = WebServer(cluster.url)
    state = server.add_text(None, "hello", make_image())
    *_, state = server.http_bot(state, "no-such-model", 0.2, 0.7, 8)
    assert state.messages[-1][-1].startswith(SERVER_ERROR_MSG) and "no-such-model" in state.messages[-1][-1]
    long_state = server.add_text(None, "word " * 300, None)  # 1500 characters: kept, but too long for the tiny model
    *_, long_state = server.http_bot(long_state, "ckpt", 0.2, 0.7, 8)
    assert "Exceeds max token length" in long_state.messages[-1][-1]
    assert server.add_text(None, "  ", None).skip_next
    gone = WebServer("http://127.0.0.1:9")
    assert gone.get_model_list() == []
    *_, state = gone.http_bot(gone.add_text(None, "hello", None), "ckpt", 0.2, 0.7, 8)
    # Not "no worker serves model": the controller itself did not answer.
    assert state.messages[-1][-1] == f"{SERVER_ERROR_MSG} (the controller at http://127.0.0.1:9 does not answer)"


def test_nothing_sent_leaves_the_buttons_as_they_were(tmp_path, monkeypatch):
    """Enter on an empty textbox: nothing is generated, yet the chained answer handler enabled voting and
    regenerating on an empty chat (a vote then logged an empty conversation)."""
    pytest.importorskip("gradio")
    from palo.serve.gradio_web_server import build_demo

    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    server = WebServer("http://127.0.0.1:9")
    handlers = {f.name: f.fn for f in build_demo(server, ["ckpt"], "once").fns.values()}
    added = handlers["on_add"](server.new_state(), "", None, "Default")
    assert added[0].skip_next and all(update == {"__type__": "update"} for update in added[4:])
    *_, last = handlers["on_bot"](added[0], "ckpt", 0.2, 0.7, 64, None)
    assert last[1] == [] and all(update == {"__type__": "update"} for update in last[2:])  # left as they were


def test_a_late_page_load_does_not_wipe_the_conversation(tmp_path, monkeypatch):
    """In reload mode the page's load event waits on the controller refreshing every worker; on a busy machine it
    ended after the first message was sent and, as it also reset the conversation, wiped that turn (the next prompt
    lacked it; when it ended between adding the question and answering it, the chat went blank). The load event
    now sets the model list only."""
    pytest.importorskip("gradio")
    import gradio as gr

    from palo.serve.gradio_web_server import build_demo

    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    server = WebServer("http://127.0.0.1:9")
    monkeypatch.setattr(server, "get_model_list", lambda: ["a", "ckpt"])
    demo = build_demo(server, ["ckpt"], "reload")
    on_load = next(f for f in demo.fns.values() if f.name == "on_load")
    assert not any(isinstance(component, gr.State) for component in on_load.outputs)
    assert [getattr(component, "elem_id", None) for component in on_load.outputs] == ["model_selector"]
    update = on_load.fn(None)
    assert update["choices"] == ["a", "ckpt"] and update["value"] == "a"


def test_a_refused_message_says_why_under_the_textbox_and_keeps_the_text(tmp_path, monkeypatch):
    """A typed <image> without an image, or Enter while an answer is open: the handler's gr.Warning never reached the
    browser (the event is not queued), so the text just stayed in the textbox with no reason given. The reason now
    shows under the textbox, escaped (as Markdown its <image> vanished), until a message is sent."""
    pytest.importorskip("gradio")
    from palo.serve.gradio_web_server import build_demo

    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    server = WebServer("http://127.0.0.1:9")
    demo = build_demo(server, ["ckpt"], "once")
    on_add = next(f for f in demo.fns.values() if f.name == "on_add")
    names = [getattr(component, "elem_id", None) for component in on_add.outputs]
    kept = {"__type__": "update"}  # left as the user had it
    shown = dict(zip(names, on_add.fn(server.new_state(), "what is <image> here", None, "Default")))
    assert "&lt;image&gt; marks where the image goes" in shown.get("notice", "")
    assert shown["question"] == kept and shown["imagebox"] == kept
    state = server.add_text(None, "hello", None)  # its answer is still to come
    shown = dict(zip(names, on_add.fn(state, "second question", None, "Default")))
    assert "still being written" in shown["notice"] and shown["question"] == kept
    state.messages[-1][-1] = "Hi."
    shown = dict(zip(names, on_add.fn(state, "second question", None, "Default")))
    assert shown["question"] == "" and shown["notice"] == ""  # sent: the textbox and the notice are cleared


def test_typed_placeholders_are_refused_and_handlers_take_an_empty_conversation(cluster, logdir):
    """A typed <image> used to break the conversation until Clear; handlers crashed on no or an empty state."""
    server = WebServer(cluster.url)
    with pytest.raises(ValueError, match="marks where the image goes"):
        server.add_text(None, "what is <image> here", None)
    state = server.add_text(None, "Look: <image> what is it?", make_image())  # once, with an image: placed there
    assert state.get_prompt().count("<image>") == 1
    *_, state = server.http_bot(state, "ckpt", 0.0, 0.7, 4)
    before = [list(m) for m in state.messages]
    for text, image in (("and <image> this?", None), ("<image> <image>", make_image())):
        with pytest.raises(ValueError, match="marks where the image goes"):
            server.add_text(state, text, image)
        assert [list(m) for m in state.messages] == before
    state = server.add_text(state, "And its colour?", None)
    *_, state = server.http_bot(state, "ckpt", 0.0, 0.7, 4)
    assert not state.messages[-1][-1].startswith(SERVER_ERROR_MSG) and "error_code" not in state.messages[-1][-1]
    # Nothing to answer: each handler returns a conversation, none raises.
    assert list(server.http_bot(None, "ckpt", 0.0, 0.7, 4))[-1].messages == []
    assert list(server.http_bot(server.new_state(), "ckpt", 0.0, 0.7, 4))[-1].messages == []
    assert list(server.http_bot(state, "ckpt", 0.0, 0.7, 4))[-1] is state  # its last answer is already there
    assert server.regenerate(None).skip_next
    server.vote(None, "upvote", "ckpt", None)
    # max_new_tokens below 1 (the slider used to reach 0) asks for one token, not an error.
    state = server.add_text(None, "hello", None)
    *_, state = server.http_bot(state, "ckpt", 0.0, 0.7, 0)
    assert "error_code" not in state.messages[-1][-1]


def test_rtl_detection():
    assert is_rtl("ما هذا؟") and is_rtl("یہ کیا ہے؟") and is_rtl('<img src="x"/> ما هذا')
    assert not is_rtl("What is this? ما") and not is_rtl("这是什么") and not is_rtl("")


def test_the_page_is_served(cluster, tmp_path):
    pytest.importorskip("gradio")
    port = free_port()
    env = dict(os.environ, PALO_LOGDIR=str(tmp_path), GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    web = Service("web", [sys.executable, "palo/serve/gradio_web_server.py", "--controller", cluster.url,
                          "--model-list-mode", "reload", "--port", str(port)],
                  str(tmp_path / "web.out"), env, url=f"http://127.0.0.1:{port}").start()
    try:
        wait_until(lambda: httpx.get(web.url + "/", timeout=2).status_code == 200, 120, "the web server")
        if os.path.exists("/proc/net/tcp"):  # started without --host: loopback only
            assert listening_addresses(port) == {"127.0.0.1"}
        config = httpx.get(web.url + "/config", timeout=10).json()
        props = {c.get("props", {}).get("elem_id"): c for c in config["components"]}
        assert {"chatbot", "imagebox", "question", "send", "regenerate", "clear", "model_selector"} <= set(props)
        assert "ckpt" in json.dumps(props["model_selector"]["props"]["choices"])
        assert "Expected" not in web.log()  # no Gradio argument warnings
    finally:
        web.kill()
    assert os.path.isfile(os.path.join(REPO, "images", "fruits.png"))


def test_a_transparent_upload_reaches_the_model_on_white(tmp_path):
    gr = pytest.importorskip("gradio")
    from gradio.data_classes import ImageData
    from PIL import Image

    from palo.serve.gradio_web_server import build_demo

    server = WebServer("http://127.0.0.1:9")
    imagebox = next(b for b in build_demo(server, ["m"]).blocks.values() if isinstance(b, gr.Image))
    drawing = Image.new("RGBA", (6, 4), (0, 0, 0, 0))  # a black stroke on a transparent background
    drawing.putpixel((1, 1), (0, 0, 0, 255))
    drawing.save(tmp_path / "logo.png")
    uploaded = imagebox.preprocess(ImageData(path=str(tmp_path / "logo.png")))  # what Gradio hands the callback
    state = server.add_text(None, "What does it say?", uploaded)
    sent = state.get_images(return_pil=True)[0]
    assert sent.mode == "RGB" and sent.getpixel((1, 1)) == (0, 0, 0)
    assert sum(sent.getpixel((x, y)) == (255, 255, 255) for x in range(6) for y in range(4)) == 23


def test_a_message_sent_while_an_answer_streams_waits_and_the_turns_stay_paired(cluster, logdir):
    """Enter pressed mid-answer: Gradio hands every handler the session's one state object, so the new message was
    appended under the streaming answer, whose rest then filled the new question's slot (the question was never
    answered; a new image's conversation was lost). Now it is refused until the answer is done."""
    server = WebServer(cluster.url)
    state = server.add_text(None, "Describe the image", make_image())
    stream = server.http_bot(state, "ckpt", 0.0, 1.0, 24)
    for _ in range(3):
        shown = next(stream)
    assert shown.messages[-1][-1].endswith(CURSOR)
    for text, image in (("Second question", None), ("A new picture", make_image("green"))):
        with pytest.raises(ValueError, match="still being written"):
            server.add_text(shown, text, image)
    assert server.regenerate(shown).skip_next and shown.messages[-1][-1].endswith(CURSOR)
    *_, state = stream
    assert len(state.messages) == state.offset + 2 and not state.messages[-1][-1].endswith(CURSOR)
    state = server.add_text(state, "Second question", None)  # once the answer is done
    *_, state = server.http_bot(state, "ckpt", 0.0, 1.0, 4)
    assert [role for role, _ in state.messages[state.offset:]] == [state.roles[0], state.roles[1]] * 2
    assert all(message for _, message in state.messages[state.offset:])


def test_an_answer_left_mid_stream_or_empty_leaves_a_closed_turn(cluster, logdir):
    """The page closed mid-answer (Gradio closes the generator): the cursor stayed in the answer for good. An answer
    that ended before its first word left an empty one, which renders as an open turn in the next prompt."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from serve_helpers import served

    server = WebServer(cluster.url)
    stream = server.http_bot(server.add_text(None, "Describe the image", make_image()), "ckpt", 0.0, 1.0, 24)
    for _ in range(3):
        state = next(stream)
    stream.close()
    assert state.messages[-1][-1] and not state.messages[-1][-1].endswith(CURSOR)

    worker = FastAPI()  # a worker whose answer is end-of-sequence at once

    @worker.post("/worker_generate_stream")
    async def generate(request: Request):
        prompt = (await request.json())["prompt"]
        chunk = json.dumps({"text": prompt, "error_code": 0, "finish_reason": "stop"}).encode() + b"\0"
        return StreamingResponse(iter([chunk]))

    with served(worker) as url:
        server.worker_address = lambda model: url
        *_, state = server.http_bot(server.add_text(None, "Hello", None), "ckpt", 0.0, 1.0, 8)
    assert state.messages[-1][-1] == "(no answer)"
    state = server.add_text(state, "Again?", None)
    assert "ASSISTANT: (no answer)</s>USER: Again? ASSISTANT:" in state.get_prompt()


def test_sessions_saving_the_same_image_at_once_all_succeed(logdir, caplog):
    """An example image clicked by several users at once: they shared one pid-named temp file, moved away under
    the others ('cannot save an image: No such file')."""
    import logging
    import threading

    from PIL import Image

    server = WebServer("http://127.0.0.1:9")
    images = [Image.new("RGB", (32, 32), (i, 2 * i, 3 * i)) for i in range(12)]
    barrier = threading.Barrier(4)

    def save():
        for image in images:
            barrier.wait()
            server._save_images([image])

    with caplog.at_level(logging.ERROR):
        threads = [threading.Thread(target=save) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not [r for r in caplog.records if "cannot save" in r.getMessage()]
    saved = list(logdir.glob("serve_images/*/*"))
    assert len(saved) == 12 and all(p.suffix == ".jpg" for p in saved)
    assert all(Image.open(p).size == (32, 32) for p in saved)


def _recording_worker(answer: str):
    """A worker that answers ``answer`` to every prompt and, as the real one, refuses (error_code 1) a prompt whose
    ``<image>`` placeholders do not match its images; (app, the request bodies it got)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    bodies: list[dict] = []
    worker = FastAPI()

    @worker.post("/worker_generate_stream")
    async def generate(request: Request):
        body = await request.json()
        bodies.append(body)
        if body["prompt"].count("<image>") != len(body["images"]):
            chunk = {"text": "Image features and image tokens do not match", "error_code": 1}
        else:
            chunk = {"text": body["prompt"] + " " + answer, "error_code": 0}
        return StreamingResponse(iter([json.dumps(chunk).encode() + b"\0"]))

    return worker, bodies


def test_a_moderated_message_never_enters_the_conversation(logdir, monkeypatch):
    """With --moderate a flagged text was appended as a user turn (with the refusal as its answer): Regenerate, still
    enabled, then sent it to the worker unchecked, and every later prompt carried it. As in the original demo it now
    leaves the conversation as it was; the refusal is shown under the textbox, where the text stays to be reworded."""
    from serve_helpers import served

    import palo.serve.gradio_web_server as web
    from palo.serve.protocol import MODERATION_MSG

    flagged = {"on": False}
    monkeypatch.setattr(web, "violates_moderation", lambda text, logger=None: flagged["on"])
    worker, bodies = _recording_worker("Fine.")
    with served(worker) as url:
        server = WebServer("http://127.0.0.1:9", moderate=True)
        server.worker_address = lambda model: url
        *_, state = server.http_bot(server.add_text(None, "hello", None), "m", 0.2, 0.7, 8)
        before = [list(m) for m in state.messages]
        flagged["on"] = True
        state = server.add_text(state, "FLAGGED TEXT", make_image())
        assert state.skip_next and [list(m) for m in state.messages] == before
        assert list(server.http_bot(state, "m", 0.2, 0.7, 8))[-1].messages == before and len(bodies) == 1
        flagged["on"] = False
        *_, state = server.http_bot(server.regenerate(state), "m", 0.2, 0.7, 8)  # redoes the answer to "hello"
        *_, state = server.http_bot(server.add_text(state, "next", None), "m", 0.2, 0.7, 8)
        assert len(bodies) == 3 and not any("FLAGGED" in body["prompt"] for body in bodies)
        assert bodies[1]["prompt"].endswith("USER: hello ASSISTANT:")

        pytest.importorskip("gradio")
        handlers = {f.name: f.fn for f in web.build_demo(server, ["m"], "once").fns.values()}
        flagged["on"] = True
        added = handlers["on_add"](state, "FLAGGED TEXT", None, "Default")
        assert added[0] is state and state.skip_next and MODERATION_MSG in added[-1]  # the refusal, under the text
        assert all(update == {"__type__": "update"} for update in added[2:-1])  # the text and image stay
        assert "FLAGGED" not in json.dumps(added[1])  # nor in the chat
        *_, last = handlers["on_bot"](added[0], "m", 0.2, 0.7, 64, None)
        assert len(bodies) == 3


def test_an_answer_that_says_image_placeholder_does_not_break_the_chat(logdir):
    """A model answer holding the literal text "<image>" was kept as it was (only error text was neutralised): every
    later prompt then had one placeholder more than images, and the worker refused every later turn."""
    from serve_helpers import served

    worker, bodies = _recording_worker("The tag is <image> here.")
    with served(worker) as url:
        server = WebServer("http://127.0.0.1:9")
        server.worker_address = lambda model: url
        states = list(server.http_bot(server.add_text(None, "Which tag?", make_image()), "m", 0.2, 0.7, 8))
        state = states[-1]
        assert state.messages[-1][-1] == "The tag is (image) here."
        assert all("<image>" not in str(s.messages[-1][-1]) for s in states)  # not even while it streamed
        for question in ("And the colour?", "hello?"):
            *_, state = server.http_bot(server.add_text(state, question, None), "m", 0.2, 0.7, 8)
            assert "error_code" not in state.messages[-1][-1] and bodies[-1]["prompt"].count("<image>") == 1
        # An answer put into the conversation some other way (a restored state) is neutralised before it is sent.
        state.messages[-1][-1] = "Again <image>."
        *_, state = server.http_bot(server.add_text(state, "last?", None), "m", 0.2, 0.7, 8)
        assert "error_code" not in state.messages[-1][-1] and "Again (image)." in bodies[-1]["prompt"]


def test_a_lone_surrogate_is_refused_and_the_chat_goes_on(logdir):
    """Half an emoji ("\\ud83d", sent by a browser when a paste cuts one in two) entered the conversation: httpx could
    not encode the request, the turn showed a network error, and so did every later turn. It is now refused as a
    moderated text is, with the reason under the textbox, and the conversation stays as it was."""
    from serve_helpers import served

    worker, bodies = _recording_worker("Fine.")
    with served(worker) as url:
        server = WebServer("http://127.0.0.1:9")
        server.worker_address = lambda model: url
        *_, state = server.http_bot(server.add_text(None, "hello", None), "m", 0.2, 0.7, 8)
        before = [list(m) for m in state.messages]
        state, shown = server.submit(state, "what is this \ud83d", None)
        assert state.skip_next and [list(m) for m in state.messages] == before and "lone surrogate" in shown
        shown.encode("utf-8")  # the reason itself can be sent to the browser
        *_, state = server.http_bot(server.add_text(state, "next", None), "m", 0.2, 0.7, 8)
        assert state.messages[-1][-1] == "Fine." and len(bodies) == 2

        pytest.importorskip("gradio")
        import palo.serve.gradio_web_server as web

        handlers = {f.name: f.fn for f in web.build_demo(server, ["m"], "once").fns.values()}
        added = handlers["on_add"](state, "\ud83d", None, "Default")
        assert added[0].skip_next and "lone surrogate" in added[-1]  # the reason, under the textbox
        assert added[2] == {"__type__": "update"}  # the text is not sent back (orjson refuses surrogates)


def test_the_demo_process_refuses_uploads_over_the_pixel_cap_before_decoding(monkeypatch):
    """Gradio decodes an upload before the demo sees it, and only Pillow's own bomb check (~179 MP) stopped it: a
    656 KB PNG of 169 MP took 3 GB to decode. The demo's process now refuses what the worker refuses."""
    import warnings

    from PIL import Image

    from palo.image_io import MAX_IMAGE_PIXELS
    from palo.serve import gradio_web_server as web

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    web.cap_upload_pixels()

    def png(width: int, height: int) -> io.BytesIO:
        buffer = io.BytesIO()
        Image.new("1", (width, height)).save(buffer, format="PNG")  # a few KB: the size is in the header
        buffer.seek(0)
        return buffer

    with pytest.raises(Image.DecompressionBombError):
        Image.open(png(MAX_IMAGE_PIXELS // 8000 + 1, 8000))  # just over the cap: refused from the header
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # as the demo sets it
        assert Image.open(png(MAX_IMAGE_PIXELS // 8000, 8000)).size == (MAX_IMAGE_PIXELS // 8000, 8000)
