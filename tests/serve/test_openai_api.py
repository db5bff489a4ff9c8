"""The OpenAI-compatible API on the controller, driven by the official ``openai`` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serve_helpers import API_KEY, image_b64, make_image

pytestmark = pytest.mark.timeout(300)


def client(cluster, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key=key, max_retries=0, timeout=60)


def image_message(text: str, color: str = "red") -> list[dict]:
    url = "data:image/png;base64," + image_b64(make_image(color))
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_models_and_streamed_chat_with_an_image(cluster):
    c = client(cluster)
    assert "ckpt" in {m.id for m in c.models.list()}
    assert c.models.retrieve("ckpt").id == "ckpt"  # what some clients call to check a model before using it
    with pytest.raises(openai.NotFoundError, match="no-such/model"):
        c.models.retrieve("no-such/model")
    stream = c.chat.completions.create(model="ckpt", messages=image_message("ما هذا؟"), stream=True, temperature=0,
                                       max_tokens=12, stream_options={"include_usage": True})
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    streamed = "".join(deltas)
    # One content chunk or several: the API sends an answer's newest text whenever it writes, so when the worker
    # runs ahead of it (a loaded machine: all 12 tokens before the first write) they come as one. That the pieces
    # of a slower answer stream one by one is checked without timing in test_openai_routes (n answers in turn).
    assert any(deltas) and finish in ("stop", "length")
    assert usage.completion_tokens >= 1 and usage.prompt_tokens > 16  # the image alone takes 16 positions
    # The same request without streaming gives the same greedy answer.
    full = c.chat.completions.create(model="ckpt", messages=image_message("ما هذا؟"), temperature=0, max_tokens=12)
    assert full.choices[0].message.content == streamed and full.choices[0].finish_reason == finish


def test_usage_reports_the_prompt_positions_read_from_the_prefix_cache(cluster):
    """``--enable-prompt-tokens-details``: the same image and question again read the image's and the question's
    KV from the prefix cache, and ``cached_tokens`` says how many positions that was, streamed or not."""
    c = client(cluster)
    messages = image_message("Wie viele Kreise siehst du?", "maroon")  # a color and text no other test sends
    first = c.chat.completions.create(model="ckpt", messages=messages, temperature=0, max_tokens=4).usage
    stream = c.chat.completions.create(model="ckpt", messages=messages, temperature=0, max_tokens=4, stream=True,
                                       stream_options={"include_usage": True})
    again = [chunk.usage for chunk in stream if chunk.usage][-1]
    assert again.prompt_tokens == first.prompt_tokens > 16
    before, after = first.prompt_tokens_details.cached_tokens, again.prompt_tokens_details.cached_tokens
    # The first found at most the template's system text cached; the second also the image (16 positions) and
    # the question, all but the last position (computed for the first answer token).
    assert 0 <= before < after < again.prompt_tokens and after - before >= 16


def test_a_stop_string_ends_the_answer(cluster):
    c = client(cluster)
    messages = [{"role": "system", "content": "Answer briefly."}] + image_message("Describe it.", "green")
    whole = c.chat.completions.create(model="ckpt", messages=messages, temperature=0, max_tokens=16)
    free = whole.choices[0].message.content
    assert len(free) > 4
    stop = free[len(free) // 2:][:2]
    cut = c.chat.completions.create(model="ckpt", messages=messages, temperature=0, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == free[: free.find(stop)] and cut.choices[0].finish_reason == "stop"
    # Usage counts what was generated up to the stop (it was all zeros when the API ended the answer itself).
    assert cut.usage.prompt_tokens == whole.usage.prompt_tokens
    assert 1 <= cut.usage.completion_tokens <= whole.usage.completion_tokens
    assert cut.usage.total_tokens == cut.usage.prompt_tokens + cut.usage.completion_tokens
    stream = c.chat.completions.create(model="ckpt", messages=messages, temperature=0, max_tokens=16, stop=[stop],
                                       stream=True, stream_options={"include_usage": True})
    assert [chunk.usage for chunk in stream if chunk.usage][-1].prompt_tokens == whole.usage.prompt_tokens


def test_several_sampled_answers_reproducible_by_seed(cluster):
    """``n`` answers in one request, each sampled from its own seed: the same request gives them again, and each
    equals a single answer asked with its seed (seed + its index)."""
    c = client(cluster)
    ask = dict(model="ckpt", messages=image_message("Describe it.", "blue"), temperature=1.0, max_tokens=10)
    both = c.chat.completions.create(n=2, seed=11, **ask)
    answers = [choice.message.content for choice in sorted(both.choices, key=lambda choice: choice.index)]
    assert [choice.index for choice in both.choices] == [0, 1]
    assert [c.chat.completions.create(n=2, seed=11, **ask).choices[i].message.content for i in (0, 1)] == answers
    assert [c.chat.completions.create(seed=seed, **ask).choices[0].message.content for seed in (11, 12)] == answers
    assert both.usage.completion_tokens > 2


def test_penalties_reach_the_sampler_through_the_official_client(cluster):
    c = client(cluster)
    ask = dict(model="ckpt", messages=image_message("Describe it in detail.", "orange"), temperature=0, max_tokens=24)
    free = c.chat.completions.create(**ask).choices[0].message.content
    penalised = [c.chat.completions.create(frequency_penalty=2.0, **ask).choices[0].message.content,
                 c.chat.completions.create(presence_penalty=2.0, **ask).choices[0].message.content,
                 c.chat.completions.create(extra_body={"repetition_penalty": 2.0}, **ask).choices[0].message.content]
    assert all(answer != free for answer in penalised)
    assert c.chat.completions.create(frequency_penalty=2.0, **ask).choices[0].message.content == penalised[0]


def test_logit_bias_min_tokens_and_stop_ids_with_ids_from_the_servers_tokenizer(cluster):
    """What a client does to steer the answer: ids from ``/tokenize``, then ``logit_bias`` on the chat API."""
    c = client(cluster)

    def served(path: str, **body):
        return httpx.post(cluster.url + path, json={"model": "ckpt", **body}, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"}).json()

    word = served("/tokenize", prompt="hello", add_special_tokens=False)["tokens"][-1]
    ask = dict(model="ckpt", messages=image_message("Describe it.", "green"), temperature=0, max_tokens=6)
    free = c.chat.completions.create(**ask)
    forced = c.chat.completions.create(logit_bias={str(word): 100}, **ask)
    spelled = served("/detokenize", tokens=[word] * 6)["prompt"].strip()
    assert forced.choices[0].message.content == spelled != free.choices[0].message.content
    first = c.chat.completions.create(**dict(ask, max_tokens=1, logprobs=True, top_logprobs=1))
    banned = served("/tokenize", prompt=first.choices[0].logprobs.content[0].token, add_special_tokens=False)
    other = c.chat.completions.create(logit_bias={str(banned["tokens"][-1]): -100}, **dict(ask, max_tokens=1))
    assert other.choices[0].message.content != first.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        c.chat.completions.create(logit_bias={"999999": 5}, **ask)
    # vLLM's min_tokens holds back the end a bias pushes up; its stop_token_ids end the answer.
    eos = served("/tokenize", prompt="</s>", add_special_tokens=False)["tokens"]
    held = c.chat.completions.create(logit_bias={str(eos[0]): 100}, extra_body={"min_tokens": 3}, **ask)
    assert held.usage.completion_tokens == 3 and held.choices[0].finish_reason == "stop"
    ended = c.chat.completions.create(logit_bias={str(word): 100}, extra_body={"stop_token_ids": [word]}, **ask)
    assert ended.choices[0].message.content == "" and ended.choices[0].finish_reason == "stop"
    # min_tokens holds for the client's stop strings too (vLLM's rule: one that ends after the first 3 tokens ends
    # the answer): the API had cut at the first one itself and answered "" after 1 token.
    one = served("/detokenize", tokens=[word])["prompt"].strip()
    three = served("/detokenize", tokens=[word] * 3)["prompt"].strip()
    for stream in (False, True):
        held = c.chat.completions.create(logit_bias={str(word): 100}, stop=[one], extra_body={"min_tokens": 3},
                                         stream=stream, **({"stream_options": {"include_usage": True}} if stream
                                                           else {}), **ask)
        if stream:
            chunks = list(held)
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            usage = [ch.usage for ch in chunks if ch.usage][-1]
        else:
            text, usage = held.choices[0].message.content, held.usage
        assert text.strip() == three and usage.completion_tokens == 4


def test_a_continued_text_keeps_the_space_of_its_first_word(cluster):
    """A completion, its echo and a continued final message answered 'Bonjourhe he' for 'Bonjour' + ' he he': the
    answer was decoded alone, and SentencePiece drops a text's leading space. Now the prompt's text and the
    answer's are the decoding of the whole (vLLM's rule); a chat answer still starts without the space."""
    c = client(cluster)

    def served(path: str, **body):
        return httpx.post(cluster.url + path, json={"model": "ckpt", **body}, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"}).json()

    word = served("/tokenize", prompt="hello", add_special_tokens=False)["tokens"][0]  # word-initial ("▁...")
    prompt_ids = served("/tokenize", prompt="Bonjour", add_special_tokens=False)["tokens"]
    whole = served("/detokenize", tokens=prompt_ids + [word] * 2)["prompt"]
    assert whole.startswith("Bonjour ")
    ask = dict(model="ckpt", temperature=0, max_tokens=2, logit_bias={str(word): 100})
    plain = c.completions.create(prompt="Bonjour", **ask).choices[0].text
    echoed = c.completions.create(prompt="Bonjour", echo=True, **ask).choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in c.completions.create(prompt="Bonjour", stream=True, **ask)
                       if chunk.choices)
    assert plain == streamed == whole[len("Bonjour"):] and echoed == whole
    messages = [{"role": "user", "content": "Salut"}, {"role": "assistant", "content": "Bonjour"}]
    continued = c.chat.completions.create(messages=messages, extra_body={"continue_final_message": True,
                                                                         "add_generation_prompt": False}, **ask)
    assert continued.choices[0].message.content == plain
    answered = c.chat.completions.create(messages=messages[:1], **ask)
    assert answered.choices[0].message.content == plain.lstrip()


def test_structured_answers_through_the_official_client(cluster):
    """JSON held to a schema (OpenAI's response_format), one of a list of choices (vLLM's extra), streamed or not;
    a pattern that does not compile is a 400 that says why."""
    c = client(cluster)
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "sure": {"type": "boolean"}},
              "required": ["color", "sure"], "additionalProperties": False}
    ask = dict(model="ckpt", messages=image_message("What colour is it? Answer in JSON.", "red"), max_tokens=64)
    whole = c.chat.completions.create(  # greedy: sampled, the grammar also allows spelling it in many small pieces
        response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}}, temperature=0,
        **ask)
    value = json.loads(whole.choices[0].message.content)
    assert value["color"] in ("red", "green", "blue") and isinstance(value["sure"], bool) and len(value) == 2
    assert whole.choices[0].finish_reason == "stop"
    choices = ["أحمر", "红色", "rouge"]
    stream = c.chat.completions.create(stream=True, temperature=1.0, seed=3, extra_body={"guided_choice": choices},
                                       **ask)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) in choices
    with pytest.raises(openai.BadRequestError, match="the regex cannot be used"):
        c.chat.completions.create(extra_body={"guided_regex": "[0-9"}, **ask)


def test_logprobs_streamed_and_whole_agree_with_the_answer(cluster):
    c = client(cluster)
    ask = dict(model="ckpt", messages=image_message("এটা কী?", "purple"), temperature=0, max_tokens=16,
               logprobs=True, top_logprobs=3)
    whole = c.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens > 0
    assert all(len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob == item.logprob for item in content)
    joined = b"".join(bytes(item.bytes) for item in content).decode("utf-8", "replace")
    assert joined.strip() == whole.choices[0].message.content.strip()
    streamed = [item for chunk in c.chat.completions.create(stream=True, **ask) if chunk.choices
                and chunk.choices[0].logprobs for item in chunk.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in content]
    # The second run reuses the first's prompt KV (prefix cache): the same values up to float rounding.
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-4)


def test_text_completions_answer_the_rendered_chat_prompt_as_chat_does(cluster):
    """``/v1/completions`` sends its prompt as it is: given the prompt a chat request renders to, it answers as the
    chat does, with legacy logprobs that cover every token."""
    from palo.serve.openai_api import render_messages

    c = client(cluster)
    messages = [{"role": "user", "content": "Что это такое?"}]
    chat = c.chat.completions.create(model="ckpt", messages=messages, temperature=0, max_tokens=12)
    prompt, _, _ = render_messages(messages, "vicuna_v1")
    text = c.completions.create(model="ckpt", prompt=prompt, temperature=0, max_tokens=12, logprobs=2)
    # The same tokens; a completion continues its prompt's text, so a word-initial first token keeps its space
    # ("ASSISTANT:" + " Это"), where the chat answer starts without it (as the original's).
    answer = chat.choices[0].message.content
    assert text.object == "text_completion" and answer and text.choices[0].text.lstrip() == answer
    first = text.choices[0].logprobs.tokens[0]
    assert text.choices[0].text == (" " + answer if first.startswith(" ") else answer)
    # The same counts (the second reads the first's prompt from the prefix cache: more cached tokens).
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (chat.usage.prompt_tokens,
                                                                        chat.usage.completion_tokens)
    assert text.usage.prompt_tokens_details.cached_tokens > chat.usage.prompt_tokens_details.cached_tokens
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == text.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    streamed = "".join(chunk.choices[0].text for chunk in c.completions.create(
        model="ckpt", prompt=prompt, temperature=0, max_tokens=12, stream=True) if chunk.choices)
    assert streamed == text.choices[0].text


def test_errors(cluster):
    with pytest.raises(openai.AuthenticationError):
        client(cluster, key="wrong").models.list()
    assert httpx.get(cluster.url + "/v1/models").status_code == 401
    c = client(cluster)
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        c.chat.completions.create(model="no-such-model", messages=image_message("hi"))
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="this worker does not fetch image URLs"):  # passed on, refused
        c.chat.completions.create(model="ckpt", messages=remote)
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]
    with pytest.raises(openai.BadRequestError, match="base64 data URLs .* or http"):
        c.chat.completions.create(model="ckpt", messages=local)
    broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(openai.BadRequestError, match="not a readable image") as refused:
        c.chat.completions.create(model="ckpt", messages=broken)
    assert refused.value.param == "messages"  # the worker's refusal, named as the client named the field
    # Refused by the worker (only it knows the vocabulary), named as sent: 'prompt', not the worker's field.
    with pytest.raises(openai.BadRequestError, match="token ids in \\[0, ") as refused:
        c.completions.create(model="ckpt", prompt=[10**6], max_tokens=2)
    assert refused.value.param == "prompt" and "prompt_token_ids" not in refused.value.message
    assert "- 'prompt' must be a non-empty list of token ids" in refused.value.message
    with pytest.raises(openai.BadRequestError, match="not in the model's vocabulary") as refused:
        c.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "hi"}],
                                  logit_bias={str(10**6): 1})
    assert refused.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError, match="too long"):
        c.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "word " * 700}])
    with pytest.raises(openai.BadRequestError, match="the first message after the system message must be the user's"):
        c.chat.completions.create(model="ckpt", messages=[{"role": "assistant", "content": "hi"}])
    bad_json = httpx.post(cluster.url + "/v1/chat/completions", content=b"{",
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert bad_json.status_code == 400 and "invalid JSON" in bad_json.json()["error"]["message"]
    # Paths and methods it lacks, in OpenAI's shape too (FastAPI's own was {"detail": "Not Found"}).
    with pytest.raises(openai.NotFoundError, match="Invalid URL") as missing:
        c.embeddings.create(model="ckpt", input="hi")
    assert missing.value.body["type"] == "invalid_request_error"
    wrong_method = httpx.get(cluster.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert set(wrong_method.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(cluster.url + "/no-such-path").json() == {"detail": "Not Found"}  # outside /v1: as before
    for field in ("max_tokens", "top_k", "repetition_penalty", "temperature"):  # 401 digits: no float holds it
        huge = httpx.post(cluster.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], field: 10**400,
                                "seed": 1, **({"max_tokens": 3} if field != "max_tokens" else {})})
        if field in ("max_tokens", "top_k"):  # "up to the context" and "every candidate": answered
            assert huge.status_code == 200, (field, huge.text)
            continue
        assert huge.status_code == 400, (field, huge.text)
        assert huge.json()["error"]["type"] == "invalid_request_error" and field in huge.json()["error"]["message"]
    # ...and the next good request succeeds.
    ok = c.chat.completions.create(model="ckpt", messages=image_message("What is this?"), temperature=0, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def local(world):
    from palo.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cpu")
    return tokenizer, model.eval(), processor


def test_scoring_continuations_as_evaluation_harnesses_do(cluster, local):
    """lm-evaluation-harness's ``local-completions`` log-likelihood request: context + continuation as token ids,
    several prompts in one request, ``echo`` with ``max_tokens`` 1 and ``logprobs`` 1; it sums
    ``token_logprobs[len(context):-1]`` and checks each continuation token against ``top_logprobs``. The sums are the
    model's own log-likelihoods of the continuations."""
    import torch

    tokenizer, model, _ = local
    c = client(cluster)
    context = tokenizer("USER: Qu'est-ce que c'est ? ASSISTANT:").input_ids
    options = [tokenizer(text, add_special_tokens=False).input_ids for text in (" Une pomme rouge", " 赤いリンゴ")]
    response = c.completions.create(model="ckpt", prompt=[context + option for option in options], max_tokens=1,
                                    logprobs=1, echo=True, temperature=0, seed=1234)
    choices = sorted(response.choices, key=lambda choice: choice.index)
    assert len(choices) == 2
    for option, choice in zip(options, choices):
        ids = context + option
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        expected = [logprobs[p - 1, ids[p]].item() for p in range(len(context), len(ids))]
        got = choice.logprobs.token_logprobs[len(context):-1]
        assert got == pytest.approx(expected, abs=1e-4)
        assert len(choice.logprobs.tokens) == len(ids) + 1 and choice.logprobs.token_logprobs[0] is None
        greedy = [logprobs[p - 1].argmax().item() == ids[p] for p in range(len(context), len(ids))]
        assert [lp == max(top.values()) for lp, top in zip(got, choice.logprobs.top_logprobs[len(context):-1])] == \
            greedy
        assert choice.text.startswith(tokenizer.decode(ids, skip_special_tokens=True))
    assert response.usage.prompt_tokens == sum(len(context) + len(option) for option in options)
    # A text prompt scored without an answer: its text back, every token but the first scored.
    prompt = "USER: ¿Qué es esto? ASSISTANT: Una manzana."
    scored = c.completions.create(model="ckpt", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    ids = tokenizer(prompt).input_ids
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert len(scored.choices[0].logprobs.token_logprobs) == len(ids)
    assert scored.choices[0].logprobs.token_logprobs[0] is None
    assert None not in scored.choices[0].logprobs.token_logprobs[1:]
    # The same prompt as its token ids gets the same answer, without the prompt's text in front.
    question = "USER: Что это? ASSISTANT:"
    by_text = c.completions.create(model="ckpt", prompt=question, max_tokens=8, temperature=0)
    by_ids = c.completions.create(model="ckpt", prompt=tokenizer(question).input_ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text != ""
    assert (by_ids.usage.prompt_tokens, by_ids.usage.completion_tokens) == (by_text.usage.prompt_tokens,
                                                                            by_text.usage.completion_tokens)


def test_text_offsets_of_an_echo_point_into_its_text(cluster):
    """Each ``text_offset`` is where its token stands in the returned text, also for an echoed prompt, whose first
    tokens (``<s>`` and SentencePiece's space before the first word) are not in the text: they stand at 0."""
    c = client(cluster)
    for prompt in ("USER: ¿Qué es esto? ASSISTANT: Una manzana.", "Bonjour"):
        whole = c.completions.create(model="ckpt", prompt=prompt, max_tokens=0, echo=True, logprobs=0).choices[0]
        tokens, offsets = whole.logprobs.tokens, whole.logprobs.text_offset
        assert tokens[:2] == ["<s>", " " + prompt[:len(tokens[1]) - 1]] and offsets[:2] == [0, 0]
        # Past the first word, each token spells the text from its offset to the next one's.
        assert [whole.text[start:end] for start, end in zip(offsets[2:], offsets[3:] + [len(whole.text)])] == \
            tokens[2:]
        streamed = c.completions.create(model="ckpt", prompt=prompt, max_tokens=4, echo=True, logprobs=0,
                                        stream=True, temperature=0)
        pieces = [chunk.choices[0] for chunk in streamed if chunk.choices and chunk.choices[0].logprobs]
        assert [o for piece in pieces for o in piece.logprobs.text_offset][:len(offsets)] == offsets


def test_chat_scores_an_answer_to_an_image_question(cluster, local):
    """vLLM's chat extras: the assistant's answer continued (``continue_final_message``) and ``prompt_logprobs``
    with ``prompt_token_ids``: the answer's tokens scored after the image and the question, as one forward pass over
    the rendered prompt scores them."""
    import torch

    from palo.mm_utils import process_images, tokenizer_image_token
    from palo.serve.openai_api import render_messages

    tokenizer, model, processor = local
    c = client(cluster)
    messages = image_message("ما لون الدائرة؟", "red") + [{"role": "assistant", "content": "إنها حمراء"}]
    response = c.chat.completions.create(model="ckpt", messages=messages, max_tokens=1, temperature=0, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "prompt_logprobs": 1})
    extra = response.model_extra
    prompt, _, _ = render_messages(messages, "vicuna_v1", continue_final=True)
    ids = tokenizer_image_token(prompt, tokenizer)
    assert prompt.endswith("ASSISTANT: إنها حمراء") and extra["prompt_token_ids"] == ids
    pixels = process_images([make_image("red")], processor, model.config)  # as the worker preprocesses it
    spliced = model.prepare_multimodal_inputs(torch.tensor([ids]), pixels, None)
    logprobs = torch.log_softmax(model(inputs_embeds=spliced.inputs_embeds).logits[0].float(), dim=-1)
    scored = extra["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None and scored[ids.index(-200)] is None
    position = 0
    for i, token in enumerate(ids):
        if i and token != -200:
            entry = scored[i][str(token)]
            assert entry["logprob"] == pytest.approx(logprobs[position - 1, token].item(), abs=1e-4), i
            assert (entry["rank"] == 1) == (logprobs[position - 1].argmax().item() == token), i
        position += model.image_token_count if token == -200 else 1


def test_a_cache_salt_from_the_official_client_keeps_an_image_to_its_group(cluster):
    """vLLM's ``cache_salt`` (sent in ``extra_body``): another group's request runs the vision tower again instead
    of finding the image cached, the same group's does not; a bad salt is a 400 naming it."""
    c = client(cluster)

    def encoded() -> int:
        return httpx.post(cluster.main.url + "/worker_get_status", timeout=10).json()["engine"]["images_encoded"]

    ask = dict(model="ckpt", messages=image_message("Qu'est-ce que c'est ?", "teal"), temperature=0, max_tokens=6)
    answers, counts = [], [encoded()]
    for salt in ("group-1", "group-2", "group-1"):
        answers.append(c.chat.completions.create(extra_body={"cache_salt": salt}, **ask).choices[0].message.content)
        counts.append(encoded())
    assert len(set(answers)) == 1
    assert [b - a for a, b in zip(counts, counts[1:])] == [1, 1, 0]
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        c.chat.completions.create(extra_body={"cache_salt": ""}, **ask)


def test_stopping_an_answer_never_cuts_short_a_close_under_way_and_logs_no_failure(caplog):
    """An answer whose client left is stopped by closing its worker stream from a task of its own. It was stopped by
    cancelling its reader, which could land while the reader was inside httpx's close at the body's end: httpcore's
    clean-up was cut short and the router's pool kept the connection and its socket for good (the controller's
    open files grew with clients that left, by a soak test of 20,000 requests)."""
    import asyncio
    import logging

    from palo.serve.openai_api import AnswerReader, GenerationRequest

    chat = GenerationRequest(model="m", prompt="p", images=[], temperature=0.0, top_p=1.0, max_tokens=8,
                             template_stop=None, stops=[], stream=True, include_usage=False)
    logger = logging.getLogger("test.answer_reader")

    class Stream:
        worker = "http://worker"

        def __init__(self, ends: bool) -> None:
            self.ends, self.stopped, self.shut = ends, False, asyncio.Event()
            self.closing, self.closes_finished = asyncio.Event(), []

        async def chunks(self):
            if not self.ends:  # a long answer: nothing comes until the stream is closed, then a read error
                await self.shut.wait()
                raise OSError("connection closed")
            return
            yield

        async def aclose(self) -> None:
            self.closing.set()
            await asyncio.sleep(0.05)  # the close is I/O too (httpcore takes a lock and may close the socket)
            self.shut.set()
            self.closes_finished.append(asyncio.current_task())

    async def scenario() -> None:
        # 1. stopped while the reader closes the stream it read to the end: that close completes
        stream = Stream(ends=True)
        reader = AnswerReader(stream, chat, logger, asyncio.Event())
        await stream.closing.wait()
        reader.cancel()
        await reader.closed()
        assert reader._task in stream.closes_finished
        # 2. stopped while the reader waits for a chunk: it ends on the closed stream, quietly
        stream = Stream(ends=False)
        reader = AnswerReader(stream, chat, logger, asyncio.Event())
        await asyncio.sleep(0.01)
        reader.cancel()
        await asyncio.wait_for(reader.closed(), 5)
        assert reader._task.done() and not reader._task.cancelled()

    with caplog.at_level(logging.ERROR, logger="test.answer_reader"):
        asyncio.run(scenario())
    assert not caplog.records


def test_an_image_url_is_a_data_url_whatever_the_case_of_its_scheme():
    """As the worker reads them: ``DATA:IMAGE/PNG;BASE64,`` was refused here and ``;BASE64`` taken by the worker."""
    from palo.serve.openai_api import APIError, image_part_data

    for url in ("DATA:IMAGE/PNG;BASE64,iVBO", "Data:image/png;base64,iVBO", "data:image/png;BASE64,iVBO"):
        assert image_part_data({"type": "image_url", "image_url": {"url": url}}) == "iVBO"
    for url in ("data:image/png,iVBO", "image/png;base64,iVBO", "data:image/png;base64"):  # not base64 / no scheme
        with pytest.raises(APIError, match="must be base64 data URLs"):
            image_part_data({"type": "image_url", "image_url": {"url": url}})
