"""The fused-head check shared by the interpreted CPU test and the CUDA test (tests/model/test_liger_kernels.py).

Run in a subprocess (Liger patches transformers' LLaMA process-wide): a tiny PALO model trains one padded image
batch (with ``num_items_in_batch``, as under gradient accumulation) and one packed batch with PyTorch's kernels,
then again after :func:`palo.model.kernels.apply_liger_kernels`; the losses, per-token losses and gradients must
agree. Prints one ``equal`` line per batch.
"""

from __future__ import annotations

import sys

import torch
from transformers.models.llama import modeling_llama

from palo.constants import IGNORE_INDEX
from palo.model.kernels import apply_liger_kernels
from palo.testing import tiny


def main(device: str, rtol: float, atol: float) -> None:
    """Compare on ``device`` in float32; ``rtol``/``atol`` for the losses (gradients get 10x of each)."""
    config = tiny.palo_config_dict(tiny.tiny_llama_config(300), tiny.save_tiny_clip("clip"))
    model = tiny.build_palo_model(config, "clip", seed=1).to(device).train()
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 56, 56)
    ids = torch.tensor([[1, 5, -200, 9, 30, 44, 12, 7], [1, 8, 9, 10, 11, 12, 13, 0]])
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    padded = dict(input_ids=ids, labels=labels, attention_mask=(labels != IGNORE_INDEX) | (ids != 0),
                  images=pixels, num_items_in_batch=torch.tensor(16))  # 9 targets here: as in accumulation
    packed_ids = torch.tensor([[1, 5, -200, 9, 30, 44, 12, 7, 1, 8, 9, 10, 11, 12, 13]])
    packed_labels = packed_ids.clone()
    packed_labels[0, :3] = IGNORE_INDEX
    packed_labels[0, 8:11] = IGNORE_INDEX
    packed = dict(input_ids=packed_ids, labels=packed_labels, images=pixels, packed=True,
                  attention_mask=torch.ones_like(packed_ids),
                  position_ids=torch.tensor([list(range(8)) + list(range(7))]))

    def run(batch):
        model.zero_grad()
        out = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if out.logits is None:  # the fused head never built the [tokens x vocabulary] logits
            return out.loss.detach(), grads, out.token_losses.detach()
        target = out.spliced_labels[:, 1:]
        per_token = torch.nn.functional.cross_entropy(out.logits[:, :-1].detach().transpose(1, 2), target,
                                                      reduction="none")
        return out.loss.detach(), grads, per_token

    reference = [run(padded), run(packed)]
    rope = modeling_llama.apply_rotary_pos_emb
    apply_liger_kernels(model)
    assert modeling_llama.apply_rotary_pos_emb is not rope  # Liger's RoPE kernel is the one running now
    for batch, (loss, grads, per_token) in zip((padded, packed), reference):
        fused_loss, fused_grads, token_losses = run(batch)
        torch.testing.assert_close(fused_loss, loss, rtol=rtol, atol=atol)
        torch.testing.assert_close(token_losses, per_token, rtol=rtol, atol=atol)  # for loss_<language>
        assert fused_grads.keys() == grads.keys() and len(grads) > 20
        for name in grads:
            torch.testing.assert_close(fused_grads[name], grads[name], rtol=10 * rtol, atol=atol)
        print("equal", float(loss), float(fused_loss))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
