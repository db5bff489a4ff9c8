"""The per-row sampler: each row's own settings, its own random stream, greedy rows exact."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from palo.constants import IMAGE_TOKEN_INDEX
from palo.engine.sampling import (
    PenaltyState,
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    prompt_token_set,
    sample,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_their_distribution():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1e-4)]
    assert sample(logits, params, [None, _gen(1), None])[[0, 2]].tolist() == [1, 1]
    counts = torch.zeros(4)
    g = _gen(0)
    for _ in range(4000):
        counts[sample(logits[:1], [SamplingParams(temperature=1.0)], [g])[0]] += 1
    expected = torch.softmax(logits[0], -1) * 4000
    assert torch.allclose(counts, expected, atol=4 * expected.sqrt().max().item())


def test_top_k_and_top_p_limit_the_candidates_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.6)]
    seen = [set(), set()]
    g = [_gen(1), _gen(2)]
    for _ in range(500):
        a, b = sample(logits, params, g).tolist()
        seen[0].add(a)
        seen[1].add(b)
    assert seen[0] == {0, 1}  # top-2
    assert seen[1] == {0, 1}  # 0.5 < 0.6, so the second is still needed; the third never


def test_top_p_stops_at_the_candidate_whose_mass_before_it_reaches_top_p():
    """A candidate is kept while the mass before it is *under* top_p: of two tokens at exactly 0.5, top_p 0.5 keeps
    the first alone (its 0.5 already reaches top_p). Which of the tied two sorts first is the sort's affair (token 0
    on CPU); that only one is ever drawn is the rule."""
    logits = torch.zeros(1, 2)  # exactly 0.5 each, so the mass before the second is exactly 0.5

    def drawn(top_p):
        return {sample(logits, [SamplingParams(temperature=1.0, top_p=top_p)], [_gen(seed)]).item()
                for seed in range(40)}

    assert len(drawn(0.5)) == 1
    assert drawn(0.51) == {0, 1}  # just above, the second is needed too


def test_top_p_counts_mass_among_the_top_k_candidates():
    """Top-k first, then top-p of what it kept, renormalised (transformers' warpers and vLLM): of 0.5 / 0.3 / 0.2,
    top-2 keeps 0.625 / 0.375, and top-p 0.6 then needs the first alone. Against the whole distribution the second
    looked needed (0.5 < 0.6) and was drawn about a third of the time."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    g = _gen(5)
    drawn = {sample(logits, [SamplingParams(temperature=1.0, top_k=2, top_p=0.6)], [g]).item() for _ in range(300)}
    assert drawn == {0}


def test_a_top_k_beyond_the_vocabulary_keeps_every_candidate_and_harms_no_other_row():
    """A client's top_k of 10**19 once overflowed the step's tensor and failed every request decoding beside it."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    huge = [SamplingParams(temperature=1.0, top_k=10**19, seed=3), SamplingParams(temperature=1.0, top_k=2, seed=4)]
    plain = [SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.0, top_k=2, seed=4)]
    g_huge, g_plain = [_gen(3), _gen(4)], [_gen(3), _gen(4)]
    for _ in range(50):
        assert sample(logits, huge, g_huge).tolist() == sample(logits, plain, g_plain).tolist()


def test_a_row_draws_the_same_tokens_whatever_it_is_batched_with():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    params = [SamplingParams(temperature=0.8, seed=s) for s in range(5)]
    alone = [sample(logits[i:i + 1], [params[i]], [_gen(i)]).item() for i in range(5)]
    together = sample(logits, params, [_gen(i) for i in range(5)]).tolist()
    assert together == alone


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_tokens=0), dict(temperature=float("nan")), dict(presence_penalty=2.5),
                                 dict(frequency_penalty=-2.1), dict(frequency_penalty=float("nan")),
                                 dict(repetition_penalty=0), dict(repetition_penalty=float("inf")),
                                 dict(logit_bias={-1: 1.0}), dict(logit_bias={3: 100.5}),
                                 dict(logit_bias={3: float("nan")}), dict(logit_bias=[(3, 1.0), (3, 2.0)]),
                                 dict(min_p=1.5), dict(min_p=float("nan")), dict(min_tokens=-1),
                                 dict(max_tokens=4, min_tokens=5), dict(stop_token_ids=[-2])])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_repetition_penalty_is_transformers_rule_over_the_prompt_text_and_the_answer():
    torch.manual_seed(0)
    logits = torch.randn(2, 12)
    prompts = [[1, 4, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 4, 7], [2]]
    answers = [[9, 7], []]
    params = [SamplingParams(repetition_penalty=1.7), SamplingParams(repetition_penalty=0.6)]
    got = apply_penalties(logits, params, prompts, answers)
    for i, r in enumerate((1.7, 0.6)):
        seen = torch.tensor([[t for t in prompts[i] + answers[i] if t >= 0]])
        expected = RepetitionPenaltyLogitsProcessor(r)(seen, logits[i:i + 1].clone())
        assert torch.allclose(got[i], expected[0]), i


def test_frequency_and_presence_penalties_are_openai_rule_over_the_answer_per_row():
    torch.manual_seed(1)
    logits = torch.randn(3, 10)
    prompts = [[3, 3, 5], [3], [3, 5]]
    answers = [[5, 5, 5, 8], [5, 8], [5]]
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=-0.25), SamplingParams(),
              SamplingParams(presence_penalty=1.5, repetition_penalty=1.2)]
    got = apply_penalties(logits, params, prompts, answers)
    expected = logits.clone()
    for token in range(10):
        count = answers[0].count(token)  # the prompt does not count for these two
        expected[0, token] -= 0.5 * count + (-0.25 if count else 0.0)
        value = expected[2, token]
        if token in prompts[2] + answers[2]:
            value = value / 1.2 if value > 0 else value * 1.2
        expected[2, token] = value - (1.5 if token in answers[2] else 0.0)
    assert torch.allclose(got, expected)
    assert torch.equal(got[1], logits[1])  # a row that asks for nothing is untouched


def test_penalties_change_what_greedy_and_sampled_rows_choose():
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0]] * 2)
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams(temperature=0.01 + 1e-9, top_k=1,
                                                                    presence_penalty=2.0)]
    # Token 1 leads by 0.5; once the answer holds it, each row's penalty puts token 2 first.
    assert sample(logits, params, [None, _gen(0)], [[0], [0]], [[1], [1]]).tolist() == [2, 2]
    assert sample(logits, params, [None, _gen(0)], [[0], [0]], [[], []]).tolist() == [1, 1]
    unpenalised = [SamplingParams(), SamplingParams()]
    assert apply_penalties(logits, unpenalised, [[0], [0]], [[1], [1]]) is logits
    with pytest.raises(ValueError, match="penalised rows"):
        sample(logits, params, [None, _gen(0)])


def test_logit_bias_is_added_to_its_own_row_only_and_leaves_the_callers_logits_alone():
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    before = logits.clone()
    params = [SamplingParams(logit_bias={1: 2.5, 3: -1}), SamplingParams(), SamplingParams(logit_bias=[(1, 0.5)])]
    expected = before.clone()
    expected[0, 1] += 2.5
    expected[0, 3] -= 1
    expected[2, 1] += 0.5
    assert torch.equal(apply_logit_bias(logits, params), expected)
    assert torch.equal(logits, before)  # the caller's logits still give the model's own log-probabilities
    assert apply_logit_bias(logits, [SamplingParams()] * 3) is logits
    assert SamplingParams(logit_bias={"4": 1, 2: -3}).logit_bias == ((2, -3.0), (4, 1.0))


def test_logit_bias_bans_forces_and_reshapes_what_rows_choose_after_their_penalties():
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0]] * 3)
    params = [SamplingParams(logit_bias={1: -100}), SamplingParams(temperature=1.0, logit_bias={0: 100}),
              SamplingParams(repetition_penalty=2.0, logit_bias={1: 1.2})]
    # Row 0: its favourite banned; row 1 samples but the forced token is all its mass; row 2: the penalty halves
    # token 1 (3.0 -> 1.5, behind token 2's 2.5) and the bias after it puts it back in front (2.7); added before the
    # penalty it would not ((3.0 + 1.2) / 2 = 2.1).
    assert sample(logits, params, [None, _gen(0), None], [[0]] * 3, [[], [], [1]]).tolist() == [2, 0, 1]
    counts = torch.zeros(4)
    g = _gen(3)
    row = [SamplingParams(temperature=1.0, logit_bias={3: 2.0, 1: -1.0})]
    for _ in range(4000):
        counts[sample(logits[:1], row, [g])[0]] += 1
    expected = torch.softmax(logits[0] + torch.tensor([0.0, -1.0, 0.0, 2.0]), -1) * 4000
    assert torch.allclose(counts, expected, atol=4 * expected.sqrt().max().item())


def test_the_penalty_state_counts_what_the_lists_count_and_gives_the_same_logits():
    """Rows opened, fed a token a step, closed and reused (and grown past their number) hold what counting the
    prompts and answers again gives; penalties applied from them equal penalties applied from the lists."""
    torch.manual_seed(0)
    vocab = 12
    state = PenaltyState(2, vocab, "cpu")
    prompts = [[3, 3, IMAGE_TOKEN_INDEX, 5], [7], [1, 2, 11]]
    answers: list[list[int]] = [[], [], []]
    rows = [state.open(prompt_token_set(p)) for p in prompts]  # the third grows the state
    assert sorted(rows) == [0, 1, 2]
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(frequency_penalty=0.7, presence_penalty=0.2),
              SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.4)]
    for step in range(6):
        tokens = torch.randint(0, vocab, (3,))
        logits = torch.randn(3, vocab)
        index = torch.tensor(rows)
        from_state = apply_penalties(logits, params, counts=state.gather(index))
        assert torch.equal(from_state, apply_penalties(logits, params, prompts, answers)), step
        state.add(index, tokens)
        for answer, token in zip(answers, tokens.tolist()):
            answer.append(token)
    state.close(rows[1])
    again = state.open(prompt_token_set([4]))  # a reused row starts from nothing
    assert again == rows[1]
    seen, counts = state.gather(torch.tensor([again]))
    assert seen[0].nonzero().flatten().tolist() == [4] and not counts.any()


def test_min_p_keeps_the_candidates_near_the_most_likely_and_top_p_counts_among_them():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    # min_p 0.5: only what is at least half as likely as token 0 (tokens 0 and 1). min_p 0.2 keeps 0-2, renormalised
    # to 0.53 / 0.32 / 0.16, and top_p 0.83 then stops before token 2 (0.84 of the kept mass comes before it).
    params = [SamplingParams(temperature=1.0, min_p=0.5), SamplingParams(temperature=1.0, min_p=0.2, top_p=0.83)]
    g = [_gen(1), _gen(2)]
    counts = torch.zeros(2, 4)
    for _ in range(2000):
        a, b = sample(logits, params, g).tolist()
        counts[0, a] += 1
        counts[1, b] += 1
    assert counts[:, 2:].sum() == 0 and counts[:, :2].min() > 0
    assert abs(counts[0, 0].item() / 2000 - 0.5 / 0.8) < 0.04  # in proportion among the kept
    assert sample(logits[:1], [SamplingParams(min_p=0.9)], [None]).tolist() == [0]  # greedy rows: the argmax


def test_min_p_of_one_keeps_only_the_most_likely_token():
    """min_p 1 drops every candidate less likely than the most likely one, not that one too (which left no mass at
    all): it is greedy, whatever the seed."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    params = [SamplingParams(temperature=1.0, min_p=1.0)]
    assert [sample(logits, params, [_gen(seed)]).item() for seed in range(20)] == [1] * 20
