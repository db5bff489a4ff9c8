"""The web demo: its chat flow against the live cluster, and the page served by a real process."""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest
from fastapi import Request  # at module level: FastAPI resolves a route's string annotations in its globals
from serve_helpers import REPO, Service, free_port, listening_addresses, make_image, wait_until

from palo.serve.gradio_web_server import CURSOR, RLM, WebServer, chatbot_messages, is_rtl
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
    # Shown right-to-left without markup (Gradio's copy buttons copied it): the question's own first letter sets its
    # direction, the answer starts with an invisible right-to-left mark, whatever its own first letter.
    assert not any("dir=" in m["content"] for m in shown)
    assert shown[1]["content"] == RLM + state.messages[-1][-1] and not shown[0]["content"].startswith(RLM)
    assert "data:image/png;base64," in shown[0]["content"]
    records = [json.loads(line) for line in open(next(logdir.glob("*-conv.json")), encoding="utf-8")]
    assert records[-1]["type"] == "chat" and records[-1]["model"] == "ckpt" and len(records[-1]["images"]) == 1
    assert list(logdir.glob("serve_images/*/*.jpg"))

    # A follow-up in English is shown left-to-right; regenerate gives the same greedy answer.
    state = server.add_text(state, "And in English?", None)
    *_, state = server.http_bot(state, "ckpt", 0.0, 0.7, 8)
    assert not chatbot_messages(state)[-1]["content"].startswith(RLM)
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
    now sets the model list only, and keeps a model picked meanwhile (it put the first one back)."""
    pytest.importorskip("gradio")
    from types import SimpleNamespace

    import gradio as gr

    from palo.serve.gradio_web_server import build_demo

    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    server = WebServer("http://127.0.0.1:9")
    monkeypatch.setattr(server, "get_model_list", lambda: ["a", "ckpt"])
    demo = build_demo(server, ["ckpt"], "reload")
    on_load = next(f for f in demo.fns.values() if f.name == "on_load")
    assert not any(isinstance(component, gr.State) for component in on_load.outputs)
    assert [getattr(component, "elem_id", None) for component in on_load.outputs] == ["model_selector"]
    # A model the user may have picked before the list came is left as it is, unless it is gone or ?model= names one.
    update = on_load.fn("ckpt", None)
    assert update["choices"] == ["a", "ckpt"] and "value" not in update
    assert on_load.fn("gone", None)["value"] == "a"
    asked = SimpleNamespace(query_params={"model": "ckpt"})
    assert on_load.fn("a", asked)["value"] == "ckpt"


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
    demo = build_demo(server, ["m"])
    imagebox = next(b for b in demo.blocks.values() if isinstance(b, gr.Image))
    on_add = next(f.fn for f in demo.fns.values() if f.name == "on_add")
    drawing = Image.new("RGBA", (6, 4), (0, 0, 0, 0))  # a black stroke on a transparent background
    drawing.putpixel((1, 1), (0, 0, 0, 255))
    drawing.save(tmp_path / "logo.png")
    uploaded = imagebox.preprocess(ImageData(path=str(tmp_path / "logo.png")))  # what Gradio hands the callback
    state = on_add(server.new_state(), "What does it say?", uploaded, "Default")[0]
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


def test_an_unreadable_upload_is_refused_under_the_textbox_before_anything_decodes_it(tmp_path, monkeypatch):
    """Gradio decoded the upload before the demo saw it: a corrupt, non-image or oversized file failed there, and the
    page showed a bare "Error" over the chat, the reason only in the server log (a 169 MP PNG of 656 KB also took 3
    GB to decode). The image box now hands over the file's path; on_add reads it as every path reads images and
    says why it cannot, under the textbox, the text and the image left for the user to change."""
    pytest.importorskip("gradio")
    from PIL import Image

    from palo.image_io import MAX_IMAGE_PIXELS
    from palo.serve.gradio_web_server import build_demo

    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path / "logs"))
    server = WebServer("http://127.0.0.1:9")
    from gradio.data_classes import ImageData

    on_add = next(f for f in build_demo(server, ["ckpt"], "once").fns.values() if f.name == "on_add")
    names = [getattr(component, "elem_id", None) for component in on_add.outputs]
    imagebox = next(component for component in on_add.inputs if getattr(component, "elem_id", None) == "imagebox")
    make_image("red", (40, 30)).save(tmp_path / "fine.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "fine.png").read_bytes()[:60])  # the header, then nothing
    Image.new("1", (MAX_IMAGE_PIXELS // 8000 + 1, 8000)).save(tmp_path / "huge.png")  # a few KB: the size is in
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # over Pillow's own limit: Image.open refuses it
    (tmp_path / "text.png").write_text("not an image")  # its header, and nothing decodes it
    for name, reason in (("cut.png", "cut.png: not a readable image"),
                         ("huge.png", f"huge.png: {MAX_IMAGE_PIXELS // 8000 + 1}x8000 pixels is over the limit"),
                         ("bomb.png", f"bomb.png: over the limit of {MAX_IMAGE_PIXELS:,} pixels"),
                         ("text.png", "text.png: not a readable image")):
        state = server.new_state()
        # Through the image box's own preprocessing, as Gradio runs it before the handler (it opened the file and
        # failed there for text.png and bomb.png, with Gradio's error and its temporary path).
        path = imagebox.preprocess(ImageData(path=str(tmp_path / name), orig_name=name))
        assert path == str(tmp_path / name)
        shown = dict(zip(names, on_add.fn(state, "What is it?", path, "Default")))
        assert reason in shown["notice"] and str(tmp_path) not in shown["notice"], shown["notice"]
        assert shown["question"] == {"__type__": "update"} and shown["imagebox"] == {"__type__": "update"}
        assert state.messages == []
    state = server.new_state()
    shown = dict(zip(names, on_add.fn(state, "What is it?", str(tmp_path / "fine.png"), "Default")))
    assert shown["notice"] == "" and shown["question"] == "" and shown["imagebox"] is None
    assert state.get_images(return_pil=True)[0].size == (40, 30)


def test_a_second_send_while_the_answer_waits_in_the_queue_loses_nothing(logdir):
    """A send refused because the answer was still open (a second Enter while the first question waited in Gradio's
    queue) marked the shared conversation as "nothing to answer": the queued answer handler then skipped it, the
    question was never sent, and the tab stayed locked ("still being written", every button off) until a reload.
    The open answer is now generated once, by whichever handler claims it, and the buttons come back."""
    pytest.importorskip("gradio")
    from serve_helpers import served

    from palo.serve.gradio_web_server import build_demo

    worker, bodies = _recording_worker("Fine.")
    with served(worker) as url:
        server = WebServer("http://127.0.0.1:9")
        server.worker_address = lambda model: url
        demo = build_demo(server, ["m"], "once")
        handlers = {f.name: f.fn for f in demo.fns.values()}
        names = [getattr(c, "elem_id", None) for c in next(f for f in demo.fns.values() if f.name == "on_add").outputs]
        state = handlers["on_add"](server.new_state(), "first question", None, "Default")[0]
        empty = dict(zip(names, handlers["on_add"](state, "", None, "Default")))  # Enter on the emptied textbox
        assert empty["notice"] == {"__type__": "update"}  # nothing typed: nothing to say either
        second = dict(zip(names, handlers["on_add"](state, "second question", None, "Default")))
        assert "still being written" in second["notice"] and second["question"] == {"__type__": "update"}
        # Each send chained an answer handler: the refused one happens to run first, then the queued one.
        for _ in range(2):
            *_, last = handlers["on_bot"](state, "m", 0.2, 0.7, 64, None)
        assert len(bodies) == 1 and bodies[0]["prompt"].endswith("USER: first question ASSISTANT:")
        assert [m[1] for m in state.messages] == ["first question", "Fine."]
        assert not server.claim(state) and handlers["on_add"](state, "second question", None, "Default")[-1] == ""


def test_votes_stay_off_after_an_error_and_the_chats_trash_icon_clears_the_conversation(logdir):
    """Votes were enabled on an error answer (and logged it as a rated answer); the original demo keeps only
    Regenerate and Clear. Gradio's trash icon on the chat emptied the screen but not the conversation: the next
    question carried the old one to the worker."""
    pytest.importorskip("gradio")
    import gradio as gr

    from palo.serve.gradio_web_server import build_demo

    server = WebServer("http://127.0.0.1:9")
    server.worker_address = lambda model: ""  # no worker serves it: the answer is an error
    demo = build_demo(server, ["m"], "once")
    handlers = {f.name: f.fn for f in demo.fns.values()}
    state = handlers["on_add"](server.new_state(), "hello", None, "Default")[0]
    *_, last = handlers["on_bot"](state, "m", 0.2, 0.7, 64, None)
    assert state.messages[-1][1].startswith(SERVER_ERROR_MSG)
    assert [update["interactive"] for update in last[2:7]] == [False, False, False, True, True]
    chatbot = next(b for b in demo.blocks.values() if isinstance(b, gr.Chatbot))
    assert "share" not in chatbot.buttons  # it posts to a Hugging Face Space's discussions; nothing happened here
    on_trash = [f for f in demo.fns.values() if any(t[0] == chatbot._id and t[1] == "clear" for t in f.targets)]
    assert [f.name for f in on_trash if f.name] == ["on_clear"]
    by_id = {f._id: f for f in demo.fns.values()}
    assert {by_id[i].name for f in on_trash for i in f.cancels} == {"on_bot"}  # an answer being written stops


@pytest.mark.parametrize("status, body, shown", [
    (503, b'{"detail": "Service Unavailable"}', f"{SERVER_ERROR_MSG} (error_code: 4)"),  # not PALO's: a proxy
    (404, b"<html>Not Found</html>", f"{SERVER_ERROR_MSG} (error_code: 4)"),  # a port another service took
    (503, None, "overloaded, retry (error_code: 3)"),  # PALO's own error chunk, sent with its status
])
def test_an_http_error_from_the_worker_address_is_an_error_not_an_empty_answer(logdir, status, body, shown):
    """A JSON body that is not a protocol chunk was read as an empty piece of the answer: "(no answer)", logged as a
    chat and offered for votes."""
    from palo.serve.gradio_web_server import answer_failed
    from palo.serve.protocol import encode_chunk

    content = body if body is not None else encode_chunk("overloaded, retry", 3)
    server = WebServer("http://127.0.0.1:9")
    server.worker_address = lambda model: "http://worker"
    server.http = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(status, content=content)))
    *_, state = server.http_bot(server.add_text(None, "hello", None), "ckpt", 0.2, 0.7, 8)
    assert state.messages[-1][1] == shown and answer_failed(state)
    assert not os.path.exists(server._conv_log())  # no chat record of an answer that never came
