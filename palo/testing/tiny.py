"""Tiny models, tokenizers and checkpoints in the original on-disk formats, built locally.

Nothing here downloads anything: the tokenizer is a SentencePiece model trained on :mod:`palo.testing.corpus`,
the CLIP tower and LLaMA have random weights. The checkpoint writers produce the exact file layouts the original
PALO training code writes (see the module docs of :mod:`palo.model.builder`). Full checkpoints and adapters are
written directly; ``mm_projector.bin`` and ``non_lora_trainables.bin`` go through
:mod:`palo.model.checkpoint_files`, the one place that knows their layout, whose tests pin those layouts to the
original key names.
Used by the test suite, the benchmarks and the built-in demo.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from palo.model import checkpoint_files
from palo.model.config import PaloConfig
from palo.model.palo_llama import PaloForCausalLM
from palo.model.tokenizer import PaloLlamaTokenizer
from palo.model.vision_tower import build_clip_image_processor
from palo.testing.corpus import all_text


@dataclass(frozen=True)
class TinyShapes:
    """Sizes of the tiny models (hidden 64, 2 layers: the smallest that still exercises everything)."""

    vocab_size: int = 1000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 512
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = 56
    patch_size: int = 14  # 4 x 4 = 16 patches, a square grid as LDP needs


def train_sentencepiece(out_dir: str, vocab_size: int = 1000,
                        extra_text: list[str] | None = None) -> PaloLlamaTokenizer:
    """Train a LLaMA-style multilingual SentencePiece BPE model and save it as a tokenizer folder.

    LLaMA conventions: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, dummy prefix, byte fallback (any character round-trips),
    no normalisation, digits split.
    """
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    buffer = io.BytesIO()
    text = all_text() + list(extra_text or [])
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 4),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    model_file = os.path.join(out_dir, "tokenizer.model")
    with open(model_file, "wb") as f:
        f.write(buffer.getvalue())
    tokenizer = PaloLlamaTokenizer(vocab_file=model_file, model_max_length=2048)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def tiny_clip_config(shapes: TinyShapes = TinyShapes()) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=shapes.vision_hidden,
        intermediate_size=shapes.vision_hidden * 2,
        num_hidden_layers=shapes.vision_layers,
        num_attention_heads=shapes.vision_heads,
        image_size=shapes.image_size,
        patch_size=shapes.patch_size,
        projection_dim=shapes.vision_hidden,
        hidden_act="quick_gelu",
    )


def save_tiny_clip(out_dir: str, shapes: TinyShapes = TinyShapes(), seed: int = 0) -> str:
    """A random tiny CLIP vision model with its preprocessor config, as a hub-style folder."""
    torch.manual_seed(seed)
    model = CLIPVisionModel(tiny_clip_config(shapes))
    model.save_pretrained(out_dir)
    build_clip_image_processor(shapes.image_size).save_pretrained(out_dir)
    return out_dir


def tiny_llama_config(vocab_size: int, shapes: TinyShapes = TinyShapes()) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shapes.hidden_size,
        intermediate_size=shapes.intermediate_size,
        num_hidden_layers=shapes.num_layers,
        num_attention_heads=shapes.num_heads,
        max_position_embeddings=shapes.max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def save_tiny_llama(out_dir: str, tokenizer_dir: str, shapes: TinyShapes = TinyShapes(), seed: int = 0) -> str:
    """A random tiny LLaMA base LLM (``model_type`` llama) with the tokenizer, like ``lmsys/vicuna-7b-v1.5``."""
    tokenizer = PaloLlamaTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), shapes))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def palo_config_dict(
    llama_config: LlamaConfig,
    vision_tower: str,
    projector_type: str = "mlp2x_gelu",
    mm_hidden_size: int = 32,
    **overrides: object,
) -> dict:
    """The config.json a PALO fine-tune writes: the LLaMA keys plus the mm_* keys of the PALO scripts."""
    config = llama_config.to_dict()
    config.update(
        model_type="palo",
        architectures=["PaloForCausalLM"],
        mm_vision_tower=vision_tower,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_hidden_size=mm_hidden_size,
        mm_projector_type=projector_type,
        use_mm_proj=True,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        tokenizer_model_max_length=2048,
        tokenizer_padding_side="right",
        tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
        mm_projector_lr=None,
        use_cache=True,
    )
    config.update(overrides)
    return config


def build_palo_model(config_dict: dict, clip_dir: str, seed: int = 0) -> PaloForCausalLM:
    """A random PALO model for ``config_dict`` whose tower weights are those of the CLIP folder."""
    values = {k: v for k, v in config_dict.items() if k != "model_type"}
    config = PaloConfig(**values)
    torch.manual_seed(seed)
    model = PaloForCausalLM(config)
    model.get_vision_tower().load_weights_from(clip_dir)
    return model.eval()


def _write_config(out_dir: str, config_dict: dict) -> None:
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_dict, f, indent=2)


def write_full_checkpoint(
    out_dir: str,
    model: PaloForCausalLM,
    config_dict: dict,
    tokenizer_dir: str,
    fmt: str = "safetensors",
    shards: int = 1,
    legacy_buffers: bool = True,
) -> str:
    """A full fine-tune / merged checkpoint: config, weights (vision tower included), tokenizer.

    Args:
        fmt: ``safetensors`` or ``bin`` (torch pickles, as transformers 4.31 + DeepSpeed wrote).
        shards: Split the weights into this many files with an index, as the 7B/13B releases are.
        legacy_buffers: Also write buffers old transformers saved (CLIP ``position_ids``), which must be ignored.
    """
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if legacy_buffers:
        num_pos = model.get_vision_tower().config.image_size // model.get_vision_tower().config.patch_size
        state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(
            num_pos * num_pos + 1
        ).unsqueeze(0)
    stem, ext = ("model", ".safetensors") if fmt == "safetensors" else ("pytorch_model", ".bin")
    keys = sorted(state)
    if shards == 1:
        _save_tensors(state, os.path.join(out_dir, stem + ext), fmt)
    else:
        weight_map = {}
        per = -(-len(keys) // shards)
        for i in range(shards):
            name = f"{stem}-{i + 1:05d}-of-{shards:05d}{ext}"
            part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
            _save_tensors(part, os.path.join(out_dir, name), fmt)
            weight_map.update({k: name for k in part})
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(out_dir, f"{stem}{ext}.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    _write_config(out_dir, config_dict)
    _copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


def _save_tensors(state: dict[str, torch.Tensor], path: str, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)


def _copy_tokenizer(src: str, dst: str) -> None:
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens_map", "added_tokens")):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def write_projector_checkpoint(out_dir: str, model: PaloForCausalLM, config_dict: dict) -> str:
    """A stage-1 output: config.json + ``mm_projector.bin`` with full-model key names."""
    checkpoint_files.save_projector(out_dir, model.state_dict())
    _write_config(out_dir, dict(config_dict, tune_mm_mlp_adapter=True))
    return out_dir


def write_lora_checkpoint(
    out_dir: str,
    model: PaloForCausalLM,
    config_dict: dict,
    base_dir: str,
    r: int = 8,
    alpha: int = 16,
    seed: int = 0,
    adapter_format: str = "bin",
) -> tuple[str, dict[str, torch.Tensor]]:
    """A LoRA fine-tune output as PALO's trainer writes it (PEFT 0.4 layout, ``non_lora_trainables.bin``).

    The adapter's B matrices are random (not PEFT's zero init) so that merging visibly changes the logits.

    Args:
        adapter_format: ``bin`` (``adapter_model.bin``, what PEFT 0.4 wrote) or ``safetensors``
            (``adapter_model.safetensors``, what newer PEFT writes); the same tensors and key names either way.

    Returns:
        The folder and the adapter state dict written (keys without the adapter name).
    """
    from peft import LoraConfig, get_peft_model

    os.makedirs(out_dir, exist_ok=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    llm = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        llm, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                        target_modules=targets)
    )
    generator = torch.Generator().manual_seed(seed)
    adapter: dict[str, torch.Tensor] = {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            adapter[name.replace(".default", "")] = param.detach().clone()
    if adapter_format not in ("bin", "safetensors"):
        raise ValueError(f"adapter_format must be 'bin' or 'safetensors', got {adapter_format!r}")
    adapter_file = "adapter_model.bin" if adapter_format == "bin" else "adapter_model.safetensors"
    _save_tensors({k: v.contiguous() for k, v in adapter.items()}, os.path.join(out_dir, adapter_file), adapter_format)
    adapter_config = {
        "base_model_name_or_path": base_dir,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    # The original's LoRA run trains only the projector besides the adapter.
    checkpoint_files.save_non_lora(out_dir, checkpoint_files.projector_state(model.state_dict()))
    _write_config(out_dir, dict(config_dict, mm_projector_lr=2e-5))
    return out_dir, adapter


def install_in_hf_cache(src_dir: str, repo_id: str, hf_home: str, revision: str = "0" * 40) -> str:
    """Lay a folder out as a cached hub snapshot (``$HF_HOME/hub/models--org--name/snapshots/<rev>``).

    With ``HF_HOME=hf_home`` and ``HF_HUB_OFFLINE=1``, ``repo_id`` then resolves with no network, exactly as a
    model downloaded earlier would.
    """
    repo_dir = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo_dir, "snapshots", revision)
    shutil.copytree(src_dir, snapshot, dirs_exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(revision)
    return snapshot
