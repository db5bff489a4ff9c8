"""The CUDA-graph ladders, and the graphs' bookkeeping on CPU: static buffers padded to a captured (batch, width),
filled before each replay, sliced after it. The capture itself needs a GPU (tests/engine/test_cuda_engine.py); here
each "graph" replays by running the same step eagerly on the same static buffers, which is what a captured graph
computes."""

from __future__ import annotations

from engine_helpers import QUESTIONS, pixels, prompt_ids

from palo.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams
from palo.engine.cuda_graphs import DecodeGraphs, batch_ladder, width_ladder


def test_every_batch_size_and_width_has_a_captured_shape_not_far_above_it():
    for max_seqs in (1, 5, 32, 64):
        ladder = batch_ladder(max_seqs)
        assert ladder[0] == 1 and ladder[-1] == max_seqs and ladder == sorted(set(ladder))
        assert all(min(b for b in ladder if b >= n) <= max(2 * n, n + 8) for n in range(1, max_seqs + 1))
    for max_blocks in (3, 8, 256):
        widths = width_ladder(max_blocks)
        assert widths[-1] == max_blocks and widths == sorted(set(widths))
        assert all(min(w for w in widths if w >= n) <= max(8, 1.5 * n) for n in range(1, max_blocks + 1))


class _EagerReplay:
    """Stands in for a captured graph: a replay runs the captured step eagerly (on the static inputs, into the
    static output)."""

    def __init__(self, step) -> None:
        self.step = step
        self.replays = 0

    def replay(self) -> None:
        self.step()
        self.replays += 1


class EagerGraphs(DecodeGraphs):
    """:class:`DecodeGraphs` with its CUDA capture replaced by :class:`_EagerReplay`; records each step's fit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.picks: list[tuple[int, int, int, int]] = []  # (rows, blocks needed, captured batch, captured width)
        self.diffs: list[float] = []  # largest logit difference of each replay from the unpadded eager step

    def _capture(self, step):
        step()  # the warm-up a capture runs
        return _EagerReplay(step)

    def _synchronize(self) -> None:
        pass

    def run(self, seqs):
        need = max(self.runner.live_blocks(s) for s in seqs)
        self.picks.append((len(seqs), need, *self._pick(seqs)))
        # The unpadded eager step on the same state (it writes the same K/V the replay writes).
        expected = self.runner.decode_forward(*self.runner.decode_inputs(seqs))
        logits = super().run(seqs)
        self.diffs.append(float((logits - expected).abs().max()))
        return logits


def test_replays_on_padded_static_buffers_give_the_eager_tokens(loaded):
    """Requests that finish at different times leave odd batch sizes (padded up the ladder) and rows shorter than
    the captured width (masked): every step's logits equal the unpadded eager step's, every token the eager
    engine's, and every decode step was a replay."""
    tokenizer, model, processor = loaded
    config = EngineConfig(max_num_seqs=6, block_size=8, max_prefill_tokens=64)
    requests = [(prompt_ids(tokenizer, QUESTIONS[i], i % 2), pixels(processor, model, ["red", "blue"][:i % 2]),
                 [5, 23, 9, 31, 14, 40, 3][i]) for i in range(7)]

    def run(graphs: bool):
        engine = LLMEngine(model, tokenizer, config)
        if graphs:
            engine.runner.graphs = EagerGraphs.capture(engine.runner, config.max_num_seqs, engine.max_model_len)
            assert engine.runner.graphs is not None
        finals = {}
        for i, (ids, images, n) in enumerate(requests):
            engine.add_request(EngineRequest(ids, images, SamplingParams(max_tokens=n, ignore_eos=True),
                                             lambda out, i=i: finals.__setitem__(i, out) if out.finished else None))
        engine.run_until_done()
        return engine, [finals[i].token_ids for i in range(len(requests))]

    _, eager = run(graphs=False)
    engine, replayed = run(graphs=True)
    assert replayed == eager and [len(t) for t in eager] == [n for _, _, n in requests]
    graphs = engine.runner.graphs
    assert max(graphs.diffs) < 1e-5
    assert sum(g.replays for g, _, _ in graphs.graphs.values()) == len(engine.batch_sizes) == len(graphs.picks)
    assert any(batch > rows for rows, _, batch, _ in graphs.picks)  # padding rows (the scratch block)
    assert any(width > need for _, need, _, width in graphs.picks)  # blocks past a row's length, masked
    # Every graph's logits are rows of one buffer, not a batch x vocabulary block per captured pair.
    assert {output.data_ptr() for _, _, output in graphs.graphs.values()} == {graphs.logits.data_ptr()}
    assert graphs.logits.shape == (config.max_num_seqs, model.lm_head.weight.shape[0])


def test_dropping_an_engine_with_graphs_frees_its_cache_at_once(loaded):
    """The runner holds its graphs; were the graphs to hold the runner, the KV cache (most of a GPU) would outlive
    the engine until the garbage collector ran."""
    import gc
    import weakref

    tokenizer, model, _ = loaded
    config = EngineConfig(max_num_seqs=2, block_size=8, max_prefill_tokens=64)
    engine = LLMEngine(model, tokenizer, config)
    engine.runner.graphs = EagerGraphs.capture(engine.runner, config.max_num_seqs, engine.max_model_len)
    cache = weakref.ref(engine.runner.kv)
    gc.disable()
    try:
        del engine
        assert cache() is None
    finally:
        gc.enable()
