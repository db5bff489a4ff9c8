"""Shared fixtures: one tiny PALO world (tokenizer, CLIP, base LLM, checkpoints in every original format).

Everything is built locally from random weights and a SentencePiece model trained on text in the 10 languages, in
folders whose names contain neither "palo" nor "lora": how a checkpoint loads must not depend on its name.
"""

from __future__ import annotations

import os

# Nothing is downloaded in tests: hub ids resolve through local caches the tests build, and a miss fails at once
# instead of waiting on network time-outs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from dataclasses import dataclass

import pytest
import torch

from palo.testing import tiny


@dataclass
class TinyWorld:
    root: str
    tokenizer_dir: str
    clip_dir: str
    base_dir: str
    config: dict
    model: object  # the reference PaloForCausalLM (mlp2x_gelu) whose weights the checkpoints hold
    full_dir: str
    full_bin_dir: str
    ldp_config: dict
    ldp_model: object
    ldp_dir: str
    projector_dir: str
    lora_dir: str
    lora_adapter: dict


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    root = str(tmp_path_factory.mktemp("world"))
    p = lambda name: os.path.join(root, name)  # noqa: E731
    tokenizer = tiny.train_sentencepiece(p("tok"))
    tiny.save_tiny_clip(p("clip"))
    tiny.save_tiny_llama(p("base"), p("tok"))
    llama_config = tiny.tiny_llama_config(len(tokenizer))

    config = tiny.palo_config_dict(llama_config, p("clip"))
    # The stage-1 / LoRA runs start from the base LLM, so their LLM weights are the base's.
    model = tiny.build_palo_model(config, p("clip"), seed=1)
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(p("base"), dtype=torch.float32)
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    del base

    tiny.write_full_checkpoint(p("ckpt_a"), model, config, p("tok"), fmt="safetensors")
    tiny.write_full_checkpoint(p("ckpt_b"), model, config, p("tok"), fmt="bin", shards=2)
    tiny.write_projector_checkpoint(p("stage1_out"), model, config)
    lora_dir, adapter = tiny.write_lora_checkpoint(p("finetune_out"), model, config, p("base"))

    ldp_config = tiny.palo_config_dict(llama_config, p("clip"), projector_type="ldpnet")
    ldp_model = tiny.build_palo_model(ldp_config, p("clip"), seed=2)
    tiny.write_full_checkpoint(p("ckpt_c"), ldp_model, ldp_config, p("tok"))

    return TinyWorld(
        root=root,
        tokenizer_dir=p("tok"),
        clip_dir=p("clip"),
        base_dir=p("base"),
        config=config,
        model=model,
        full_dir=p("ckpt_a"),
        full_bin_dir=p("ckpt_b"),
        ldp_config=ldp_config,
        ldp_model=ldp_model,
        ldp_dir=p("ckpt_c"),
        projector_dir=p("stage1_out"),
        lora_dir=lora_dir,
        lora_adapter=adapter,
    )


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where CUDA is present; elsewhere they are reported as skipped, never as passed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
