"""CUDA graphs of the decode step, captured at start-up for a ladder of batch sizes and context widths.

At batch 1 a 7B decode step is hundreds of small kernels, and launching them from Python costs more than the GPU
needs to run them. A graph replays the whole step with one launch. Graphs need fixed shapes, so each is captured
for a batch size (padded rows write to the scratch block) and a width in KV blocks (each row reads that many blocks,
masked to its own length); a step uses the smallest captured pair that holds it, and runs eagerly otherwise.
"""

from __future__ import annotations

import logging
import math
import time
import weakref

import torch

from palo.engine.sequence import Sequence

logger = logging.getLogger("palo.engine")


def batch_ladder(max_num_seqs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 up to ``max_num_seqs``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


def width_ladder(max_blocks: int, smallest: int = 8) -> list[int]:
    """Captured widths in blocks: ``smallest``, then steps of about 1.5x up to ``max_blocks`` (included), so a
    step reads at most half again the blocks its longest row needs."""
    widths = []
    width = min(smallest, max_blocks)
    while width < max_blocks:
        widths.append(width)
        width = max(width + 1, width * 3 // 2)
    return widths + [max_blocks]


class DecodeGraphs:
    """Captured decode steps of one :class:`~palo.engine.model_runner.ModelRunner`.

    Use :meth:`capture`; then :meth:`can_run` / :meth:`run` replace the eager decode.
    """

    def __init__(self, runner, batches: list[int], widths: list[int]) -> None:
        # Weak: the runner holds its graphs, and a cycle would keep the whole KV cache (most of a GPU's memory) alive
        # after the engine is dropped, until the garbage collector happens to run.
        self.runner = weakref.proxy(runner)
        self.batches = batches
        self.widths = widths
        # (batch, width) -> (graph, its static inputs, its output buffer)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self.logits: torch.Tensor | None = None  # [max batch, V] float32: every graph's output rows
        self.pool = None
        self._stream = None

    @classmethod
    def capture(cls, runner, max_num_seqs: int, max_model_len: int) -> DecodeGraphs | None:
        """Capture every (batch, width) pair; returns None (eager decoding) if capturing fails."""
        max_blocks = math.ceil(max_model_len / runner.block_size)
        graphs = cls(runner, batch_ladder(max_num_seqs), width_ladder(max_blocks))
        start = time.perf_counter()
        try:
            # Largest first, so the shared memory pool is sized once by the biggest graph.
            for batch in reversed(graphs.batches):
                for width in reversed(graphs.widths):
                    inputs = graphs._static_inputs(batch, width)
                    graph, output = graphs._record(inputs)
                    graphs.graphs[(batch, width)] = (graph, inputs, output)
            graphs._synchronize()
        except Exception as exc:  # noqa: BLE001 - a model whose step cannot be captured still runs eagerly
            logger.warning("CUDA graph capture failed (%s: %s); decoding runs eagerly", type(exc).__name__, exc)
            graphs._synchronize()
            return None
        logger.info("captured %d decode CUDA graphs (batches %s, widths %s blocks) in %.1f s", len(graphs.graphs),
                    graphs.batches, graphs.widths, time.perf_counter() - start)
        return graphs

    def _static_inputs(self, batch: int, width: int) -> tuple[torch.Tensor, ...]:
        """The buffers a graph reads its step from, as :meth:`ModelRunner.decode_inputs` lays them out; until the
        first replay every row is padding (the scratch block, one position)."""
        device = self.runner.device
        return (
            torch.zeros(batch, dtype=torch.long, device=device),  # ids
            torch.zeros(batch, dtype=torch.long, device=device),  # positions
            torch.zeros(batch, dtype=torch.long, device=device),  # slots: the scratch block
            torch.zeros(batch, width, dtype=torch.long, device=device),  # block tables
            torch.ones(batch, dtype=torch.long, device=device),  # lengths
        )

    def _record(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture one decode step over the static ``inputs``: ``(graph, its logits)``.

        Every graph writes its logits into the first rows of one buffer: the engine reads a replay's logits before
        the next replay, and outputs kept per graph would hold ``batch x vocabulary`` floats for every captured
        (batch, width) pair (about 5 GiB for 256 sequences at a 4,096-position context and 32,000 words).
        """
        runner = self.runner
        if self.logits is None:
            vocab = runner.model.lm_head.weight.shape[0]
            self.logits = torch.empty(max(self.batches), vocab, dtype=torch.float32, device=runner.device)
        output = self.logits[: inputs[0].shape[0]]

        def step() -> None:
            output.copy_(runner.decode_forward(*inputs))

        return self._capture(step), output

    def _capture(self, step) -> torch.cuda.CUDAGraph:
        """Run ``step`` once eagerly on a side stream (lazy inits, autotuning), then capture it in the shared pool."""
        device = self.runner.device
        if self._stream is None:  # one side stream for every capture
            self._stream = torch.cuda.Stream(device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            step()
        if self.pool is None:
            self.pool = graph.pool()
        return graph

    def _synchronize(self) -> None:
        torch.cuda.synchronize(self.runner.device)

    def _pick(self, seqs: list[Sequence]) -> tuple[int, int] | None:
        batch = next((b for b in self.batches if b >= len(seqs)), None)
        need = max(self.runner.live_blocks(s) for s in seqs)
        width = next((w for w in self.widths if w >= need), None)
        return None if batch is None or width is None else (batch, width)

    def can_run(self, seqs: list[Sequence]) -> bool:
        return self._pick(seqs) is not None

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Replay the graph for ``seqs``; returns ``[len(seqs), V]`` logits (valid until the next replay)."""
        batch, width = self._pick(seqs)
        graph, inputs, output = self.graphs[(batch, width)]
        for static, value in zip(inputs, self.runner.decode_inputs(seqs, batch, width)):
            static.copy_(value, non_blocking=True)
        graph.replay()
        return output[: len(seqs)]
