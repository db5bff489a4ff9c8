"""Decode attention straight from the paged KV cache, as a Triton kernel (CUDA).

The eager decode path gathers every row's blocks into a contiguous ``[B, L, H, D]`` copy before SDPA: at 32
streams of a 7B model that copy moves about as many bytes as the weights. This kernel reads each row's own blocks in
place, up to its own length, with an online softmax (one program per row and query head), so decode attention costs
one read of the live cache. It is captured in the decode CUDA graphs like any other kernel.

With ``TRITON_INTERPRET=1`` Triton runs it on the CPU (numpy), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr,
    scale,
    stride_qb, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_tb,
    stride_ob, stride_oh,
    GROUPS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUPS
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + row * stride_qb + head * stride_qh + dims, mask=dim_ok, other=0.0).to(tl.float32)
    length = tl.load(lengths_ptr + row)
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, length, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        live = pos < length
        block = tl.load(tables_ptr + row * stride_tb + pos // BLOCK_SIZE, mask=live, other=0)
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        mask2 = live[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + dims[None, :], mask=mask2, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        scores = tl.where(live, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        correction = tl.exp(m - m_new)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + dims[None, :], mask=mask2, other=0.0)
        acc = acc * correction + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        total = total * correction + tl.sum(p, axis=0)
        m = m_new
    out = acc / total
    tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           lengths: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Attention of one new query per row over that row's cached positions.

    Args:
        q: ``[B, H, D]`` queries (rotary applied).
        k_cache: ``[slots, Hkv, D]`` one layer's keys (a view of the engine's cache; the head dim contiguous).
        v_cache: ``[slots, Hkv, D]`` its values.
        block_tables: ``[B, W]`` each row's blocks.
        lengths: ``[B]`` positions each row attends to (the new one included; at least 1).
        block_size: Positions per block.
        scale: Softmax scale.

    Returns:
        ``[B, H, D]`` in the dtype of ``q``.
    """
    batch, heads, head_dim = q.shape
    groups = heads // k_cache.shape[1]
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, heads)](
        q, k_cache, v_cache, block_tables, lengths, out,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUPS=groups, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=64,
    )
    return out
