"""Per-language losses (``loss_<language>`` in the logs) come out the same from logits or from the per-token losses
of Liger's fused head, which returns no logits."""

from __future__ import annotations

import types

import torch

from palo.constants import IGNORE_INDEX
from palo.train.dataset import LANGUAGE_NAMES
from palo.train.trainer import PaloTrainer


def _tracked(outputs: dict, languages: torch.Tensor, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = types.SimpleNamespace(_language_loss=torch.zeros(len(LANGUAGE_NAMES), dtype=torch.float64),
                                  _language_tokens=torch.zeros(len(LANGUAGE_NAMES), dtype=torch.float64))
    PaloTrainer._track_language_loss(state, outputs, languages, samples)
    return state._language_loss, state._language_tokens


def test_token_losses_and_logits_give_the_same_language_sums():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX
    # Row 0 holds one sample (language 2); row 1 two packed samples (languages 7 and 0) from position 3 on.
    samples = torch.tensor([[0] * 7, [1, 1, 1, 2, 2, 2, 2]])
    languages = torch.tensor([2, 7, 0])
    target = labels[:, 1:]
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
    from_logits = _tracked({"logits": logits, "spliced_labels": labels}, languages, samples)
    from_tokens = _tracked({"logits": None, "token_losses": token_losses, "spliced_labels": labels}, languages,
                           samples)
    torch.testing.assert_close(from_tokens, from_logits)
    loss, tokens = from_tokens
    # next-token targets: row 0 positions 3-6 (language 2); row 1 positions 1-2 (language 7) and 3-4 (language 0)
    assert {i: int(n) for i, n in enumerate(tokens) if n} == {2: 4, 7: 2, 0: 2}
    assert torch.isclose(loss.sum(), token_losses[target != IGNORE_INDEX].double().sum())


def test_neither_logits_nor_token_losses_tracks_nothing():
    labels = torch.tensor([[IGNORE_INDEX, 3, 4]])
    loss, tokens = _tracked({"logits": None, "spliced_labels": labels}, torch.tensor([1]), torch.zeros(1, 3).long())
    assert tokens.sum() == 0 and loss.sum() == 0
