"""Log-likelihood scoring (lmms-eval's ``loglikelihood`` requests) on a tiny checkpoint: the one-pass score equals
the sum of next-token log-probabilities computed one prefix at a time, greedy continuations are recognised as
greedy, and the continuation is found by tokenising context and continuation together."""

from __future__ import annotations

import pytest
import torch

from palo.constants import IMAGE_TOKEN_INDEX
from palo.conversation import conv_templates
from palo.eval.lmms.scoring import continuation_start, score_continuation
from palo.mm_utils import tokenizer_image_token
from palo.model.builder import load_pretrained_model


@pytest.fixture(scope="module")
def loaded(world):
    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cpu")
    return tokenizer, model.eval()


def _prompt(question: str) -> str:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def _by_prefixes(model, ids: list[int], start: int, images) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one forward pass per prefix."""
    total = 0.0
    with torch.no_grad():
        for t in range(start, len(ids)):
            logits = model(input_ids=torch.tensor([ids[:t]]), images=images).logits[0, -1]
            total += float(torch.log_softmax(logits.float(), -1)[ids[t]])
    return total


def test_continuation_start_takes_the_joint_tokenisation():
    assert continuation_start([1, 5, 6], [1, 5, 6, 7, 8]) == 3
    # The boundary token changed when tokenised together: the continuation starts where the two differ.
    assert continuation_start([1, 5, 6], [1, 5, 9, 7]) == 2
    with pytest.raises(ValueError, match="empty"):
        continuation_start([1, 5, 6], [1, 5, 6])
    with pytest.raises(ValueError, match="image"):
        continuation_start([1, 5], [1, 5, IMAGE_TOKEN_INDEX, 3])


def test_score_equals_prefix_by_prefix_log_probabilities(loaded):
    tokenizer, model = loaded
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    prompt = _prompt("¿De qué color es el círculo?")
    context = tokenizer_image_token(prompt, tokenizer)
    full = tokenizer_image_token(prompt + " Es rojo y pequeño.", tokenizer)
    start = continuation_start(context, full)
    score = score_continuation(model, context, full, images)
    assert score.num_tokens == len(full) - start >= 3
    assert score.logprob == pytest.approx(_by_prefixes(model, full, start, images), abs=1e-4)
    assert score.logprob < 0


def test_greedy_continuation_is_greedy_and_most_likely(loaded):
    tokenizer, model = loaded
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    context = tokenizer_image_token(_prompt("这是什么形状？"), tokenizer)
    with torch.no_grad():
        out = model.generate(torch.tensor([context]), images=images, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    greedy = out[0, -4:].tolist()
    best = score_continuation(model, context, context + greedy, images)
    assert best.is_greedy and best.num_tokens == 4
    other = greedy[:-1] + [(greedy[-1] + 1) % len(tokenizer)]
    worse = score_continuation(model, context, context + other, images)
    assert not worse.is_greedy and worse.logprob < best.logprob
    # Text only: the same contract without images.
    text_context = tokenizer_image_token(_prompt("Hello").replace("<image>\n", ""), tokenizer)
    assert IMAGE_TOKEN_INDEX not in text_context
    plain = score_continuation(model, text_context, text_context + greedy[:2])
    assert plain.num_tokens == 2 and plain.logprob < 0


class _Request:
    def __init__(self, *args):
        self.args = args


def test_scoring_requests_unpack_options_and_targets():
    """multiple_choice sends each option as text; loglikelihood sends doc_to_target, called on the document."""
    from PIL import Image

    from palo.eval.lmms.requests import to_scorings

    docs = {"t": {"test": [{"q": "colour?", "a": "red"}, {"q": "two", "a": 2}]}}
    image = Image.new("L", (4, 4))
    with_image = lambda doc: [image]  # noqa: E731
    got = to_scorings([_Request("colour?", " red", with_image, 0, "t", "test"),
                       _Request("colour?", lambda doc: doc["a"], None, 0, "t", "test")], docs)
    # A loglikelihood task's target comes without the delimiter: it follows "ASSISTANT:" after a space all the same
    # (it was scored as "ASSISTANT:red", a text the model never saw, and the API adapter gave another value).
    assert [(s.context, s.continuation, s.where) for s in got] == [("colour?", " red", "t/test/0"),
                                                                  ("colour?", " red", "t/test/0")]
    assert [i.mode for i in got[0].images] == ["RGB"] and got[1].images == ()
    with pytest.raises(ValueError, match="t/test/1: the continuation to score must be text"):
        to_scorings([_Request("two", lambda doc: doc["a"], None, 1, "t", "test")], docs)
    [two] = to_scorings([_Request("colour?", " red", lambda doc: [image, Image.new("RGB", (2, 2))], 0, "t", "test")],
                        docs)
    assert [i.size for i in two.images] == [(4, 4), (2, 2)]  # several images, in the task's order
    with pytest.raises(ValueError, match="t/test/0: a visual of type str; PALO takes images only"):
        to_scorings([_Request("colour?", " red", lambda doc: ["clip.mp4"], 0, "t", "test")], docs)


def test_task_images_are_read_as_every_other_path_reads_them():
    """A chart with a transparent background and a phone photo, as lmms-eval's datasets decode them."""
    import io

    from PIL import Image

    from palo.eval.lmms.requests import to_prompts, to_scorings

    chart = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # black text on a transparent background
    chart.putpixel((1, 1), (0, 0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to show
    buffer = io.BytesIO()
    Image.new("RGB", (4, 2), (0, 0, 255)).save(buffer, "JPEG", exif=exif)
    photo = Image.open(io.BytesIO(buffer.getvalue()))
    docs = {"t": {"test": [{"q": "?"}]}}
    visuals = lambda doc: [chart, photo]  # noqa: E731
    [prompt] = to_prompts([_Request("?", {"max_new_tokens": 4}, visuals, 0, "t", "test")], docs, 8)
    [scoring] = to_scorings([_Request("?", " a", visuals, 0, "t", "test")], docs)
    for shown_chart, shown_photo in (prompt.images, scoring.images):
        assert shown_chart.mode == "RGB" and shown_chart.getpixel((0, 0)) == (255, 255, 255)
        assert shown_chart.getpixel((1, 1)) == (0, 0, 0)
        assert shown_photo.mode == "RGB" and shown_photo.size == (2, 4)


def test_a_score_past_the_training_cut_is_the_whole_continuations(loaded):
    """The forward cut the spliced sequence at tokenizer_model_max_length (training's), and the rows read as the
    continuation's were then the prompt's: a wrong score, silently, where the engine's path scored it whole."""
    tokenizer, model = loaded
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    context = tokenizer_image_token(_prompt("¿De qué color es?"), tokenizer)
    full = tokenizer_image_token(_prompt("¿De qué color es?") + " Es rojo y pequeño.", tokenizer)
    whole = score_continuation(model, context, full, images)
    saved = model.config.tokenizer_model_max_length
    model.config.tokenizer_model_max_length = len(full)  # under the spliced length: the image rows count too
    try:
        assert score_continuation(model, context, full, images).logprob == pytest.approx(whole.logprob, abs=1e-5)
    finally:
        model.config.tokenizer_model_max_length = saved


def test_image_markers_a_task_writes_into_its_text_are_taken_out():
    """MMMU and MM-Vet (interleaved) write <image> into their text: with the adapters' own placeholder per image the
    prompt had one too many, and every such task failed (the API refuses the marker in message text)."""
    from PIL import Image

    from palo.eval.lmms.requests import to_prompts, to_scorings

    docs = {"t": {"test": [{}]}}
    one = lambda doc: [Image.new("RGB", (2, 2))]  # noqa: E731
    [prompt] = to_prompts([_Request("Look at <image>\nWhich colour?", {}, one, 0, "t", "test")], docs, 8)
    [scoring] = to_scorings([_Request("<image> Which colour?", "red", one, 0, "t", "test")], docs)
    assert (prompt.text, scoring.context) == ("Look at Which colour?", "Which colour?")
    with pytest.raises(ValueError, match=r"t/test/0: the task's text places 2 <image> but gives 1 image"):
        to_prompts([_Request("<image> and <image>?", {}, one, 0, "t", "test")], docs, 8)
