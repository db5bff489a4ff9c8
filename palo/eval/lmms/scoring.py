"""The log-likelihood of a continuation after a prompt, for lmms-eval's ``loglikelihood`` requests.

Multiple-choice and perplexity tasks (``output_type: multiple_choice`` / ``loglikelihood``) ask, for each option,
how likely the model finds ``continuation`` right after ``context``, and whether greedy decoding would have produced
it. The context is rendered in the checkpoint's conversation template with an open assistant turn, exactly as for
generation; the continuation is what the assistant would say next (lmms-eval prepends its ``target_delimiter``,
a space by default, which is also what separates ``ASSISTANT:`` from the answer in the Vicuna template).

The continuation's tokens are those of ``context + continuation`` tokenised together, after the longest prefix it
shares with the context alone: SentencePiece may tokenise the boundary differently than the two parts apart, and
the joint tokenisation is the one the model would have generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from palo.constants import IMAGE_TOKEN_INDEX


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of a continuation.

    Attributes:
        logprob: Sum of the continuation tokens' log-probabilities (natural log).
        is_greedy: Whether each continuation token is the argmax at its position.
        num_tokens: How many tokens the continuation has.
    """

    logprob: float
    is_greedy: bool
    num_tokens: int

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per continuation token: the causal-LM loss over the continuation."""
        return -self.logprob / self.num_tokens


def continuation_start(context_ids: list[int], full_ids: list[int]) -> int:
    """Where the continuation begins in ``full_ids``: after the longest prefix shared with ``context_ids``.

    Raises:
        ValueError: If the continuation is empty (``full_ids`` adds nothing to the context) or contains an image
            placeholder (the image belongs to the context).
    """
    start = 0
    for a, b in zip(context_ids, full_ids):
        if a != b:
            break
        start += 1
    if start >= len(full_ids):
        raise ValueError("the continuation is empty: it adds no token to the context")
    if IMAGE_TOKEN_INDEX in full_ids[start:]:
        raise ValueError("the continuation contains an <image> placeholder; images belong to the context")
    return start


@torch.inference_mode()
def score_continuation(model: torch.nn.Module, context_ids: list[int], full_ids: list[int],
                       images: torch.Tensor | None = None) -> ContinuationScore:
    """Score the tokens of ``full_ids`` that follow the context, in one forward pass.

    Args:
        model: A PALO model (``forward(input_ids, images=...)`` returning spliced-sequence logits).
        context_ids: The tokenised prompt (with ``IMAGE_TOKEN_INDEX`` placeholders).
        full_ids: The tokenised prompt + continuation.
        images: Pixel values ``[N, 3, H, W]`` for the N placeholders, or None.

    Returns:
        The continuation's summed log-probability and whether greedy decoding produces it.

    Raises:
        ValueError: As :func:`continuation_start`.
    """
    start = continuation_start(context_ids, full_ids)
    target = torch.tensor(full_ids[start:], device=model.device)
    n = target.numel()
    input_ids = torch.tensor([full_ids], device=model.device)
    if images is None:
        logits = model(input_ids=input_ids).logits[0]
    else:
        # Spliced here without the training cut at tokenizer_model_max_length, as the engine's path: the forward's
        # cut dropped the continuation's end, and the rows read below were the prompt's.
        spliced = model.prepare_multimodal_inputs(input_ids, images.to(model.device, dtype=model.dtype),
                                                  truncate=False)
        logits = model(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                       position_ids=spliced.position_ids).logits[0]  # [L', V], L' = length after the image splice
    # The continuation is the end of the sequence, after any image rows: position t predicts token t + 1.
    logprobs = torch.log_softmax(logits[-n - 1:-1].float(), dim=-1)  # [n, V]
    picked = logprobs.gather(1, target[:, None])[:, 0]
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return ContinuationScore(float(picked.sum()), greedy, n)
