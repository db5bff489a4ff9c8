"""Runs the loaded model's own modules over the paged KV cache: chunked prefill and batched decode.

The decoder is the checkpoint's LLaMA (``model.model``): embeddings, the decoder layers' projections, norms and MLPs
and the rotary embedding are called as they are (so LoRA-merged or bitsandbytes-quantised linears work unchanged);
only attention is done here, against K/V kept in one preallocated cache::

    kv[layer, 0 or 1, slot, kv_head, head_dim]      slot = block_table[p // block_size] * block_size + p % block_size

A step takes a *packed* list of positions from several sequences. Everything but attention runs on the packed
``[N, D]`` rows at once; attention reads each sequence's own cached positions only:

* prefill chunks: one SDPA call per chunk over the sequence's cached prefix plus the chunk (causal);
* decode: on CUDA a Triton kernel (:mod:`palo.engine.triton_attention`) reads each row's blocks in place up to its
  own length; elsewhere (or with ``attention="sdpa"``) the rows' blocks are gathered into one padded batch for a
  single SDPA call, masked to each row's length.

On CUDA the decode step can be replayed from CUDA graphs (:mod:`palo.engine.cuda_graphs`); on CPU it runs eagerly.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from palo.constants import IMAGE_TOKEN_INDEX
from palo.engine.config import CacheShape
from palo.engine.sampling import TokenLogprob, token_logprobs
from palo.engine.sequence import Sequence

# Prompt rows whose logits are made at once when a request scores its prompt ([rows, vocab] float32 each time).
PROMPT_SCORE_ROWS = 256


@dataclass
class PrefillChunk:
    """Prompt positions ``[start, end)`` of one sequence, computed in this step."""

    seq: Sequence
    start: int
    end: int

    @property
    def completes_prompt(self) -> bool:
        return self.end == self.seq.prompt_len


def cache_shape(model: torch.nn.Module) -> CacheShape:
    """Per-position KV cost of ``model``'s language model."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return CacheShape(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        dtype=model.get_input_embeddings().weight.dtype,
    )


class ModelRunner:
    """Owns the KV cache and computes logits for prefill chunks and decode batches.

    Args:
        model: A loaded PALO (or plain LLaMA-family) causal LM in eval mode.
        num_blocks: KV blocks to allocate.
        block_size: Positions per block.
        attention: Decode attention: ``"auto"``, ``"sdpa"`` or ``"triton"``.
        max_model_len: Longest sequence (default: the model's ``max_position_embeddings``).
        image_cache_size: Images whose projected features are kept, by content, for later prompts (0: none).
    """

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, attention: str = "auto",
                 max_model_len: int | None = None, image_cache_size: int = 0) -> None:
        self.model = model
        self.decoder = model.model
        self.shape = cache_shape(model)
        self.device = model.get_input_embeddings().weight.device
        self.dtype = self.shape.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        max_model_len = max_model_len or model.config.max_position_embeddings
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self._padding_row = torch.zeros(self.max_blocks_per_seq, dtype=torch.long)
        self.num_heads = model.config.num_attention_heads
        self.kv_groups = self.num_heads // self.shape.num_kv_heads
        self.kv = torch.zeros(
            self.shape.num_layers, 2, num_blocks * block_size, self.shape.num_kv_heads, self.shape.head_dim,
            dtype=self.dtype, device=self.device,
        )
        self.graphs = None  # palo.engine.cuda_graphs.DecodeGraphs when captured
        self.image_cache_size = image_cache_size
        self._image_features: OrderedDict[str, torch.Tensor] = OrderedDict()  # digest -> [n, D], least recent first
        self.images_encoded = 0  # images run through the vision tower, for statistics
        self.paged_attention = self._paged_attention(attention)

    def _paged_attention(self, attention: str):
        """The decode-attention kernel that reads the paged cache in place, or None for gather + SDPA."""
        if attention not in ("auto", "sdpa", "triton"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'triton', not {attention!r}")
        if attention == "sdpa" or (attention == "auto" and self.device.type != "cuda"):
            return None
        try:
            from palo.engine.triton_attention import paged_decode_attention
        except ImportError as exc:
            if attention == "triton":
                raise ValueError(f"attention='triton' needs the triton package: {exc}") from None
            return None
        return paged_decode_attention

    @property
    def cache_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # -- indices --------------------------------------------------------------------------------------------------
    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of positions ``[start, end)`` of ``seq``."""
        size, table = self.block_size, seq.block_table
        return [table[p // size] * size + p % size for p in range(start, end)]

    def live_blocks(self, seq: Sequence) -> int:
        """Blocks holding ``seq``'s positions so far (its table also holds the blocks reserved for its answer)."""
        return -(-seq.num_tokens // self.block_size)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    # -- images ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, seqs: list[Sequence]) -> None:
        """Vision tower and projector for the images of ``seqs`` not in the image cache, in one batch; each
        sequence keeps its features ``[k, n, D]`` until its prompt is computed."""
        missing: dict[str, torch.Tensor] = {}
        for seq in seqs:
            for i, digest in enumerate(seq.image_keys):
                if digest in self._image_features:
                    self._image_features.move_to_end(digest)
                elif digest not in missing:
                    missing[digest] = seq.request.images[i:i + 1]
        found = dict(self._image_features)
        if missing:
            features = self.model.encode_images(torch.cat(list(missing.values())).to(self.device)).to(self.dtype)
            self.images_encoded += len(missing)
            found.update(zip(missing, features))
            if self.image_cache_size:
                for digest, rows in zip(missing, features):
                    # A copy: a view would keep the whole batch's features alive for as long as any one is kept.
                    self._image_features[digest] = rows.clone()
            while len(self._image_features) > self.image_cache_size:
                self._image_features.popitem(last=False)
        for seq in seqs:
            seq.image_features = torch.stack([found[digest] for digest in seq.image_keys])

    def _prompt_embeds(self, chunk: PrefillChunk) -> torch.Tensor:
        """``[n, D]`` input rows of a prefill chunk: token embeddings, with image features on image rows."""
        seq = chunk.seq
        ids = seq.prompt_ids[chunk.start:chunk.end]
        embeds = self.decoder.embed_tokens(self._tensor([max(t, 0) for t in ids]))
        rows = [j for j, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
        if rows:
            if seq.image_features is None:
                raise RuntimeError(f"request {seq.request_id}: image rows to prefill but its images were not encoded")
            sources = [seq.image_rows[chunk.start + j] for j in rows]
            flat = seq.image_features.reshape(-1, seq.image_features.shape[-1])
            embeds[self._tensor(rows)] = flat[self._tensor(sources)]
        return embeds

    # -- forward --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, chunks: list[PrefillChunk]) -> tuple[torch.Tensor, dict[int, dict[int, TokenLogprob]]]:
        """Compute the chunks' K/V into the cache.

        For a sequence that asks for prompt log-probabilities, the hidden row at the end of each of its prompt
        blocks is kept in ``seq.block_end_hidden`` (the prefix cache keeps it with the block's scores, so that a
        later prompt that takes the block from the cache can score the position after it).

        Returns:
            ``[m, V]`` float32 logits at the last position of each chunk that completes its prompt, in order; and for
            each chunk (by index) whose sequence asks for prompt log-probabilities, ``{position: entry}``: the
            log-probability of each prompt text id the chunk's rows predict (the chunk's own positions after its
            first, the one after its end, and its first when the row before it came from the cache).
        """
        embeds = torch.cat([self._prompt_embeds(c) for c in chunks])
        positions = self._tensor([p for c in chunks for p in range(c.start, c.end)])
        slots = self._tensor([s for c in chunks for s in self.slots(c.seq, c.start, c.end)])
        spans = []
        offset = 0
        for c in chunks:
            n = c.end - c.start
            context = self._tensor(self.slots(c.seq, 0, c.end)) if c.start > 0 else None
            spans.append((offset, n, c.start, context))
            offset += n

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            outs = []
            for off, n, start, context in spans:
                qi = q[off:off + n].transpose(0, 1)[None]  # (1, H, n, Dh)
                if context is None:  # the chunk is the sequence's start: plain causal attention over itself
                    ki = k[off:off + n].transpose(0, 1)[None]
                    vi = v[off:off + n].transpose(0, 1)[None]
                    out = self._sdpa(qi, ki, vi, None, scale, causal=n > 1)
                else:  # cached prefix + this chunk, causal with the chunk's offset
                    ki = self.kv[layer, 0][context].transpose(0, 1)[None]  # (1, Hkv, start + n, Dh)
                    vi = self.kv[layer, 1][context].transpose(0, 1)[None]
                    keys = torch.arange(start + n, device=self.device)
                    queries = torch.arange(start, start + n, device=self.device)
                    mask = keys[None, :] <= queries[:, None]  # (n, start + n)
                    out = self._sdpa(qi, ki, vi, mask, scale)
                outs.append(out[0].transpose(0, 1).reshape(n, -1))
            return torch.cat(outs)

        hidden = self._layers(embeds, positions, slots, attend)
        scores = {i: self._score_prompt(c, hidden[off:off + n])
                  for i, ((off, n, _, _), c) in enumerate(zip(spans, chunks))
                  if c.seq.sampling.prompt_logprobs is not None}
        for (off, n, start, _), c in zip(spans, chunks):
            if c.seq.sampling.prompt_logprobs is not None:
                for p in range(start, start + n):
                    if (p + 1) % self.block_size == 0:
                        c.seq.block_end_hidden[p] = hidden[off + p - start].clone()
        last = [off + n - 1 for (off, n, _, _), c in zip(spans, chunks) if c.completes_prompt]
        if not last:
            return hidden.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32), scores
        return self._logits(hidden[self._tensor(last)]), scores

    def _score_prompt(self, chunk: PrefillChunk, hidden: torch.Tensor) -> dict[int, TokenLogprob]:
        """``{position: entry}`` for the prompt text ids the rows of a prefill chunk (``hidden`` ``[n, D]``) predict,
        and for the chunk's first id when the row before it came from the prefix cache (its hidden row was kept
        with the cached block); the ``[rows, V]`` logits are made a slice at a time, never for a whole chunk."""
        seq, k = chunk.seq, chunk.seq.sampling.prompt_logprobs
        before = seq.block_end_hidden.get(chunk.start - 1)
        if chunk.start and seq.position_logprobs[chunk.start] is None and before is not None:
            hidden, first_row = torch.cat([before[None].to(hidden.dtype), hidden]), chunk.start - 1
        else:
            first_row = chunk.start
        rows = [(p + 1, seq.prompt_ids[p + 1]) for p in range(first_row, chunk.end) if p + 1 < seq.prompt_len]
        entries: dict[int, TokenLogprob] = {}
        for first in range(0, len(rows), PROMPT_SCORE_ROWS):
            part = rows[first:first + PROMPT_SCORE_ROWS]
            logits = self._logits(hidden[first:first + len(part)])
            found = token_logprobs(logits, self._tensor([max(t, 0) for _, t in part]),
                                   [k if t >= 0 else None for _, t in part])
            entries.update((p, e) for (p, _), e in zip(part, found) if e is not None)
        return entries

    @torch.no_grad()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new position for each sequence (its last token), attending to all its cached positions.

        Returns:
            ``[B, V]`` float32 logits.
        """
        if self.graphs is not None and self.graphs.can_run(seqs):
            return self.graphs.run(seqs)
        inputs = self.decode_inputs(seqs)
        return self.decode_forward(*inputs)

    def decode_inputs(self, seqs: list[Sequence], batch: int | None = None, width: int | None = None):
        """Host-side index tensors of a decode step, padded to ``batch`` rows and ``width`` blocks per row.

        Returns:
            ``(ids [B], positions [B], slots [B], block_tables [B, W], lengths [B])``; padding rows write to the
            scratch block and read one position of it.
        """
        batch = batch or len(seqs)
        width = width or max(self.live_blocks(s) for s in seqs)
        pad = batch - len(seqs)
        size = self.block_size
        ids, positions, slots, lengths = [], [], [], []
        for s in seqs:
            n = s.num_tokens
            ids.append(s.last_token)
            positions.append(n - 1)
            slots.append(s.block_table[(n - 1) // size] * size + (n - 1) % size)
            lengths.append(n)
        # One host tensor and one copy for the four vectors; block tables from rows kept per sequence (a step has
        # batch x width of them, too many to convert from Python ints every step).
        vectors = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots + [0] * pad, lengths + [1] * pad],
                               dtype=torch.long).to(self.device, non_blocking=True)
        rows = [self._table_row(s) for s in seqs] + [self._padding_row] * pad
        tables = torch.stack(rows)[:, :width].to(self.device, non_blocking=True)
        return vectors[0], vectors[1], vectors[2], tables, vectors[3]

    def _table_row(self, seq: Sequence) -> torch.Tensor:
        """``[max_blocks_per_seq]`` the blocks of ``seq``, padded with the scratch block; built once per block table
        (a sequence's blocks are all reserved on admission). Blocks past its live length are never read."""
        cached = seq.block_table_row
        if cached is None or cached[0] is not seq.block_table or len(cached[0]) != cached[2]:
            row = torch.zeros(self.max_blocks_per_seq, dtype=torch.long)
            row[: len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.long)
            seq.block_table_row = cached = (seq.block_table, row, len(seq.block_table))
        return cached[1]

    def decode_forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       block_tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The decode step on device tensors only (no host reads: the part CUDA graphs capture).

        Args:
            ids: ``[B]`` last token of each row.
            positions: ``[B]`` its position.
            slots: ``[B]`` the cache slot its K/V go to.
            block_tables: ``[B, W]`` each row's blocks (padded with the scratch block).
            lengths: ``[B]`` positions to attend to (the new one included).

        Returns:
            ``[B, V]`` float32 logits.
        """
        batch, width = block_tables.shape
        kernel = self.paged_attention
        if kernel is not None:  # reads each row's blocks in place, up to its length

            def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
                out = kernel(q, self.kv[layer, 0], self.kv[layer, 1], block_tables, lengths, self.block_size, scale)
                return out.reshape(batch, -1)
        else:  # gathers the rows' blocks into one padded batch for SDPA, masked to each row's length
            span = width * self.block_size
            gather = (block_tables[:, :, None] * self.block_size
                      + torch.arange(self.block_size, device=self.device)).reshape(batch, span)  # (B, L)
            mask = (torch.arange(span, device=self.device)[None, :] < lengths[:, None])[:, None, None, :]  # (B,1,1,L)

            def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
                keys = self.kv[layer, 0][gather].transpose(1, 2)  # (B, Hkv, L, Dh)
                values = self.kv[layer, 1][gather].transpose(1, 2)
                out = self._sdpa(q[:, :, None, :], keys, values, mask, scale)  # (B, H, 1, Dh)
                return out.reshape(batch, -1)

        hidden = self._layers(self.decoder.embed_tokens(ids), positions, slots, attend)
        return self._logits(hidden)

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              causal: bool = False) -> torch.Tensor:
        if self.kv_groups > 1:
            k = k.repeat_interleave(self.kv_groups, dim=1)
            v = v.repeat_interleave(self.kv_groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers over packed rows ``hidden`` ``[N, D]``; ``attend`` does each layer's attention."""
        cos, sin = self.decoder.rotary_emb(hidden, positions[None])  # (1, N, Dh)
        cos, sin = cos[0], sin[0]
        heads, kv_heads, head_dim = self.num_heads, self.shape.num_kv_heads, self.shape.head_dim
        n = hidden.shape[0]
        for index, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, heads, head_dim)
            k = attn.k_proj(x).view(n, kv_heads, head_dim)
            v = attn.v_proj(x).view(n, kv_heads, head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            self.kv[index, 0].index_copy_(0, slots, k.to(self.dtype))
            self.kv[index, 1].index_copy_(0, slots, v.to(self.dtype))
            out = attend(index, q, k, v, attn.scaling)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.decoder.norm(hidden)).float()
