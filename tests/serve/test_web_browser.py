"""The web demo in a real browser: headless Chromium drives the Gradio page served by a real process.

The controller and workers are the session's ``cluster``; the web server is started here with the README's flags.
The test uploads a picture it draws, asks in Arabic, waits for the streamed answer and checks that the answer is
laid out right-to-left by the browser itself (computed ``direction``), not only that the HTML asks for it. A
screenshot of the page is kept in pytest's tmp dir and copied to ``test-artifacts/`` at the repository root.

Chromium is Debian's (``apt-get install chromium``, ``/usr/bin/chromium``); Playwright drives it (``pip install
playwright``; its own browser download is not used). A missing browser or Playwright fails the test with the way to
install it: this test is meant to run in CI, never to be skipped quietly.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator

import httpx
import pytest
from serve_helpers import REPO, Service, free_port, make_image, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = os.environ.get("PALO_CHROMIUM", "/usr/bin/chromium")
# The machine's network is closed: without these flags Chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(REPO, "test-artifacts")
QUESTION = "ما الذي في هذه الصورة؟"  # "What is in this picture?"
PAGE_TIMEOUT_MS = 60_000  # one step on the page (load, upload, a whole streamed answer from the tiny model on CPU)

# Set before sending: remembers whether a bot message was ever shown with the streaming cursor.
WATCH_FOR_CURSOR = """() => {
  window.__paloSawCursor = false;
  const chat = document.querySelector('#chatbot');
  new MutationObserver(() => {
    for (const bot of chat.querySelectorAll('[data-testid=bot]'))
      if (bot.innerText.includes('\u258c')) window.__paloSawCursor = true;
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""
# Where a bot message's first paragraph sits in its box: [gap on the left, gap on the right] of its last line of
# text. Right-to-left text ends flush right (a short last line leaves its gap on the left), left-to-right the other way.
FIRST_PARAGRAPH_GAPS = """(bot) => {
  const block = bot.querySelector('p') || bot;
  const range = document.createRange();
  range.selectNodeContents(block);
  const lines = range.getClientRects(), box = block.getBoundingClientRect(), last = lines[lines.length - 1];
  return [last.left - box.left, box.right - last.right];
}"""
# The answer is complete: a bot message with text and no cursor, nothing pending, the buttons enabled again
# (they are enabled once when the question is added, disabled while streaming, and enabled at the end).
ANSWER_DONE = """() => {
  const chat = document.querySelector('#chatbot');
  const bots = chat.querySelectorAll('[data-testid=bot]');
  const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
  return window.__paloSawCursor && text && !text.includes('\u258c') && !chat.querySelector('.pending')
    && !document.querySelector('#regenerate').disabled;
}"""


def _sync_playwright():
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"headless Chromium is needed at {CHROMIUM} for the browser test: install it with "
                    "`apt-get update && apt-get install -y chromium` (or point PALO_CHROMIUM at a Chromium binary)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is needed for the browser test: `pip install playwright` (the browser itself is "
                    "Debian's chromium, so `playwright install` is not needed)")
    return sync_playwright


@pytest.fixture
def web(cluster, tmp_path) -> Iterator[Service]:
    """The Gradio web server as the README starts it, pointed at the session's controller."""
    port = free_port()
    env = dict(os.environ, PALO_LOGDIR=str(tmp_path / "logs"), GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    service = Service("web", [sys.executable, "palo/serve/gradio_web_server.py", "--controller", cluster.url,
                              "--model-list-mode", "reload", "--port", str(port)],
                      str(tmp_path / "web.out"), env, url=f"http://127.0.0.1:{port}").start()
    try:
        def up() -> bool:
            if not service.alive():
                raise RuntimeError(f"the web server exited early:\n{service.log()[-3000:]}")
            return httpx.get(service.url + "/", timeout=2).status_code == 200

        wait_until(up, 120, "the web server")
        yield service
    finally:
        service.kill()


def _set_number(page, label: str, value: float, attempts: int = 5) -> None:
    """Type a value into a Gradio slider's number box, as a user would, until the slider takes it.

    Right after the Parameters accordion opens, Gradio may still be mounting the slider and re-render the box with
    its initial value, dropping what was typed (seen on a loaded machine): like a user, type it again.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.get_by_label(f"number input for {label}")
    slider = page.get_by_label(f"range slider for {label}")
    for attempt in range(attempts):
        box.fill(str(value))
        box.press("Enter")
        # The range slider follows only once the component's value (what is sent to the server) has changed.
        try:
            page.wait_for_function("([range, v]) => Number(range.value) === v", arg=[slider.element_handle(), value],
                                   timeout=5_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise


def _save_screenshot(page, tmp_path, name: str) -> str:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    os.makedirs(ARTIFACTS, exist_ok=True)
    return shutil.copy(path, os.path.join(ARTIFACTS, name))


def test_arabic_answer_is_streamed_and_shown_right_to_left(web, tmp_path):
    sync_playwright = _sync_playwright()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    picture = tmp_path / "shapes.png"
    make_image("red", (192, 128)).save(picture)

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000}, timeout=PAGE_TIMEOUT_MS)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            try:
                page.goto(web.url + "/", wait_until="domcontentloaded")
                # The model list is loaded from the controller on page load (--model-list-mode reload).
                page.wait_for_function(
                    "() => document.querySelector('#model_selector input')?.value === 'ckpt'")

                page.locator("#imagebox input[type=file]").set_input_files(str(picture))
                page.locator("#imagebox img").first.wait_for(state="visible")
                # Greedy decoding and a short answer: the same answer on every run (sampling can end it at once).
                page.get_by_text("Parameters").first.click()
                _set_number(page, "Temperature", 0)
                _set_number(page, "Max output tokens", 64)
                page.locator("#question textarea").fill(QUESTION)
                page.evaluate(WATCH_FOR_CURSOR)
                page.locator("#send").click()

                # The question appears at once; the answer streams in behind a cursor until it is complete.
                chat = page.locator("#chatbot")
                chat.get_by_text(QUESTION).first.wait_for(state="visible")
                try:
                    page.wait_for_function(ANSWER_DONE)
                except PlaywrightTimeout:
                    pytest.fail(f"no complete answer within {PAGE_TIMEOUT_MS} ms; the chat shows:\n{chat.inner_text()}"
                                f"\nweb server log:\n{web.log()[-3000:]}")
                assert page.evaluate("() => window.__paloSawCursor"), "the answer was never shown while streaming"

                # Shown right-to-left without markup in the message (Gradio's copy button copied a <div dir=rtl>
                # with the text): the answer's first paragraph ends flush right, its short last line's gap on
                # the left, whatever letter the tiny model's answer starts with (it follows an Arabic question).
                assert chat.locator("[dir=rtl]").count() == 0, chat.inner_html()
                answer = chat.locator("[data-testid=bot]").last
                answer_text = answer.inner_text().strip()
                assert answer_text and "▌" not in answer_text and QUESTION not in answer_text, answer_text
                left_gap, right_gap = answer.evaluate(FIRST_PARAGRAPH_GAPS)
                assert right_gap < 2 and left_gap > right_gap, (left_gap, right_gap, answer_text)
                assert page.locator("#chatbot img").count() >= 1  # the uploaded picture is shown in the chat
            finally:
                # Kept on failure too: the page as it was is the best clue to what went wrong.
                print(f"screenshot: {_save_screenshot(page, tmp_path, 'web_browser_arabic_rtl.png')}")
        finally:
            context.close()
