"""The worker's engine flags reach the engine's settings."""

from __future__ import annotations

import pytest

from palo.serve.model_worker import build_parser, engine_config


def test_engine_flags_reach_the_engine_config():
    args = build_parser().parse_args([
        "--model-path", "ckpt", "--image-cache-size", "0", "--no-prefix-cache", "--block-size", "8",
        "--max-num-seqs", "4", "--limit-model-concurrency", "2", "--kv-cache-gb", "1.5", "--attention", "sdpa",
        "--max-prefill-tokens", "512", "--no-cuda-graphs",
    ])
    config = engine_config(args)
    assert (config.image_cache_size, config.enable_prefix_cache, config.block_size, config.max_num_seqs,
            config.max_waiting, config.kv_cache_gb, config.attention, config.max_prefill_tokens,
            config.cuda_graphs) == (0, False, 8, 2, 2, 1.5, "sdpa", 512, False)
    default = engine_config(build_parser().parse_args(["--model-path", "ckpt"]))
    assert default.image_cache_size == 32 and default.enable_prefix_cache and default.max_num_seqs == 32


def test_a_negative_image_cache_size_is_refused():
    with pytest.raises(ValueError, match="image_cache_size must be >= 0"):
        engine_config(build_parser().parse_args(["--model-path", "ckpt", "--image-cache-size", "-1"]))


def test_the_worker_refuses_bad_settings_before_loading_and_a_missing_checkpoint_in_one_line(tmp_path, monkeypatch,
                                                                                            capsys):
    from palo.model import builder
    from palo.serve import model_worker

    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    loads = []
    real = builder.load_pretrained_model
    monkeypatch.setattr(builder, "load_pretrained_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    for flag, value, message in (("--max-num-seqs", "0", "max_num_seqs must be at least 1, got 0"),
                                 ("--kv-cache-gb", "-1", "kv_cache_gb must be positive, got -1.0")):
        with pytest.raises(SystemExit) as info:
            model_worker.main(["--model-path", "ckpt", flag, value, "--no-register"])
        assert info.value.code == 2 and f"error: {message}\n" in capsys.readouterr().err
    assert loads == []
    (tmp_path / "ckpt.json").write_text("{}")
    assert model_worker.main(["--model-path", str(tmp_path / "ckpt.json"), "--no-register", "--device", "cpu"]) == 2
    assert f"palo-worker: error: '{tmp_path / 'ckpt.json'}' is a file" in capsys.readouterr().err
    # A config value the model cannot take (the loader's ValueError) is said in one line too, not a traceback.
    bad = "mm_vision_select_layer=40 is outside the hidden states of the vision tower"

    def refuses(*args, **kwargs):
        raise ValueError(bad)

    monkeypatch.setattr(builder, "load_pretrained_model", refuses)
    assert model_worker.main(["--model-path", str(tmp_path), "--no-register", "--device", "cpu"]) == 2
    assert f"palo-worker: error: {bad}" in capsys.readouterr().err
