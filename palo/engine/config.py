"""The engine's typed settings and how the KV cache is sized from them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger("palo.engine")

GIB = 1 << 30
# On CPU (no memory query that means anything for a shared host) the cache defaults to room for every sequence at
# full length, but never more than this.
CPU_DEFAULT_CACHE_GB = 4.0


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and how much KV cache it holds.

    Attributes:
        max_num_seqs: Most sequences decoded together (also the largest CUDA-graph batch).
        max_model_len: Longest sequence (prompt with image positions, plus answer); None: the model's
            ``max_position_embeddings``.
        block_size: Positions per KV block.
        num_blocks: Blocks in the cache; when None it comes from ``kv_cache_gb``, else from
            ``gpu_memory_utilization`` on CUDA, else room for ``max_num_seqs`` full-length sequences (CPU).
        kv_cache_gb: Cache size in GiB.
        gpu_memory_utilization: On CUDA, the fraction of the device's total memory the process may use (weights,
            cache and activations together); the cache gets what the weights and a prefill's activations leave.
        max_prefill_tokens: Most prompt positions prefilled in one step; longer prompts are prefilled in chunks, so
            running streams get a token between chunks.
        enable_prefix_cache: Reuse the KV of prompt blocks (image and text) seen before, and the projected features
            of the last ``image_cache_size`` images.
        image_cache_size: Images whose projected features are kept for reuse (a prompt whose image rows end inside
            a block it cannot share still needs them); 0 keeps none. On CUDA their memory is set aside before the
            KV cache is sized.
        cuda_graphs: Capture the decode step as CUDA graphs at start-up (CUDA only; CPU always runs eagerly).
        max_waiting: Requests that may wait for a place; beyond it :class:`~palo.engine.errors.QueueFull`.
        attention: Decode attention: ``triton`` (paged kernel reading the cache in place), ``sdpa`` (gather, then
            PyTorch SDPA) or ``auto`` (Triton on CUDA when installed, else SDPA).
    """

    max_num_seqs: int = 32
    max_model_len: int | None = None
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_prefill_tokens: int = 2048
    enable_prefix_cache: bool = True
    image_cache_size: int = 32
    cuda_graphs: bool = True
    max_waiting: int = 1024
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "block_size", "max_prefill_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (one is the engine's scratch block), "
                             f"got {self.num_blocks}")
        if self.image_cache_size < 0:
            raise ValueError(f"image_cache_size must be >= 0, got {self.image_cache_size}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        if self.attention not in ("auto", "sdpa", "triton"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'triton', not {self.attention!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class CacheShape:
    """What one cached position costs: ``layers x 2 (K, V) x kv_heads x head_dim`` values of ``dtype``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_value(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_position(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.bytes_per_value


def plan_num_blocks(config: EngineConfig, shape: CacheShape, max_model_len: int, device: torch.device,
                    activation_bytes: int = 0) -> int:
    """Number of KV blocks to allocate (block 0 included: the engine keeps it as scratch).

    Args:
        config: The engine settings.
        shape: Per-position cost.
        max_model_len: Longest sequence.
        device: Where the cache goes.
        activation_bytes: Headroom kept free on CUDA for one prefill's activations.

    Returns:
        The block count.

    Raises:
        ValueError: When no memory is left for a cache at all.
    """
    block_bytes = shape.bytes_per_position * config.block_size
    blocks_per_seq = math.ceil(max_model_len / config.block_size)
    if config.num_blocks is not None:
        blocks = config.num_blocks
    elif config.kv_cache_gb is not None:
        blocks = int(config.kv_cache_gb * GIB // block_bytes)
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = total * config.gpu_memory_utilization - used - activation_bytes
        blocks = int(max(0, budget) // block_bytes)
    else:
        wanted = config.max_num_seqs * blocks_per_seq + 1
        blocks = min(wanted, int(CPU_DEFAULT_CACHE_GB * GIB // block_bytes))
    if blocks < 2:
        raise ValueError(
            f"no room for a KV cache ({blocks * block_bytes / GIB:.2f} GiB): raise --kv-cache-gb / "
            "--gpu-memory-utilization or free device memory"
        )
    if blocks < blocks_per_seq + 1:
        logger.warning(
            "a KV cache of %d blocks cannot hold one sequence of %d positions; longer requests will be refused",
            blocks - 1, max_model_len,
        )
    return blocks
