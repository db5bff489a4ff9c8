"""The CLIP vision tower: resolving ``mm_vision_tower``, building the module and selecting features.

``mm_vision_tower`` names a CLIP checkpoint by hub id or local path. The tower's *architecture* is needed to build
the model and its *weights* to run it; they are resolved separately so a checkpoint that carries the tower's weights
loads with no network at all:

1. the architecture comes from the config's ``mm_vision_config`` (written by this project), else the CLIP
   checkpoint (local folder or the local Hugging Face cache), else a built-in preset for the CLIP models PALO and
   LLaVA use;
2. the weights come from the PALO checkpoint when it carries ``model.vision_tower.vision_tower.*``, else from the
   CLIP checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

logger = logging.getLogger(__name__)

try:  # transformers >= 5 keeps the PIL implementation under this name; it matches the original's PIL resize.
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # pragma: no cover - older 5.x
    from transformers import CLIPImageProcessor as _CLIPImageProcessor

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Architectures of the CLIP towers used by PALO and LLaVA, so a checkpoint carrying the tower's weights needs no
# download. Values from the models' published config.json (vision part).
_CLIP_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
VISION_PRESETS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(_CLIP_L14, image_size=336),
    "openai/clip-vit-large-patch14": dict(_CLIP_L14, image_size=224),
}


class VisionTowerError(RuntimeError):
    """The vision tower named by the config cannot be resolved or loaded."""


class VisionLayerError(VisionTowerError, ValueError):
    """``mm_vision_select_layer`` names no hidden state of the tower (a ValueError too, as it was)."""


@dataclass(frozen=True)
class VisionFeatureSpec:
    """Which CLIP features feed the projector.

    Attributes:
        select_layer: Index into CLIP's ``hidden_states`` (embedding output plus one per layer); ``-2`` is the
            penultimate layer's output, before ``post_layernorm``.
        select_feature: ``patch`` drops the CLS token, ``cls_patch`` keeps it.
    """

    select_layer: int = -2
    select_feature: str = "patch"

    def __post_init__(self) -> None:
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(
                f"mm_vision_select_feature={self.select_feature!r} is not supported; use 'patch' or 'cls_patch'"
            )


def _hf_offline_hint() -> str:
    return " (HF_HUB_OFFLINE is set: only the local cache is used)" if os.environ.get("HF_HUB_OFFLINE") else ""


def resolve_vision_config(name: str) -> CLIPVisionConfig:
    """The architecture of the CLIP tower ``name`` (a local folder, a cached hub id, or a known preset).

    Raises:
        VisionTowerError: If none of those knows ``name``.
    """
    try:
        config = CLIPVisionConfig.from_pretrained(name)
        return config
    except (OSError, ValueError) as exc:
        if name in VISION_PRESETS:
            return CLIPVisionConfig(**VISION_PRESETS[name])
        raise VisionTowerError(
            f"Cannot resolve the vision tower {name!r}: it is not a local folder with a config.json, not in the "
            f"local Hugging Face cache{_hf_offline_hint()}, and not a built-in preset ({', '.join(VISION_PRESETS)}). "
            "Download it, or pass a local CLIP folder with --vision-tower (vision_tower= in Python)."
        ) from exc


def load_image_processor(name: str, image_size: int, fallback_dirs: tuple[str, ...] = ()) -> Any:
    """The CLIP image processor of tower ``name``, else of a fallback folder, else CLIP's standard settings.

    Args:
        name: The ``mm_vision_tower`` id or path.
        image_size: The tower's input size, used when no processor config can be found.
        fallback_dirs: Other folders that may hold a ``preprocessor_config.json`` (the checkpoint itself).
    """
    for source in (name, *fallback_dirs):
        try:
            return _CLIPImageProcessor.from_pretrained(source)
        except (OSError, ValueError):
            continue
    logger.info("Using the standard CLIP preprocessing (%dpx) for %s", image_size, name)
    return build_clip_image_processor(image_size)


def build_clip_image_processor(image_size: int) -> Any:
    """CLIP preprocessing: bicubic resize of the short side, centre crop, rescale, normalise with CLIP's stats."""
    return _CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def _local_folder(source: str) -> str:
    """A local folder for a CLIP id or path (hub ids through the local cache, or a download when online)."""
    if os.path.isdir(source):
        return source
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id=source, allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"]
    )


def _read_weight_files(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint folder (safetensors preferred, sharded or not)."""
    from safetensors.torch import load_file

    names = sorted(os.listdir(folder))
    safetensors = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    if not safetensors and not bins:
        raise OSError(f"no model weights (*.safetensors or pytorch_model*.bin) in {folder}")
    state: dict[str, torch.Tensor] = {}
    for name in safetensors or bins:
        path = os.path.join(folder, name)
        state.update(load_file(path) if name.endswith(".safetensors")
                     else torch.load(path, map_location="cpu", weights_only=True))
    return state


class _VisionModelHolder(nn.Module):
    """Keeps the original key layout ``vision_tower.vision_model.*`` whatever transformers' own nesting is."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        model = CLIPVisionModel(config)
        # transformers < 5 nests the transformer under ``.vision_model``; 5.x is flat. Either way the weights end up
        # under ``vision_model.`` here, as in the original checkpoints.
        self.vision_model = getattr(model, "vision_model", model)


class CLIPVisionTower(nn.Module):
    """A frozen CLIP vision encoder returning the features the projector consumes.

    State-dict keys read ``vision_tower.vision_model.embeddings...`` so under the PALO model they are
    ``model.vision_tower.vision_tower.vision_model...`` as in the original checkpoints.

    Args:
        name: The ``mm_vision_tower`` value, kept for reporting and for loading weights later.
        config: The CLIP vision architecture.
        features: Which hidden state and tokens to return.
    """

    def __init__(self, name: str, config: CLIPVisionConfig, features: VisionFeatureSpec) -> None:
        super().__init__()
        # hidden_states holds the embedding output and one entry per layer; the original indexed it directly, so
        # a value outside it failed there. Refuse it here rather than let the modulo in _encode wrap it round to
        # another layer (25 on CLIP-L would silently read the raw patch embeddings).
        layers = int(config.num_hidden_layers)
        if not -(layers + 1) <= features.select_layer <= layers:
            raise VisionLayerError(
                f"mm_vision_select_layer={features.select_layer} is outside the hidden states of the vision tower "
                f"{name!r}: it has {layers} layers, so the value must be from {-(layers + 1)} to {layers} "
                "(PALO and LLaVA-1.5 use -2)"
            )
        self.name = name
        self.config = config
        self.features = features
        self.vision_tower = _VisionModelHolder(config)
        self.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Feature rows per image: 576 patches for ViT-L/14-336, plus one with ``cls_patch``."""
        return self.num_patches + (1 if self.features.select_feature == "cls_patch" else 0)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype

    def load_weights_from(self, source: str) -> None:
        """Copy CLIP weights from a local folder or cached hub id ``source`` into this tower.

        The weight files are read directly (not through ``from_pretrained``), so this also works inside a
        DeepSpeed ZeRO-3 run, where ``from_pretrained`` would hand back partitioned, empty parameters. Keys of
        full CLIP checkpoints (``vision_model.*`` next to ``text_model.*``) and of vision-only ones, with or
        without the ``vision_model.`` prefix, are accepted.

        Raises:
            VisionTowerError: If the weights cannot be found or do not fit this architecture.
        """
        try:
            folder = _local_folder(source)
            state = _read_weight_files(folder)
        except (OSError, ValueError) as exc:
            raise VisionTowerError(
                f"The checkpoint does not carry the vision tower's weights and {source!r} cannot be loaded"
                f"{_hf_offline_hint()}: {exc}. Pass a local CLIP folder with --vision-tower."
            ) from exc
        target = self.vision_tower.vision_model
        wanted = set(target.state_dict())
        tower_state = {}
        for key, value in state.items():
            key = key[len("vision_model."):] if key.startswith("vision_model.") else key
            if key in wanted:
                tower_state[key] = value
        missing = sorted(wanted - set(tower_state) - {k for k in wanted if k.endswith("position_ids")})
        if missing:
            raise VisionTowerError(f"{source!r} lacks vision-tower weights: {missing[:5]}")
        param = next(target.parameters())
        try:
            target.load_state_dict(tower_state, strict=False)
        except RuntimeError as exc:
            raise VisionTowerError(f"{source!r} does not fit the vision tower's architecture: {exc}") from exc
        target.to(device=param.device, dtype=param.dtype)

    # -- the original tower's attributes, for scripts that follow its loading code -------------------------------
    @property
    def is_loaded(self) -> bool:
        """Always True: the tower gets its weights when the checkpoint loads (the original loaded them later)."""
        return True

    def load_model(self, device_map: Any = None) -> None:
        """Nothing left to load (see :attr:`is_loaded`); kept for the original loader's
        ``if not tower.is_loaded: tower.load_model()``."""

    @property
    def device(self) -> torch.device:
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.device

    @property
    def vision_tower_name(self) -> str:
        return self.name

    @property
    def select_layer(self) -> int:
        return self.features.select_layer

    @property
    def select_feature(self) -> str:
        return self.features.select_feature

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Encode images.

        Only the encoder layers up to ``select_layer`` run: with PALO's ``-2`` the last CLIP layer (whose output
        nobody reads) is skipped, which ``output_hidden_states=True`` would compute.

        Args:
            images: Pixel values ``[N, 3, H, W]``; or, as the original took them, a list of ``[3, H, W]`` images.

        Returns:
            Features ``[N, num_tokens, hidden_size]`` in the dtype of ``images``; for a list, a list of
            ``[1, num_tokens, hidden_size]``.
        """
        if isinstance(images, (list, tuple)):
            return [self(image[None]) for image in images]
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.parameters()):
            # Frozen (as always in PALO's recipes): record no graph, as the original's no_grad did. Without this,
            # gradient checkpointing's input hook (transformers 5 hooks every nested model's embeddings, CLIP's
            # too) makes the features require grad, and backward runs through the tower keeping its activations.
            with torch.no_grad():
                return self._encode(images)
        return self._encode(images)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        vision = self.vision_tower.vision_model
        weight = vision.embeddings.patch_embedding.weight
        layers = vision.encoder.layers
        # hidden_states[0] is the (pre-layernormed) embedding output, hidden_states[i] the output of layer i.
        index = self.features.select_layer % (len(layers) + 1)
        hidden = vision.pre_layrnorm(vision.embeddings(images.to(device=weight.device, dtype=weight.dtype)))
        for layer in layers[:index]:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.features.select_feature == "patch":
            hidden = hidden[:, 1:]
        return hidden.to(images.dtype)
