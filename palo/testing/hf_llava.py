"""transformers' ``LlavaForConditionalGeneration`` holding a PALO model's weights: the parity and speed baseline.

Only ``mlp2x_gelu`` PALO models have an HF Llava twin (Llava has no LDP). Used by the parity tests and the
benchmarks, so the key mapping lives in one place.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

_TOWER = "model.vision_tower.vision_tower.vision_model."
_PROJECTOR = "model.mm_projector."


def llava_config(text_config: LlamaConfig, vision_config: CLIPVisionConfig, image_token_id: int) -> LlavaConfig:
    """The Llava config equivalent to PALO's (CLIP layer -2 without CLS, exact-GELU 2-layer MLP projector)."""
    return LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
    )


def to_llava_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a PALO (``mlp2x_gelu``) state dict to transformers 5's Llava key layout (tensors are shared)."""
    mapped = {}
    for key, value in state.items():
        if key.startswith(_TOWER):
            mapped["model.vision_tower." + key[len(_TOWER):]] = value
        elif key.startswith(_PROJECTOR):
            index, rest = key[len(_PROJECTOR):].split(".", 1)
            mapped[f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"] = value
        elif key.startswith("model."):
            mapped["model.language_model." + key[len("model."):]] = value
        else:
            mapped[key] = value
    return mapped
