"""The generation engine in-process: batching gives each request exactly what it gets alone; requests are checked."""

from __future__ import annotations

import base64
import json
import re
import sys

import pytest
import torch
from serve_helpers import image_b64, make_image, vicuna_prompt

from palo.model.builder import load_pretrained_model
from palo.serve.engine import GenerationEngine, PromptTooLong, RequestError

QUESTIONS = ["What is this?", "ما هذا؟", "这是什么？", "Describe the picture in detail.", "یہ کیا ہے؟", "Что это?"]
COLORS = ["red", "green", "black", "orange", "purple", "yellow"]


@pytest.fixture(scope="module")
def loaded(world):
    return load_pretrained_model(world.full_dir, device="cpu")


def _engine(loaded, **kwargs) -> GenerationEngine:
    tokenizer, model, image_processor, context_len = loaded
    return GenerationEngine(tokenizer, model, image_processor, context_len, **kwargs)


def _params(i: int, **extra) -> dict:
    with_image = i != 3  # one text-only request in the mix
    params = {
        "prompt": vicuna_prompt(QUESTIONS[i % len(QUESTIONS)], image=with_image),
        "images": [image_b64(make_image(COLORS[i % len(COLORS)], size=(60 + 10 * i, 50)))] if with_image else [],
        "temperature": 0, "max_new_tokens": 6 + 3 * i, "stop": "</s>",
    }
    params.update(extra)
    return params


def test_batched_greedy_equals_one_at_a_time(loaded):
    batched = _engine(loaded, max_batch_size=8, batch_wait_ms=50)
    single = _engine(loaded, max_batch_size=1)
    try:
        out_b = batched.generate([batched.prepare(_params(i)) for i in range(6)])
        out_s = single.generate([single.prepare(_params(i)) for i in range(6)])
    finally:
        batched.close()
        single.close()
    # Continuous batching: the six requests were decoded together; the single engine never held two at once.
    assert max(batched.batch_sizes) == 6 and set(single.batch_sizes) == {1}
    assert [(o.text, o.finish_reason, o.completion_tokens) for o in out_b] == [
        (o.text, o.finish_reason, o.completion_tokens) for o in out_s
    ]
    assert all(o.finish_reason in ("stop", "length") and o.error is None for o in out_b)


def test_each_row_stops_at_its_own_stop_string(loaded):
    engine = _engine(loaded, max_batch_size=8, batch_wait_ms=50)
    try:
        free = engine.generate([engine.prepare(_params(0, max_new_tokens=20))])[0]
        assert len(free.text) > 4, free.text
        stop = free.text[len(free.text) // 2:][:2]
        cut = free.text[: free.text.find(stop)]
        out = engine.generate([engine.prepare(_params(0, max_new_tokens=20, stop=stop)),
                               engine.prepare(_params(0, max_new_tokens=20))])
    finally:
        engine.close()
    assert (out[0].text, out[0].finish_reason) == (cut, "stop")
    assert out[1].text == free.text  # its neighbour in the batch is unaffected


def test_a_continuation_is_decoded_after_the_prompt_on_either_engine(loaded):
    """``continuation``: the answer's text is what it adds to the prompt's (its first word keeps its space), on the
    static engine as on the paged one; without it the answer is decoded alone, as before ("Bonjourhe he")."""
    from palo.engine.detokenizer import prompt_context
    from palo.serve.static_engine import StaticBatchEngine

    tokenizer = loaded[0]
    word = tokenizer("hello", add_special_tokens=False).input_ids[0]  # word-initial ("▁...")
    whole = tokenizer.decode(tokenizer("Bonjour").input_ids + [word] * 2, skip_special_tokens=True)
    assert whole.startswith("Bonjour ")
    paged = _engine(loaded, max_batch_size=4)
    try:
        texts = [paged.generate([paged.prepare(_params(3, prompt="Bonjour", stop=None, max_new_tokens=2,
                                                       logit_bias={str(word): 100}, continuation=continuation))]
                                )[0].text for continuation in (False, True)]
        with pytest.raises(RequestError, match="'continuation' must be true or false"):
            paged.prepare(_params(3, continuation="yes"))
    finally:
        paged.close()
    assert texts == [whole[len("Bonjour "):], whole[len("Bonjour"):]]
    static = StaticBatchEngine(*loaded)  # not started: the job waits, and its text is read as the engine reads it
    try:
        request = static.prepare(_params(3, prompt="Bonjour", stop=None, continuation=True))
        (job,) = static.submit_many([request], [lambda event: None])
        assert job.context == prompt_context(tokenizer, request.input_ids) != []
        job.ids = [word, word]
        assert job.text(tokenizer) == texts[1]
    finally:
        static.close()


@pytest.mark.parametrize("kind", ["paged", "static"])
def test_the_clients_stop_strings_end_the_answer_besides_the_templates(loaded, kind):
    """``stops``: the OpenAI API's client stop strings, applied by the worker (so that min_tokens holds for them and
    the answer ends with its usage), on either engine; the protocol's ``stop`` keeps its meaning."""
    from palo.serve.static_engine import StaticBatchEngine

    engine = _engine(loaded, max_batch_size=4) if kind == "paged" else StaticBatchEngine(*loaded)
    try:
        free = engine.generate([engine.prepare(_params(0, max_new_tokens=20))])[0]
        stop = free.text[len(free.text) // 2:][:2]
        prepared = engine.prepare(_params(0, max_new_tokens=20, stops=["\u0965", stop, ""]))
        assert prepared.sampling.stop == ("</s>", "\u0965", stop) and prepared.stop == "</s>"
        out = engine.generate([prepared])[0]
        for bad in ("x", [1], ["a"] * 17):
            with pytest.raises(RequestError, match="'stops' must be a list of up to 16 strings"):
                engine.prepare(_params(0, stops=bad))
    finally:
        engine.close()
    assert (out.text, out.finish_reason) == (free.text[: free.text.find(stop)], "stop")


def test_streaming_events_extend_each_other(loaded):
    engine = _engine(loaded).start()
    events = []
    import threading

    done = threading.Event()

    def sink(event):
        events.append(event)
        if event.finish_reason or event.error:
            done.set()

    engine.submit(engine.prepare(_params(1, max_new_tokens=16)), sink)
    assert done.wait(60)
    engine.close()
    texts = [e.text for e in events]
    assert len(texts) > 1 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert events[-1].finish_reason and not any(e.finish_reason for e in events[:-1])


def test_budget_uses_the_projector_token_count(world):
    tokenizer, model, image_processor, context_len = load_pretrained_model(world.ldp_dir, device="cpu")
    engine = GenerationEngine(tokenizer, model, image_processor, context_len)
    assert engine.is_multimodal and engine.image_token_count == model.image_token_count == 4  # LDP: 16 patches / 4
    prepared = engine.prepare(_params(0))
    assert prepared.prompt_tokens == len(prepared.input_ids) - 1 + 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": ["%%%"]}, "base64"),
        ({"images": [base64.b64encode(b"not an image").decode()]},
         "image 0: base64 image: not a readable image (not a format Pillow can identify)"),  # no buffer's address
        ({"seed": 2**64},
         "'seed' must be an integer in [-9223372036854775808, 18446744073709551615], got 18446744073709551616"),
        ({"seed": -(2**63) - 1}, "'seed' must be an integer in"),
        ({"images": [image_b64(), image_b64()]}, "2 image(s) for 1"),
        ({"prompt": None}, "prompt"),
        ({"images": "abc"}, "images"),
        ({"top_p": -0.1}, "'top_p' must be in [0, 1], got -0.1"),
        ({"top_p": 1.5}, "'top_p' must be in [0, 1], got 1.5"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": 3}, "stop"),
        ({"temperature": "hot"}, "'temperature' must be a number, got 'hot'"),
        ({"temperature": True}, "'temperature' must be a number"),
        ({"top_p": float("nan")}, "'top_p' must be finite"),
        ({"top_k": [5]}, "'top_k' must be an integer"),
        ({"max_new_tokens": "many"}, "'max_new_tokens' must be an integer, got 'many'"),
        ({"max_new_tokens": "Infinity"}, "'max_new_tokens' must be finite"),
        ({"max_new_tokens": 10**400}, "'max_new_tokens' must be finite, got an integer of 401 digits"),
        ({"temperature": 10**400}, "'temperature' must be finite, got an integer of 401 digits"),
        ({"repetition_penalty": -(10**400)}, "'repetition_penalty' must be finite, got an integer of 402 digits"),
        ({"presence_penalty": 2.5}, "'presence_penalty' must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": "lots"}, "'frequency_penalty' must be a number"),
        ({"repetition_penalty": 0}, "'repetition_penalty' must be > 0"),
        ({"logit_bias": [5]}, "'logit_bias' must be an object"),
        ({"logit_bias": {"five": 1}}, "'logit_bias' keys must be token ids"),
        ({"logit_bias": {"-5": 1}}, "'logit_bias' keys must be token ids"),
        ({"logit_bias": {"5": 100.5}}, "'logit_bias' values must be numbers in [-100, 100], got 100.5"),
        ({"logit_bias": {"5": "1"}}, "'logit_bias' values must be numbers"),
        ({"logit_bias": {"5": 1, "05": 2}}, "'logit_bias' names token 5 twice"),
        ({"logit_bias": {"999999": 1}}, "'logit_bias' token id 999999 is not in the model's vocabulary"),
        ({"ignore_eos": "yes"}, "'ignore_eos' must be true or false, got 'yes'"),
        ({"guided_choice": ["a", "b"], "min_tokens": 2}, "a structured answer ends where its shape is complete"),
        ({"guided_regex": "a+", "ignore_eos": True}, "it cannot ignore end-of-sequence"),
        ({"min_p": 1.5}, "'min_p' must be in [0, 1], got 1.5"),
        ({"min_tokens": -1}, "'min_tokens' must be from 0 to max_new_tokens"),
        ({"min_tokens": 500}, "'min_tokens' must be from 0 to max_new_tokens (6), got 500"),
        ({"stop_token_ids": [-1]}, "'stop_token_ids' must be a list of up to 64 token ids"),
        ({"stop_token_ids": "2"}, "'stop_token_ids' must be a list"),
        ({"cache_salt": ""}, "'cache_salt' must be a non-empty string of at most 1024 characters, got ''"),
        ({"cache_salt": 7}, "'cache_salt' must be a non-empty string"),
        ({"cache_salt": "s" * 1025}, "'cache_salt' must be a non-empty string of at most 1024 characters"),
        ({"stop_token_ids": [999999]}, "'stop_token_ids' must be a list of up to 64 token ids in [0, "),
        ({"response_format": {"type": "xml"}}, "'response_format' must be {'type': 'text' | 'json_object'"),
        ({"response_format": {"type": "json_schema"}}, "type json_schema needs 'json_schema'"),
        ({"guided_choice": []}, "'guided_choice' must be a list of 1 to 256 non-empty strings"),
        ({"guided_choice": ["a", ""]}, "'guided_choice' must be a list"),
        ({"guided_regex": 5}, "'guided_regex' must be a non-empty regular expression"),
        ({"guided_json": 5}, "'guided_json' must be a JSON schema"),
        ({"structured_outputs": {"json": {}, "regex": "a"}}, "'structured_outputs' must hold exactly one of"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "ask for one answer shape, not 'guided_regex' and"),
        ({"guided_regex": "x" * 100_001}, "'guided_regex' is 100001 characters, over the limit of 100000"),
        ({"guided_regex": "[0-9"}, "the regex cannot be used: "),
        ({"guided_json": '{"type": "nope"}'}, "the json schema cannot be used: "),
        ({"structured_outputs": {"json": "{oops"}}, "the json schema cannot be used: "),
    ],
)
def test_bad_requests_are_rejected(loaded, change, message):
    engine = _engine(loaded)
    with pytest.raises(RequestError, match=re.escape(message)):
        engine.prepare(dict(_params(0), **change))


def test_overlong_prompt(loaded):
    engine = _engine(loaded)
    with pytest.raises(PromptTooLong, match="context"):
        engine.prepare(_params(0, prompt=vicuna_prompt("word " * 600)))
    # The budget is capped by what the context has left.
    prepared = engine.prepare(_params(0, max_new_tokens=1000))
    assert prepared.max_new_tokens == engine.max_context - prepared.prompt_tokens


def test_the_original_cap_on_new_tokens_is_lifted_by_cap_max_new_tokens_false(loaded, monkeypatch):
    """The original protocol caps max_new_tokens at 1024 (here 10); the OpenAI API sends cap_max_new_tokens false,
    and its max_tokens then goes up to the context: the cap cut its answers at 1024 as if they had reached the
    client's limit, and refused a min_tokens above 1024 naming a max_new_tokens the client never sent."""
    from palo.serve import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_NEW_TOKENS_CAP", 10)
    engine = _engine(loaded)
    assert engine.prepare(_params(0, max_new_tokens=40)).max_new_tokens == 10  # the original's rule
    uncapped = engine.prepare(_params(0, max_new_tokens=40, min_tokens=30, cap_max_new_tokens=False))
    assert uncapped.max_new_tokens == 40 and uncapped.sampling.min_tokens == 30
    whole = engine.prepare(_params(0, max_new_tokens=10**6, cap_max_new_tokens=False))
    assert whole.max_new_tokens == engine.max_context - whole.prompt_tokens  # the context still caps it
    with pytest.raises(RequestError, match="'cap_max_new_tokens' must be true or false, got 'no'"):
        engine.prepare(_params(0, cap_max_new_tokens="no"))


def test_the_static_baseline_engine_gives_the_same_answers(loaded):
    """``--engine static`` (the previous engine: one ``model.generate`` per batch) answers as the paged engine."""
    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    static = StaticBatchEngine(tokenizer, model, image_processor, context_len, max_batch_size=8, batch_wait_ms=50)
    paged = _engine(loaded, max_batch_size=8)
    try:
        out_s = static.generate([static.prepare(_params(i)) for i in range(6)])
        out_p = paged.generate([paged.prepare(_params(i)) for i in range(6)])
    finally:
        static.close()
        paged.close()
    assert list(static.batch_sizes) == [6]
    assert [(o.text, o.finish_reason) for o in out_s] == [(o.text, o.finish_reason) for o in out_p]


def test_the_static_engine_decodes_an_answer_incrementally(loaded):
    """Each step decoded the whole answer again: a step's host time grew with the answer (129 ms at 8,000 tokens
    for 8 rows). Counted here in ids decoded, which grew as n^2 / 2."""
    from palo.serve.static_engine import Job

    tokenizer = loaded[0]

    class Counting:  # the tokenizer, its fast paths hidden so that every decode is counted
        decoded = 0

        def __getattr__(self, name):
            if name.startswith("streaming_"):
                raise AttributeError(name)
            return getattr(tokenizer, name)

        def decode(self, ids, **kwargs):
            Counting.decoded += len(ids)
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer(" ".join(QUESTIONS[i % len(QUESTIONS)] for i in range(60)), add_special_tokens=False).input_ids
    assert len(ids) > 300
    job = Job(request=None, sink=None)
    shown = []
    for token in ids:
        job.ids.append(token)
        shown.append(job.text(Counting()))
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:]))
    assert Counting.decoded < 20 * len(ids), Counting.decoded  # a window per token, not the answer so far
    assert job.text(Counting(), final=True) == tokenizer.decode(ids, skip_special_tokens=True)


def test_the_static_engine_samples_a_seeded_request_the_same_whatever_else_is_queued(loaded):
    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    ask = _params(0, temperature=1.0, max_new_tokens=16, seed=5)
    for seed in (-(2**63), 2**64 - 1):  # the ends of the range a worker takes, so the API's seed + i fits
        assert _engine(loaded).prepare(dict(ask, seed=seed)).sampling.seed == seed
    static = StaticBatchEngine(tokenizer, model, image_processor, context_len)
    state = torch.get_rng_state()
    try:
        alone = static.generate([static.prepare(ask)])[0].text
    finally:
        static.close()  # waits for model.generate to return (the answer is sent from inside it)
    assert torch.equal(torch.get_rng_state(), state)  # the process's own stream is put back
    static = StaticBatchEngine(tokenizer, model, image_processor, context_len, max_batch_size=8, batch_wait_ms=50)
    try:
        crowd = static.generate([static.prepare(_params(i, temperature=1.0, max_new_tokens=16)) for i in (1, 2)]
                                + [static.prepare(ask)])
        other = static.generate([static.prepare(dict(ask, seed=6))])[0].text
    finally:
        static.close()
    assert crowd[2].text == alone != other
    assert sorted(static.batch_sizes) == [1, 1, 2]  # unseeded rows that sample alike still share a batch


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def test_every_form_of_an_answer_shape_holds_the_answer_to_it_and_the_static_engine_refuses_them(loaded):
    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    paged = _engine(loaded, max_batch_size=8)
    static = StaticBatchEngine(tokenizer, model, image_processor, context_len)
    forms = [{"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}},
             {"guided_json": SCHEMA}, {"structured_outputs": {"json": json.dumps(SCHEMA)}},
             {"guided_regex": "(yes|no), [0-9]{2}"}, {"structured_outputs": {"regex": "[a-c]{3}"}},
             {"guided_choice": ["rouge", "অন্য", "蓝色"]}, {"structured_outputs": {"choice": ["x", "y"]}},
             {"response_format": {"type": "json_object"}}, {"response_format": {"type": "text"}}]
    try:
        prepared = [paged.prepare(_params(i % 6, max_new_tokens=24, **form)) for i, form in enumerate(forms)]
        outputs = paged.generate(prepared)
        for form in forms[:-1]:
            with pytest.raises(RequestError, match=r"'(response_format|guided_\w+|structured_outputs\.\w+)' needs "
                                                   "the paged engine"):
                static.prepare(_params(0, **form))
        assert static.prepare(_params(0, response_format={"type": "text"})).sampling.structured is None
    finally:
        paged.close()
        static.close()
    texts = [o.text for o in outputs]
    assert [json.loads(t) for t in texts[:3]] == [{"ok": json.loads(t)["ok"]} for t in texts[:3]]
    assert re.fullmatch("(yes|no), [0-9]{2}", texts[3]) and re.fullmatch("[a-c]{3}", texts[4])
    assert texts[5] in ("rouge", "অন্য", "蓝色") and texts[6] in ("x", "y")
    assert texts[7].startswith("{") and prepared[8].sampling.structured is None
    assert all(o.finish_reason == "stop" for o in outputs[:7])


def test_without_xgrammar_an_answer_shape_is_refused_with_what_to_install(loaded, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if not installed
    engine = _engine(loaded)
    try:
        with pytest.raises(RequestError, match=r"need the xgrammar package on the worker \(pip install xgrammar\)"):
            engine.prepare(_params(0, guided_choice=["a", "b"]))
        assert engine.generate([engine.prepare(_params(0))])[0].finish_reason in ("stop", "length")  # still serving
    finally:
        engine.close()


def test_vllms_min_p_min_tokens_stop_ids_and_ignore_eos_reach_the_sampler_and_static_refuses_them(loaded):
    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    paged = _engine(loaded, max_batch_size=8)
    static = StaticBatchEngine(tokenizer, model, image_processor, context_len)
    eos = tokenizer.eos_token_id
    try:
        free = paged.generate([paged.prepare(_params(1, max_new_tokens=12))])[0]
        ids = tokenizer(free.text, add_special_tokens=False).input_ids
        prepared = paged.prepare(_params(1, max_new_tokens=12, min_p=0.3, min_tokens=4, stop_token_ids=[7, 9]))
        assert (prepared.sampling.min_p, prepared.sampling.min_tokens) == (0.3, 4)
        assert prepared.sampling.stop_token_ids == (7, 9)
        held, stopped, running = paged.generate([
            paged.prepare(_params(2, max_new_tokens=12, min_tokens=4, logit_bias={str(eos): 100})),
            paged.prepare(_params(1, max_new_tokens=12, stop_token_ids=[ids[0]])),
            paged.prepare(_params(2, max_new_tokens=7, ignore_eos=True, logit_bias={str(eos): 100}))])
        for extra in ({"min_p": 0.1}, {"min_tokens": 2}, {"stop_token_ids": [5]}, {"ignore_eos": True}):
            with pytest.raises(RequestError, match=f"'{next(iter(extra))}' needs the paged engine"):
                static.prepare(_params(0, **extra))
        assert static.prepare(_params(0, min_p=0, min_tokens=0, stop_token_ids=[])).sampling.min_p == 0
    finally:
        paged.close()
        static.close()
    assert held.completion_tokens == 4 and held.finish_reason == "stop"  # the end was pushed up, and held back
    assert stopped.text == "" and stopped.finish_reason == "stop"  # its first token was a stop id
    assert running.completion_tokens == 7 and running.finish_reason == "length"  # past every end-of-sequence


def test_a_cache_salt_keeps_the_prefix_cache_and_the_tower_to_its_own_requests(loaded):
    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    paged = _engine(loaded, max_batch_size=4)
    try:
        answers, encoded = [], []
        for salt in ("lab-a", "lab-b", None, "lab-a"):
            extra = {} if salt is None else {"cache_salt": salt}
            prepared = paged.prepare(_params(1, **extra))
            assert prepared.cache_salt == salt
            answers.append(paged.generate([prepared])[0].text)
            encoded.append(paged.stats()["images_encoded"])
        assert len(set(answers)) == 1
        assert encoded == [1, 2, 3, 3]  # another salt (or none) runs the tower again; the same salt does not
        assert paged.stats()["prefix_cache_hit_rate"] > 0.2  # the last request took its salt's blocks
    finally:
        paged.close()
    static = StaticBatchEngine(tokenizer, model, image_processor, context_len)
    try:  # it keeps no cache between requests, so a salt asks for nothing it does not already do
        assert static.generate([static.prepare(_params(1, cache_salt="lab-a"))])[0].text == answers[0]
    finally:
        static.close()


def test_logit_bias_reaches_each_rows_sampler_and_the_static_engine_refuses_it(loaded):
    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    forced = tokenizer("hello").input_ids[-1]
    paged = _engine(loaded, max_batch_size=8)
    static = StaticBatchEngine(tokenizer, model, image_processor, context_len)
    try:
        plain = paged.generate([paged.prepare(_params(i)) for i in (0, 1)])
        biased = paged.generate([paged.prepare(_params(0, logit_bias={str(forced): 100})), paged.prepare(_params(1))])
        assert paged.prepare(_params(0, logit_bias={"7": 0, "9": -2.5})).sampling.logit_bias == ((9, -2.5),)
        with pytest.raises(RequestError, match="'logit_bias' needs the paged engine"):
            static.prepare(_params(0, logit_bias={str(forced): 100}))
        assert static.prepare(_params(0, logit_bias={})).sampling.logit_bias == ()  # asks for nothing: accepted
    finally:
        paged.close()
        static.close()
    n = _params(0)["max_new_tokens"]
    assert biased[0].text == tokenizer.decode([forced] * n, skip_special_tokens=True) != plain[0].text
    assert biased[1].text == plain[1].text  # its neighbour in the batch asked for nothing


PENALTIES = [{}, {"repetition_penalty": 1.8}, {"frequency_penalty": 1.5}, {"presence_penalty": 2.0},
             {"repetition_penalty": 1.3, "frequency_penalty": 0.7, "presence_penalty": -0.5}, {"presence_penalty": 1.0}]


@pytest.mark.parametrize("text_only", [False, True])
def test_both_engines_apply_each_rows_penalties_alike(loaded, text_only):
    """Penalties reach the sampler of either engine, row by row inside one batch, by one rule; a batch with images
    (generated from embeddings) and a text batch (from ids) count the prompt alike."""
    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    picked = [3] * 6 if text_only else range(6)
    params = [_params(i, max_new_tokens=16, **PENALTIES[k]) for k, i in enumerate(picked)]
    static = StaticBatchEngine(tokenizer, model, image_processor, context_len, max_batch_size=8, batch_wait_ms=50)
    paged = _engine(loaded, max_batch_size=8)
    try:
        assert paged.prepare(params[4]).sampling.frequency_penalty == 0.7
        out_s = static.generate([static.prepare(p) for p in params])
        out_p = paged.generate([paged.prepare(p) for p in params])
        plain = paged.generate([paged.prepare({k: v for k, v in p.items() if "penalty" not in k}) for p in params])
    finally:
        static.close()
        paged.close()
    assert list(static.batch_sizes) == [6]
    assert [o.text for o in out_s] == [o.text for o in out_p]
    assert sum(a.text != b.text for a, b in zip(out_p, plain)) >= 3  # the penalties changed answers


def test_the_static_engine_honours_top_k(loaded):
    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    static = StaticBatchEngine(tokenizer, model, image_processor, context_len, max_batch_size=8, batch_wait_ms=50)
    try:
        greedy = static.generate([static.prepare(_params(i, max_new_tokens=16)) for i in range(3)])
        top1 = static.generate([static.prepare(_params(i, max_new_tokens=16, temperature=1.0, top_k=1))
                                for i in range(3)])
    finally:
        static.close()
    assert [o.text for o in top1] == [o.text for o in greedy]  # one candidate left: sampling is greedy


def test_an_image_url_is_fetched_only_under_the_workers_remote_policy(loaded, tmp_path):
    """An http(s) URL in 'images' (what the OpenAI API passes on) is refused by name unless the worker allows remote
    images; allowed, it gives the answer of the same image sent as base64. A local path is never opened."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from palo.remote_images import RemoteImagePolicy

    image = make_image("orange", size=(70, 50))
    image.save(tmp_path / "photo.png")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/photo.png"
    engine = _engine(loaded)
    try:
        with pytest.raises(RequestError, match="image 0: .*this worker does not fetch image URLs \\(start it with "
                                               "--allow-remote-images\\)"):
            engine.prepare(_params(0, images=[url]))
        engine.remote_images = RemoteImagePolicy()  # public addresses only: the loopback test server is refused
        with pytest.raises(RequestError, match="loopback address 127.0.0.1"):
            engine.prepare(_params(0, images=[url]))
        engine.remote_images = RemoteImagePolicy.from_strings(["127.0.0.1/32"])
        fetched = engine.generate([engine.prepare(_params(0, images=[url]))])[0]
        sent = engine.generate([engine.prepare(_params(0, images=[image_b64(image)]))])[0]
        assert fetched.text == sent.text and fetched.completion_tokens > 0
        with pytest.raises(RequestError, match="image 0: "):  # a path is base64 to this worker, never a file
            engine.prepare(_params(0, images=[str(tmp_path / "photo.png")]))
    finally:
        httpd.shutdown()
        engine.close()


def test_the_worker_takes_the_remote_image_flags():
    from palo.remote_images import policy_from_args
    from palo.serve.model_worker import build_parser

    args = build_parser().parse_args(["--allow-remote-images", "--remote-image-allow-network", "10.0.0.0/8",
                                      "--remote-image-max-mb", "2"])
    policy = policy_from_args(args)
    assert args.allow_remote_images and policy.max_bytes == 2 * 2**20 and str(policy.allow_networks[0]) == "10.0.0.0/8"
    assert not build_parser().parse_args([]).allow_remote_images


@pytest.mark.parametrize("kind", ["paged", "static"])
def test_top_p_zero_keeps_the_most_likely_token_only(loaded, kind):
    """The original web demo's Top P slider starts at 0, and OpenAI's API allows 0: the worker refused it, so every
    answer at that setting was an error, even at temperature 0."""
    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    engine = (_engine(loaded, max_batch_size=8, batch_wait_ms=50) if kind == "paged" else
              StaticBatchEngine(tokenizer, model, image_processor, context_len, max_batch_size=8, batch_wait_ms=50))
    try:
        greedy = engine.generate([engine.prepare(_params(i, max_new_tokens=16)) for i in range(3)])
        nucleus0 = engine.generate([engine.prepare(_params(i, max_new_tokens=16, temperature=1.0, top_p=0, seed=i))
                                    for i in range(3)])
        sampled = engine.generate([engine.prepare(_params(i, max_new_tokens=16, temperature=1.0, seed=i))
                                   for i in range(3)])
    finally:
        engine.close()
    assert all(o.error is None for o in nucleus0) and [o.text for o in nucleus0] == [o.text for o in greedy]
    assert [o.text for o in sampled] != [o.text for o in greedy]  # at temperature 1 the seeds alone would differ


def test_a_cache_smaller_than_the_context_sizes_what_the_worker_takes(loaded):
    """A request that fitted the model's context but not a small KV cache (a small --kv-cache-gb) was refused by
    the engine as too large, which the worker answered as a server error (the API's 502): now the worker's context
    is what the cache holds, answers are trimmed to it and longer prompts refused as too long."""
    from palo.engine import EngineConfig

    engine = _engine(loaded, engine_config=EngineConfig(max_num_seqs=2, num_blocks=6, block_size=16))
    try:
        assert engine.max_context == 80 < loaded[1].config.max_position_embeddings
        prepared = engine.prepare({"prompt": vicuna_prompt("Describe the picture in detail.", image=False),
                                   "temperature": 0, "max_new_tokens": 200, "ignore_eos": True})
        out = engine.generate([prepared])[0]
        assert out.error is None and out.finish_reason == "length"
        assert prepared.prompt_tokens + out.completion_tokens == 80
        with pytest.raises(PromptTooLong, match="of the model's 80 context positions"):
            engine.prepare({"prompt": vicuna_prompt("word " * 100, image=False), "max_new_tokens": 4})
    finally:
        engine.close()


def test_generate_cancels_the_requests_it_queued_when_one_is_refused_or_it_times_out(loaded):
    """Before, ``generate`` raised (a request refused part-way, or its timeout) and left the requests it had queued
    generating in the background for nobody, to the end of their token budget."""
    import dataclasses
    import threading

    from palo.engine import RequestTooLarge

    engine = _engine(loaded, max_batch_size=2)
    ended: list = []
    done = threading.Event()
    engine.engine.finish_observers.append(lambda output: (ended.append(output.finish_reason), done.set()))
    try:
        good = engine.prepare({"prompt": vicuna_prompt("Describe the picture in detail.", image=False),
                               "temperature": 0, "max_new_tokens": 300, "ignore_eos": True})
        too_large = dataclasses.replace(good, input_ids=[1] * (engine.max_context + 1))
        with pytest.raises(RequestTooLarge):
            engine.generate([good, too_large])
        assert done.wait(30) and ended == ["abort"]
        done.clear()
        with pytest.raises(TimeoutError):
            engine.generate([good], timeout=0.05)
        assert done.wait(30) and ended == ["abort", "abort"]
    finally:
        engine.close()


def test_closing_the_static_engine_ends_every_queued_request_with_an_error_at_once(loaded, monkeypatch):
    """Before, ``close`` stopped the batching thread and left the queued requests (and a batch being collected in
    the ``batch_wait_ms`` window) with no last event: their callers waited for ever, ``generate`` to its timeout.
    Now each gets the paged engine's error at once, the batch being generated still ends normally, and a cancelled
    request is told nothing."""
    import threading

    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    started, gate = threading.Event(), threading.Event()
    generate = model.generate

    def gated_generate(*args, **kwargs):  # holds the first batch inside model.generate until the gate opens
        started.set()
        gate.wait(30)
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", gated_generate)

    class Last:
        """A sink keeping the events it gets; ``done`` is set at the last one."""

        def __init__(self):
            self.events, self.done = [], threading.Event()

        def __call__(self, event):
            self.events.append(event)
            if event.finish_reason or event.error:
                self.done.set()

    def request():
        return static.prepare(_params(3, max_new_tokens=4))  # text-only: quick

    static = StaticBatchEngine(tokenizer, model, image_processor, context_len, max_batch_size=1, batch_wait_ms=0)
    closer = threading.Thread(target=static.close)
    running, queued, cancelled = Last(), [Last(), Last()], Last()
    try:
        static.start()
        static.submit(request(), running)
        assert started.wait(30)  # the first request's batch is in model.generate, held there
        for sink in queued:
            static.submit(request(), sink)
        static.submit(request(), cancelled).cancel()
        assert static.queue_size() == 3
        closer.start()  # close() waits for the running batch, which waits for the gate: from another thread
        for sink in queued:
            assert sink.done.wait(5), "a queued request got no last event when the engine closed"
        assert [[(e.text, e.finish_reason, e.error) for e in sink.events] for sink in queued] == [
            [(None, None, "the engine was shut down")]] * 2
        assert static.queue_size() == 0 and not running.done.is_set()
    finally:
        gate.set()
        static.close()  # idempotent; also when the test failed before the closer started
        if closer.is_alive():
            closer.join(60)
    assert running.done.is_set() and running.events[-1].finish_reason in ("stop", "length")
    assert running.events[-1].error is None and cancelled.events == []


def test_closing_the_static_engine_while_it_collects_a_batch_answers_the_batch_with_an_error(loaded):
    """A request being collected for a batch (the ``batch_wait_ms`` window) is still queued: ``close`` ends it with
    the error and returns at once, instead of generating it first (or, before, leaving it unanswered)."""
    import threading
    import time

    from palo.serve.static_engine import StaticBatchEngine

    tokenizer, model, image_processor, context_len = loaded
    static = StaticBatchEngine(tokenizer, model, image_processor, context_len, max_batch_size=8,
                               batch_wait_ms=60_000)
    events, done = [], threading.Event()
    try:
        static.start()
        static.submit(static.prepare(_params(3, max_new_tokens=4)), lambda e: (events.append(e), done.set()))
        time.sleep(0.1)  # the thread has taken up the request and waits for more (either way, the answer is the same)
        began = time.monotonic()
        static.close()
        assert time.monotonic() - began < 5 and done.wait(5)
    finally:
        static.close()
    assert [(e.text, e.finish_reason, e.error) for e in events] == [(None, None, "the engine was shut down")]
    assert static.queue_size() == 0 and list(static.batch_sizes) == []  # nothing was generated
