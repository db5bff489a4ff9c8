"""``palo.llm.LLM``: many conversations answered together in Python, as ``model.generate`` answers each alone."""

from __future__ import annotations

import base64
import pathlib
import time

import pytest
from PIL import Image, ImageDraw

from palo.conversation import conv_templates
from palo.llm import LLM
from palo.mm_utils import load_image, process_images, tokenizer_image_token
from palo.model.builder import load_pretrained_model

QUESTIONS = ["What is this?", "这是什么？", "এটা কী?", "Qu'est-ce que c'est ?", "ما هذا؟"]


@pytest.fixture(scope="module")
def llm(world):
    tokenizer, model, processor, context_len = load_pretrained_model(world.full_dir, device="cpu")
    return LLM.from_loaded(tokenizer, model.eval(), processor, context_len)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    image = Image.new("RGB", (80, 60), "white")
    ImageDraw.Draw(image).ellipse((6, 6, 50, 50), fill="purple")
    path = tmp_path_factory.mktemp("images") / "photo.png"
    image.save(path)
    return str(path)


def user(text: str, *images: dict) -> list[dict]:
    return [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]


def alone(llm: LLM, question: str, image_path: str | None, max_new_tokens: int) -> str:
    """What ``model.generate`` answers to the question alone, greedy, rendered as the worker renders it."""
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], ("<image>\n" if image_path else "") + question)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), llm.tokenizer, return_tensors="pt")[None]
    images = None
    if image_path:
        images = process_images([load_image(image_path)], llm.backend.image_processor, llm.model.config)
    out = llm.model.generate(ids, images=images, max_new_tokens=max_new_tokens, do_sample=False)
    return llm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_conversations_answered_together_are_generates_answers_alone(llm, photo):
    conversations = [user(q, {"type": "image", "image": photo}) for q in QUESTIONS] + [user("Hello, who are you?")]
    answers = llm.chat(conversations, max_tokens=10)
    assert len(answers) == 6 and all(a.finish_reason in ("stop", "length") for a in answers)
    for question, answer in zip(QUESTIONS, answers):
        assert answer.text == alone(llm, question, photo, 10).strip() and answer.completion_tokens >= 1
    assert answers[-1].text == alone(llm, "Hello, who are you?", None, 10).strip()
    # The image's positions count in the prompt.
    assert answers[0].prompt_tokens > llm.backend.image_token_count > 0 and answers[-1].prompt_tokens > 0
    # One image asked in five languages: the later questions read its KV from the prefix cache.
    again = llm.chat(conversations[0], max_tokens=10)
    assert len(again) == 1 and again[0].text == answers[0].text and again[0].cached_tokens > 0


def test_an_image_as_a_path_a_pil_image_or_a_data_url_is_the_same_image(llm, photo, tmp_path):
    """Compared by the answers' log-probabilities, which move with every pixel (a tiny random model's greedy words
    hardly depend on the image)."""
    data = base64.b64encode(open(photo, "rb").read()).decode()
    other = tmp_path / "other.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    parts = [{"type": "image", "image": photo}, {"type": "image", "image": Image.open(photo)},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}},
             {"type": "image", "image": str(other)}, {"type": "image", "image": pathlib.Path(photo)},
             {"type": "image_url", "image_url": {"url": "DATA:IMAGE/PNG;BASE64," + data}}]
    answers = llm.chat([user("Describe it.", part) for part in parts], max_tokens=4, logprobs=0)
    scores = [[logprob for logprob, _ in answer.logprobs] for answer in answers]
    assert answers[0].text == alone(llm, "Describe it.", photo, 4).strip()
    for same in (1, 2, 4, 5):  # a PIL image, a data URL, a pathlib.Path, a data URL's scheme in capitals
        assert scores[same] == pytest.approx(scores[0], abs=1e-5), parts[same]
    assert scores[3] != pytest.approx(scores[0], abs=1e-5)  # the mirrored photo is another image


def test_generate_continues_a_finished_prompt_as_chat_does(llm, photo):
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is this?")
    conv.append_message(conv.roles[1], None)
    (raw,) = llm.generate(conv.get_prompt(), [[photo]], max_tokens=8, stop="</s>")
    (chat,) = llm.chat(user("What is this?", {"type": "image", "image": photo}), max_tokens=8)
    # The same tokens; the prompt's continuation keeps the space its first word brings ("ASSISTANT:" + " The"), the
    # chat answer starts without it, as the original's.
    assert raw.text.lstrip() == chat.text and raw.prompt_tokens == chat.prompt_tokens


def test_a_continued_prompt_keeps_the_space_of_its_first_word(llm):
    """'The capital of France is' went on as 'The The': the answer was decoded alone, and SentencePiece drops a
    text's leading space. Its text is now what it adds to the prompt's (vLLM's rule), and a chat answer is as before."""
    tokenizer = llm.backend.tokenizer
    word = next(i for i in range(len(tokenizer)) if tokenizer.convert_ids_to_tokens(i).startswith("\u2581")
                and tokenizer.convert_ids_to_tokens(i)[1:].isalpha() and len(tokenizer.convert_ids_to_tokens(i)) > 3)
    prompt = "La capitale de la France est"
    (raw,) = llm.generate(prompt, max_tokens=3, logit_bias={str(word): 100})
    ids = tokenizer(prompt).input_ids
    assert raw.text.startswith(" ")
    assert prompt + raw.text == tokenizer.decode(ids + [word] * 3, skip_special_tokens=True)
    (chat,) = llm.chat(user("Bonjour"), max_tokens=3, logit_bias={str(word): 100})
    assert chat.text == raw.text[1:]


def test_stop_strings_and_seeded_sampling(llm, photo):
    conversation = user("Describe the picture.", {"type": "image", "image": photo})
    (free,) = llm.chat(conversation, max_tokens=16)
    stop = free.text[len(free.text) // 2:][:2]
    assert len(free.text) > 4 and stop
    (cut,) = llm.chat(conversation, max_tokens=16, stop=[stop, "never seen"])
    assert cut.text == free.text[:free.text.find(stop)] and cut.finish_reason == "stop"
    sampled = [llm.chat(conversation, max_tokens=12, temperature=1.0, seed=seed)[0].text for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_bad_input_is_refused_naming_the_conversation_before_anything_runs(llm, photo, tmp_path):
    good = user("hi")
    before = llm.backend.stats()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    cases = [
        ([good, [{"role": "assistant", "content": "hi"}]], "conversation 1: .*must be the user's"),
        ([good, user("x", {"type": "image", "image": str(tmp_path / "missing.png")})],
         "conversation 1: .*no such image"),
        ([user("x", {"type": "image", "image": str(broken)})], "conversation 0: .*not a readable image"),
        ([user("x", {"type": "image", "image": 7})], "conversation 0: .*an image part needs"),
        ([user("x", {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})],
         "conversation 0: .*does not fetch image URLs"),
        ([user("x", {"type": "audio"})], "conversation 0: .*unsupported content part"),
    ]
    for conversations, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.chat(conversations)
    for settings, message in [({"temperature": -1}, "'temperature' must be >= 0"), ({"top_p": 1.5}, "'top_p'"),
                              ({"stop": [""]}, "'stop' must be"), ({"max_tokens": 0}, "max_tokens must be")]:
        with pytest.raises(ValueError, match=message):
            llm.chat(good, **settings)
    with pytest.raises(ValueError, match="prompt 0: 0 image.* for 1 <image>"):
        llm.generate("USER: <image>\nhi ASSISTANT:")
    with pytest.raises(ValueError, match="1 image lists for 2 prompts"):
        llm.generate(["a", "b"], [[photo]])
    huge = Image.new("RGB", (9000, 8000))
    with pytest.raises(ValueError, match="over the limit"):
        llm.chat(user("x", {"type": "image", "image": huge}))
    with pytest.raises(ValueError, match="conversation 1: .*no room is left for an answer"):
        llm.chat([good, user("word " * 5000)])  # the first is checked too, and not started before the second
    # Nothing ran, not even the good conversations before a bad one: no token decoded, no image encoded.
    time.sleep(0.2)
    after = llm.backend.stats()
    assert [after[k] for k in ("decoded_tokens", "images_encoded", "running", "waiting")] == \
        [before[k] for k in ("decoded_tokens", "images_encoded")] + [0, 0]


def test_a_checkpoint_path_loads_and_answers(world, photo):
    """The constructor's own loading path (the checkpoint folder, the template read from its config)."""
    from palo.engine import EngineClosed

    with LLM(world.full_dir, device="cpu") as llm:
        assert llm.conv_mode == "vicuna_v1"
        (answer,) = llm.chat(user("What is this?", {"type": "image", "image": photo}), max_tokens=6)
        assert answer.text == alone(llm, "What is this?", photo, 6).strip()
    with pytest.raises(EngineClosed):
        llm.chat(user("hi"))
    with pytest.raises(ValueError, match="unknown conv_mode"):
        LLM.from_loaded(llm.tokenizer, llm.model, None, conv_mode="nope")


def test_more_conversations_than_the_engine_queues_are_fed_to_it_as_places_free(llm, world, photo):
    """The engine refuses requests past its waiting limit; chat() keeps that many in flight and gives the rest as
    places free, with the answers of an engine that took them all at once."""
    from palo.engine import EngineConfig

    small = LLM.from_loaded(llm.tokenizer, llm.model, llm.backend.image_processor,
                            engine_config=EngineConfig(max_num_seqs=2, max_waiting=2))
    conversations = [user(q, {"type": "image", "image": photo}) for q in QUESTIONS] + [user(q) for q in QUESTIONS]
    answers = small.chat(conversations, max_tokens=6)
    assert [a.text for a in answers] == [a.text for a in llm.chat(conversations, max_tokens=6)]
    assert max(small.backend.batch_sizes) <= 2
    # A time-out cancels what still runs (12 answers of 500 tokens, 2 at a time, would take seconds more): the
    # engine is idle and every KV block is back a moment later.
    with pytest.raises(TimeoutError):
        small.chat(conversations, max_tokens=500, ignore_eos=True, timeout=0.2)
    time.sleep(0.3)
    stats = small.backend.stats()
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0)
    small.close()


def test_calls_from_several_threads_share_the_engines_queue(llm, photo):
    """Each call kept its own requests under the engine's waiting limit but not the others': two threads calling at
    once both failed with QueueFull, and so did a call made right after a timed-out one (whose cancelled requests
    still counted as waiting). A call that finds the queue full of others' requests waits for room."""
    import threading

    from palo.engine import EngineConfig

    small = LLM.from_loaded(llm.tokenizer, llm.model, llm.backend.image_processor,
                            engine_config=EngineConfig(max_num_seqs=2, max_waiting=2))
    conversations = [user(q, {"type": "image", "image": photo}) for q in QUESTIONS] + [user(q) for q in QUESTIONS]
    expected = [a.text for a in llm.chat(conversations, max_tokens=4)]
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def call(index: int) -> None:
        try:
            results[index] = [a.text for a in small.chat(conversations, max_tokens=4)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and results == {i: expected for i in range(3)}
    with pytest.raises(TimeoutError):
        small.chat(conversations, max_tokens=500, ignore_eos=True, timeout=0.2)
    assert [a.text for a in small.chat(conversations, max_tokens=4)] == expected  # at once after the time-out
    small.close()


def test_an_llm_dropped_without_close_stops_its_engine(llm):
    """Its engine thread ran on (holding the model and the KV cache) until the process ended: a notebook cell that
    makes an LLM, run again, kept every earlier one."""
    import gc

    dropped = LLM.from_loaded(llm.tokenizer, llm.model, llm.backend.image_processor)
    dropped.generate("USER: hi ASSISTANT:", max_tokens=2)
    engine = dropped.backend.engine
    assert engine.is_running()
    del dropped
    gc.collect()
    assert not engine.is_running()


def test_temperature_none_is_greedy_and_max_tokens_goes_up_to_the_context(llm, monkeypatch):
    """temperature=None sampled at the worker's default of 1; max_tokens past 1024 (the original worker's cap) ended
    there as if at its budget."""
    (greedy,) = llm.generate("USER: Tell me a story. ASSISTANT:", max_tokens=8)
    assert [llm.generate("USER: Tell me a story. ASSISTANT:", max_tokens=8, temperature=None, seed=seed)[0].text
            for seed in (1, 2)] == [greedy.text] * 2
    monkeypatch.setattr(llm.model.config, "max_position_embeddings", 1200)
    with LLM.from_loaded(llm.tokenizer, llm.model, None, context_len=1200) as longer:
        (answer,) = longer.generate("USER: Tell me a story. ASSISTANT:", max_tokens=1100, ignore_eos=True)
    assert (answer.completion_tokens, answer.finish_reason) == (1100, "length")
    # vLLM's top_k=-1 ("no limit") was refused; it is top_k 0.
    assert llm.generate("USER: hi ASSISTANT:", max_tokens=4, top_k=-1, temperature=0.9, seed=3)[0].text == \
        llm.generate("USER: hi ASSISTANT:", max_tokens=4, temperature=0.9, seed=3)[0].text
    with pytest.raises(ValueError, match="'top_k' must be >= 0"):
        llm.generate("USER: hi ASSISTANT:", top_k=-2)
    for bad in ({"max_tokens": "5"}, {"max_tokens": 3.5}, {"max_tokens": 0}, {"timeout": "5"},
                {"temperature": "0"}):
        with pytest.raises(ValueError, match="max_tokens must be|timeout must be|temperature must be"):
            llm.generate("USER: hi ASSISTANT:", **bad)


def test_unknown_settings_are_refused_and_max_new_tokens_is_taken_as_max_tokens(llm):
    """chat() and generate() handed any keyword to the engine, which dropped what it does not read:
    max_new_tokens=3 generated 256 tokens, n=2 gave one answer and a misspelt top_pp changed nothing."""
    before = llm.backend.stats()["decoded_tokens"]
    prompt = "USER: Tell me a story. ASSISTANT:"
    for run in (lambda **kw: llm.chat(user("Tell me a story."), **kw), lambda **kw: llm.generate(prompt, **kw)):
        with pytest.raises(ValueError, match="unknown setting.*'temprature', 'top_pp'"):
            run(top_pp=0.1, temprature=2.0)
        with pytest.raises(ValueError, match="n=2: one answer"):
            run(n=2)
        with pytest.raises(ValueError, match="max_tokens or its alias max_new_tokens, not both"):
            run(max_tokens=4, max_new_tokens=3)
    assert llm.backend.stats()["decoded_tokens"] == before  # refused before anything ran
    (chat,) = llm.chat(user("Tell me a story."), max_new_tokens=3, ignore_eos=True, n=1)
    (raw,) = llm.generate(prompt, max_new_tokens=2, ignore_eos=True)
    assert (chat.completion_tokens, raw.completion_tokens) == (3, 2)


def test_a_bare_path_or_image_as_a_prompts_images_is_refused_with_a_hint(llm, photo):
    """images=[path] for one prompt read the path one character at a time ("/: no such image file"), and
    images=[PIL image] raised a bare TypeError ("'PngImageFile' object is not iterable")."""
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    for entry in (photo, Image.open(photo)):
        with pytest.raises(ValueError, match=r"prompt 0: its images must be a list.*images=\[\['photo.png'\]\]"):
            llm.generate(prompt, [entry], max_tokens=2)
    with pytest.raises(ValueError, match="one list of images per prompt"):
        llm.generate(prompt, photo, max_tokens=2)
    (answer,) = llm.generate(prompt, [(photo,)], max_tokens=2)  # a tuple is a list of images too
    assert answer.completion_tokens >= 1


def test_the_default_template_does_not_depend_on_the_folder_name(world, tmp_path):
    """LLM(path) chose the template of a LLaVA-1.5 checkpoint from its folder's name: in a folder called
    'my-mpt-finetune' it talked mpt, in 'llama-2-ft' llava_llama_2."""
    from palo.testing import tiny

    config = dict(world.config, model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"])
    folder = tiny.write_full_checkpoint(str(tmp_path / "my-mpt-finetune"), world.model, config, world.tokenizer_dir)
    with LLM(folder, device="cpu") as llm:
        assert llm.conv_mode == "llava_v1"
