"""The multimodal causal LM: parity with transformers' Llava, generation contracts, bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

from palo.constants import IMAGE_TOKEN_INDEX
from palo.conversation import conv_templates
from palo.mm_utils import KeywordsStoppingCriteria, left_pad, tokenizer_image_token
from palo.model.multimodal import ImagePlaceholderMismatch
from palo.model.tokenizer import load_tokenizer
from palo.testing.hf_llava import llava_config, to_llava_state_dict


def _prompt(question: str, images: int = 1) -> str:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" * images + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def to_hf_llava(model, image_token_id: int) -> LlavaForConditionalGeneration:
    """transformers' own Llava holding exactly the weights of a PALO mlp2x_gelu model."""
    tower = model.get_vision_tower()
    text = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if not k.startswith("mm_")})
    hf = LlavaForConditionalGeneration(llava_config(text, CLIPVisionConfig(**tower.config.to_dict()),
                                                    image_token_id)).eval()
    result = hf.load_state_dict(to_llava_state_dict(model.state_dict()), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert not [k for k in result.missing_keys if "position_ids" not in k], result.missing_keys
    return hf


def test_logits_equal_transformers_llava(world):
    tokenizer = load_tokenizer(world.tokenizer_dir)
    model = world.model
    image_token_id = len(tokenizer) - 1
    hf = to_hf_llava(model, image_token_id)
    ids = tokenizer_image_token(_prompt("ما الذي في الصورة؟ 图中有什么？", images=2), tokenizer, return_tensors="pt")
    assert image_token_id not in ids.tolist()
    pixels = torch.randn(2, 3, 56, 56)
    n = model.get_vision_tower().num_tokens
    expanded = []
    for token in ids.tolist():
        expanded.extend([image_token_id] * n if token == IMAGE_TOKEN_INDEX else [token])
    with torch.no_grad():
        ours = model(input_ids=ids[None], images=pixels).logits
        theirs = hf(input_ids=torch.tensor([expanded]), pixel_values=pixels).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_greedy_with_cache_equals_argmax_of_full_recomputation(world):
    tokenizer = load_tokenizer(world.tokenizer_dir)
    model = world.model
    ids = tokenizer_image_token(_prompt("这张图片里有什么？"), tokenizer, return_tensors="pt")[None]
    pixels = torch.randn(1, 3, 56, 56)
    out = model.generate(ids, images=pixels, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(out[:, : ids.shape[1]], ids)  # PALO's convention: prompt ids, then new ids
    new = out[0, ids.shape[1]:]
    assert new.shape[0] == 12
    for step in range(new.shape[0]):
        prefix = torch.cat([ids, new[:step][None]], dim=1)
        with torch.no_grad():
            logits = model(input_ids=prefix, images=pixels).logits
        assert logits[0, -1].argmax().item() == new[step].item(), f"step {step}"


def test_generate_with_output_dict_returns_prompt_and_new_ids_and_their_scores(world):
    """``return_dict_in_generate`` (scores for research use) gives the same ids as the plain call, in ``sequences``,
    and one score row per new token whose argmax is that token."""
    tokenizer = load_tokenizer(world.tokenizer_dir)
    ids = tokenizer_image_token(_prompt("Что на картинке?"), tokenizer, return_tensors="pt")[None]
    pixels = torch.randn(1, 3, 56, 56)
    kwargs = dict(images=pixels, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    plain = world.model.generate(ids, **kwargs)
    out = world.model.generate(ids, return_dict_in_generate=True, output_scores=True, **kwargs)
    assert torch.equal(out.sequences, plain)
    assert len(out.scores) == 5
    assert [s[0].argmax().item() for s in out.scores] == plain[0, ids.shape[1]:].tolist()


def test_max_and_min_length_count_the_prompts_ids_with_images_as_without(world):
    """``max_length`` counts the prompt's ids, an image one id, as generation from ids does (the original's, and
    this one's for text): from the spliced embeddings transformers counted every feature position (576 a CLIP-L/336
    image), so ``max_length=512`` failed with a PALO-7B prompt and larger values gave 575 tokens too few."""
    tokenizer = load_tokenizer(world.tokenizer_dir)
    ids = tokenizer_image_token(_prompt("Что на картинке?"), tokenizer, return_tensors="pt")[None]
    pixels = torch.randn(1, 3, 56, 56)
    prompt = ids.shape[1]
    assert world.model.get_vision_tower().num_tokens > 1  # the case: more positions than ids
    # An end-of-sequence token that greedy decoding picks at once, so that only min_length holds the answer open.
    first = int(world.model.generate(ids, images=pixels, max_new_tokens=1, do_sample=False)[0, -1])
    for extra in (1, 3, 7):
        out = world.model.generate(ids, images=pixels, max_length=prompt + extra, do_sample=False, eos_token_id=-1)
        assert out.shape[1] == prompt + extra
        held = world.model.generate(ids, images=pixels, min_length=prompt + extra, max_new_tokens=10,
                                    eos_token_id=first, do_sample=False)
        assert held.shape[1] - prompt > extra - 1 and first not in held[0, prompt:prompt + extra].tolist()
    # max_new_tokens wins over max_length, as in transformers.
    assert world.model.generate(ids, images=pixels, max_length=prompt + 2, max_new_tokens=4, eos_token_id=-1,
                                do_sample=False).shape[1] == prompt + 4
    with pytest.raises(ValueError, match="no room for new tokens"):
        world.model.generate(ids, images=pixels, max_length=prompt)


def test_batched_generation_equals_one_by_one(world):
    tokenizer = load_tokenizer(world.tokenizer_dir)
    model = world.model
    cases = [
        (_prompt("Describe the scene in detail, please.", images=1), 1),
        (_prompt("Что на изображении? Сколько здесь треугольников?", images=2), 2),
        (_prompt("कितने त्रिभुज हैं?", images=0), 0),
        (_prompt("¿Qué hay?", images=1), 1),
    ]
    pixels = [torch.randn(n, 3, 56, 56) for _, n in cases]
    singles = []
    for (prompt, n), px in zip(cases, pixels):
        ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
        out = model.generate(ids, images=px if n else None, max_new_tokens=10, do_sample=False, pad_token_id=0)
        singles.append(out[0, ids.shape[1]:])
    rows = [tokenizer_image_token(p, tokenizer, return_tensors="pt") for p, _ in cases]
    ids, mask = left_pad(rows, pad_id=0)
    out = model.generate(ids, images=torch.cat(pixels), attention_mask=mask, max_new_tokens=10, do_sample=False,
                         pad_token_id=0)
    for i, single in enumerate(singles):
        batched = out[i, ids.shape[1]:]
        # A row that stopped at EOS is padded afterwards in the batch.
        assert torch.equal(batched[: single.shape[0]], single), f"row {i}"


def test_several_answers_per_prompt_follow_their_own_prompt(world):
    """``num_return_sequences``: each prompt's answers are consecutive rows, each after its own prompt ids, and the
    first of a beam search's answers is the one a plain beam search gives."""
    tokenizer = load_tokenizer(world.tokenizer_dir)
    rows = [tokenizer_image_token(_prompt(q), tokenizer, return_tensors="pt") for q in ("图中有什么？", "What is it?")]
    ids, mask = left_pad(rows, pad_id=0)
    pixels = torch.randn(2, 3, 56, 56)
    kwargs = dict(images=pixels, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, num_beams=3, pad_token_id=0)
    best = world.model.generate(ids, **kwargs)
    out = world.model.generate(ids, num_return_sequences=3, **kwargs)
    assert out.shape == (6, ids.shape[1] + 6)
    for row in range(6):
        assert torch.equal(out[row, : ids.shape[1]], ids[row // 3]), f"row {row}"
    assert torch.equal(out[[0, 3]], best)


def test_keyword_stopping_criteria_see_prompt_and_new_ids(world):
    tokenizer = load_tokenizer(world.tokenizer_dir)
    model = world.model
    ids = tokenizer_image_token(_prompt("What is shown?"), tokenizer, return_tensors="pt")[None]
    pixels = torch.randn(1, 3, 56, 56)
    free = model.generate(ids, images=pixels, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    # Use the third generated token's text as a stop keyword: generation must stop right there.
    keyword_ids = free[2:3]
    keyword = tokenizer.decode(keyword_ids, skip_special_tokens=True).strip()
    assert keyword
    stopper = KeywordsStoppingCriteria([keyword], tokenizer, ids)
    out = model.generate(ids, images=pixels, max_new_tokens=8, do_sample=False, stopping_criteria=[stopper])
    stopped = out[0, ids.shape[1]:]
    assert stopped.shape[0] < free.shape[0]
    assert keyword in tokenizer.decode(stopped, skip_special_tokens=True)


def test_text_only_generation_is_plain_llama(world):
    tokenizer = load_tokenizer(world.tokenizer_dir)
    ids = tokenizer(_prompt("Hello", images=0), return_tensors="pt").input_ids
    out = world.model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert torch.equal(out[:, : ids.shape[1]], ids) and out.shape[1] == ids.shape[1] + 4


def test_training_forward_masks_image_rows_and_gives_loss(world):
    tokenizer = load_tokenizer(world.tokenizer_dir)
    ids = tokenizer_image_token(_prompt("What?"), tokenizer, return_tensors="pt")[None]
    labels = ids.clone()
    labels[labels == IMAGE_TOKEN_INDEX] = -100
    out = world.model(input_ids=ids, images=torch.randn(1, 3, 56, 56), labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.logits.shape[1] == ids.shape[1] - 1 + world.model.get_vision_tower().num_tokens


@pytest.mark.parametrize("packed", [False, True])
def test_a_text_only_training_batch_runs_what_an_image_batch_runs_in_the_same_order(world, packed):
    """Ranks whose batches differ in kind must issue the same collectives: the tower runs (ZeRO-3 gathers its
    weights), and every trainable gradient becomes ready in the same order (ZeRO-2/3 reduce them in buckets in that
    order); the text-only loss is unchanged. Before, the projector's gradients came before the embeddings' on a
    text-only batch and after them on an image batch, and 2-rank ZeRO runs stopped in gloo."""
    import copy

    from palo.testing import tiny

    tokenizer = load_tokenizer(world.tokenizer_dir)
    model = tiny.build_palo_model(world.config, world.clip_dir, seed=3).train()
    model.get_vision_tower().requires_grad_(False)  # frozen, as in every PALO recipe
    order: list[str] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))
    tower_calls = []
    model.get_vision_tower().register_forward_hook(lambda *_: tower_calls.append(1))

    def step(question: str, images: int) -> tuple[list[str], torch.Tensor]:
        ids = tokenizer_image_token(_prompt(question, images=images), tokenizer, return_tensors="pt")[None]
        labels = torch.where(ids == IMAGE_TOKEN_INDEX, -100, ids)
        kwargs = {"images": torch.randn(1, 3, 56, 56)} if images else {}
        if packed:  # two samples in one row, positions restarting
            ids, labels = torch.cat([ids, ids], 1), torch.cat([labels, labels], 1)
            length = ids.shape[1] // 2
            kwargs.update(packed=True, position_ids=torch.arange(length).repeat(2)[None])
            if images:
                kwargs["images"] = torch.randn(2, 3, 56, 56)
        order.clear()
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels, **kwargs).loss
        loss.backward()
        return list(order), loss.detach()

    image_order, _ = step("What colour is it?", images=1)
    tower_calls.clear()
    text_order, text_loss = step("Hello, how are you?", images=0)
    assert text_order == image_order and "model.mm_projector.0.weight" in text_order
    assert len(tower_calls) == 1  # one blank image through the tower
    assert all(float(p.grad.abs().max()) == 0.0 for n, p in model.named_parameters() if "mm_projector" in n)
    reference = copy.deepcopy(model).eval()  # no probe outside training
    with torch.no_grad():
        ids = tokenizer_image_token(_prompt("Hello, how are you?", images=0), tokenizer, return_tensors="pt")[None]
        kwargs = {}
        if packed:
            ids = torch.cat([ids, ids], 1)
            kwargs = dict(packed=True, position_ids=torch.arange(ids.shape[1] // 2).repeat(2)[None])
        assert torch.allclose(reference(input_ids=ids, labels=ids, **kwargs).loss, text_loss, atol=1e-6)


def test_the_original_embedding_entry_point_and_positional_forward(world):
    """Scripts written for PALO / LLaVA-1.5 embed inputs with prepare_inputs_labels_for_multimodal (its argument
    order, a 6-tuple) and call forward positionally, past_key_values fourth."""
    tokenizer = load_tokenizer(world.tokenizer_dir)
    model = world.model
    ids, mask = left_pad([tokenizer_image_token(_prompt(q), tokenizer, return_tensors="pt")
                          for q in ("What is this?", "这张图片里有什么颜色？")], tokenizer.pad_token_id or 0)
    labels = ids.masked_fill(mask == 0, -100)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, pixels)[1] is None
        given = (mask.cumsum(-1) - 1).clamp(min=0)
        none, positions, spliced_mask, cache, embeds, spliced_labels = model.prepare_inputs_labels_for_multimodal(
            ids, given, mask, None, labels, pixels)
        assert none is None and cache is None and spliced_mask.dtype == mask.dtype
        n = model.get_vision_tower().num_tokens
        assert embeds.shape[:2] == spliced_labels.shape == (2, ids.shape[1] - 1 + n)
        assert int((spliced_labels == -100).sum(1).min()) >= n  # image rows are not learned
        ours = model(input_ids=ids, attention_mask=mask, images=pixels, labels=labels)
        theirs = model(inputs_embeds=embeds, attention_mask=spliced_mask, position_ids=positions, labels=spliced_labels)
        torch.testing.assert_close(theirs.logits, ours.logits)
        torch.testing.assert_close(theirs.loss, ours.loss)
        # Without images, or for one decoding step, the inputs come back with no embeddings.
        assert model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, None) == (
            ids, None, mask, None, None, None)

        # forward(input_ids, attention_mask, position_ids, past_key_values, ...): one cached step, positionally.
        text = tokenizer("USER: hello ASSISTANT:", return_tensors="pt").input_ids
        full = model(text).logits[:, -1]
        step = model(text[:, :-1], None, None, None, None, None, True)
        last = model(text[:, -1:], None, None, step.past_key_values).logits[:, -1]
        # return_dict=False gives transformers' tuple, (loss, logits, ...) with labels, as the original did.
        loss, logits = model(input_ids=ids, attention_mask=mask, images=pixels, labels=labels, return_dict=False)[:2]
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((loss, logits), (ours.loss, ours.logits))


@pytest.mark.parametrize("question", ["What is this?", "这张图片里有什么颜色？"])
def test_a_hand_written_decoding_loop_that_passes_the_images_every_step(world, question):
    """The original generate called forward with the images at every step and a text-level mask; the images are in
    the cache after the first step, and the mask grows to the cached positions (the step used to splice them into one
    token: a mask shape error). One prompt per batch: a hand-written loop over left-padded prompts meets the
    checkpoint's right padding of the spliced rows, as it did in the original."""
    tokenizer = load_tokenizer(world.tokenizer_dir)
    model = world.model.eval()
    ids = tokenizer_image_token(_prompt(question), tokenizer, return_tensors="pt")[None]
    mask = torch.ones_like(ids)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = model.generate(ids, images=pixels, max_new_tokens=4, min_new_tokens=4,
                                  do_sample=False)[:, ids.shape[1]:]
        out = model(ids, mask, None, None, None, None, True, None, None, pixels)
        tokens = []
        for _ in range(4):
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(step)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)  # text level, as generate grows it
            out = model(step, mask, None, out.past_key_values, None, None, True, None, None, pixels)
    assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_the_original_tower_loading_code_runs(world):
    """LLaVA-derived loaders do: tower = model.get_model().get_vision_tower(); if not tower.is_loaded:
    tower.load_model(); tower.to(device=..., dtype=...); then call it on a list of images."""
    model = world.model
    tower = model.get_model().get_vision_tower()
    assert tower is model.get_vision_tower()
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    if not tower.is_loaded:
        tower.load_model()
    tower.load_model()  # nothing to load: the weights stay the checkpoint's
    tower.to(device="cpu", dtype=torch.float32)
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert tower.device.type == "cpu" and tower.vision_tower_name == model.config.mm_vision_tower
    assert (tower.select_layer, tower.select_feature) == (model.config.mm_vision_select_layer, "patch")
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        batched, listed = tower(pixels), tower([pixels[0], pixels[1]])
    assert [f.shape for f in listed] == [(1, *batched.shape[1:])] * 2
    torch.testing.assert_close(torch.cat(listed), batched)


def test_images_and_placeholders_must_agree(world):
    tokenizer = load_tokenizer(world.tokenizer_dir)
    ids = tokenizer_image_token(_prompt("Two?", images=2), tokenizer, return_tensors="pt")[None]
    with pytest.raises(ImagePlaceholderMismatch, match="1 image\\(s\\) for 2 <image> placeholder"):
        world.model.generate(ids, images=torch.randn(1, 3, 56, 56), max_new_tokens=2)
    with pytest.raises(ValueError, match="no images were given"):
        world.model(input_ids=ids)
    text_ids = tokenizer(_prompt("none", images=0), return_tensors="pt").input_ids
    with pytest.raises(ImagePlaceholderMismatch, match="3 image\\(s\\) for 0"):
        world.model.generate(text_ids, images=torch.randn(3, 3, 56, 56), max_new_tokens=2)


def test_image_batch_shapes_accepted(world):
    tokenizer = load_tokenizer(world.tokenizer_dir)
    ids = tokenizer_image_token(_prompt("Two?", images=2), tokenizer, return_tensors="pt")[None]
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a = world.model(input_ids=ids, images=pixels).logits
        b = world.model(input_ids=ids, images=[pixels[0], pixels[1]]).logits
        c = world.model(input_ids=ids, images=pixels[None]).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="images must be"):
        world.model(input_ids=ids, images=torch.randn(2, 56, 56, 3, 1, 1))


def test_zero_weighted_images_cannot_overflow_a_float16_batch(world):
    """The blank image a text-only training batch runs, and a text-only row's dummy image, join the graph weighted
    by zero: summed before weighting, float16 features past 65504 in all gave inf, 0 x inf NaN, and a NaN batch
    (pure float16 as DeepSpeed --fp16 runs; a 7B's 576 x 4096 features get there at a mean of 0.03)."""
    from palo.testing import tiny

    tokenizer = load_tokenizer(world.tokenizer_dir)
    model = tiny.build_palo_model(world.config, world.clip_dir, seed=3).half()
    with torch.no_grad():
        model.projector[-1].bias.fill_(80.0)  # every feature finite, their sum is not (in float16)
    assert not torch.isfinite(model._blank_image_features().sum())
    ids = tokenizer_image_token(_prompt("Say hello in French.", images=0), tokenizer, return_tensors="pt")[None]
    assert torch.isfinite(model.train()(input_ids=ids, labels=ids).loss)
    with_image = tokenizer_image_token(_prompt("What is it?"), tokenizer, return_tensors="pt")
    text = ids[0, : len(with_image)]
    spliced = model.prepare_multimodal_inputs(torch.stack([with_image, text]), torch.zeros(2, 3, 56, 56).half(),
                                              torch.ones(2, len(with_image), dtype=torch.long))
    assert torch.isfinite(spliced.inputs_embeds).all()


def test_generate_keeps_the_whole_prompt_and_stops_each_row_at_the_context(world):
    """generate cut a prompt past tokenizer_model_max_length (the question and "ASSISTANT:" were lost: PALO-7B's
    2,049 to 4,095 positions were answered truncated) and ran past max_position_embeddings wherever max_new_tokens
    allowed; the engine does neither, so answers near the limit depended on the path."""
    import copy

    from palo.model.multimodal import spliced_length

    tokenizer = load_tokenizer(world.tokenizer_dir)
    model = copy.deepcopy(world.model).eval()
    pixels = torch.randn(1, 3, 56, 56)
    ids = tokenizer_image_token(_prompt("Describe the picture in detail, please."), tokenizer,
                                return_tensors="pt")[None]
    positions = spliced_length(ids[0], model.image_token_count)
    free = model.generate(ids, images=pixels, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    model.config.tokenizer_model_max_length = positions - 5  # training's cut; not generation's
    kept = model.generate(ids, images=pixels, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert torch.equal(kept, free)
    model.config.max_position_embeddings = positions + 3  # room for three answer tokens
    limited = model.generate(ids, images=pixels, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(limited[0, ids.shape[1]:], free[:3])
    text = tokenizer("USER: Hello there, how are you? ASSISTANT:", return_tensors="pt").input_ids
    model.config.max_position_embeddings = text.shape[1] + 2
    assert model.generate(text, max_new_tokens=6, min_new_tokens=6, do_sample=False).shape[1] == text.shape[1] + 2
    model.config.max_position_embeddings = positions
    with pytest.raises(ValueError, match=f"the prompt takes {positions} of the model's {positions} context"):
        model.generate(ids, images=pixels, max_new_tokens=2)


@pytest.mark.parametrize("settings", [{"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}],
                         ids=["beams", "return-sequences"])
def test_a_stopping_criterion_sees_each_row_with_its_prompt_under_beams_and_several_answers(world, settings):
    """The criterion got the prompts' rows joined to k rows per prompt: a RuntimeError, so model_vqa and run_llava
    with --num_beams 2 (their stop-string criterion is always on) stopped at the first question."""
    tokenizer = load_tokenizer(world.tokenizer_dir)
    model = world.model.eval()
    ids = tokenizer_image_token(_prompt("What is it?"), tokenizer, return_tensors="pt")[None]
    seen: list[torch.Tensor] = []

    class Record(KeywordsStoppingCriteria):
        def __call__(self, input_ids, scores=None, **kwargs):
            seen.append(input_ids)
            return super().__call__(input_ids, scores, **kwargs)

    torch.manual_seed(0)
    out = model.generate(ids, images=torch.randn(1, 3, 56, 56), max_new_tokens=3, pad_token_id=0,
                         stopping_criteria=[Record(["</s>"], tokenizer, ids)], **settings)
    assert out.shape[0] == settings.get("num_return_sequences", 1) and seen
    # k rows per prompt (beam search shows 2 x beams candidates), each the prompt followed by its new tokens
    assert all(rows.shape[0] >= 2 and torch.equal(rows[:, : ids.shape[1]], ids.expand(rows.shape[0], -1))
               for rows in seen)
