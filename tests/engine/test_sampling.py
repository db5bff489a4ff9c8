"""The per-row sampler: each row's own settings, its own random stream, greedy rows exact."""

from __future__ import annotations

import pytest
import torch

from palo.engine.sampling import SamplingParams, sample


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


def test_a_row_draws_the_same_tokens_whatever_it_is_batched_with():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    params = [SamplingParams(temperature=0.8, seed=s) for s in range(5)]
    alone = [sample(logits[i:i + 1], [params[i]], [_gen(i)]).item() for i in range(5)]
    together = sample(logits, params, [_gen(i) for i in range(5)]).tolist()
    assert together == alone


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_tokens=0), dict(temperature=float("nan"))])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
