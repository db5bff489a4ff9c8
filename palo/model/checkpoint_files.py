"""The files of PALO checkpoints: their names, what they hold, how they are read and written.

Everything that touches ``mm_projector.bin``, ``non_lora_trainables.bin`` or the PEFT key prefix goes through
here (the builder, training setup, the trainer's save and resume, the tiny test fixtures), so the layouts below
are written in one place and read in one place:

==============================  ===============================================================================
file                            content (a ``torch.save`` pickle of a flat ``{name: tensor}`` dict)
==============================  ===============================================================================
``mm_projector.bin``            stage 1: every tensor whose name contains ``mm_projector`` (or
                                ``vision_resampler``), with the bare model's names: ``model.mm_projector.0.weight``;
                                with ``mm_use_im_start_end`` also ``model.embed_tokens.weight`` (the trained rows
                                of ``<im_start>``/``<im_end>``)
``non_lora_trainables.bin``     LoRA: every trainable tensor without ``lora_`` in its name, with the PEFT
                                wrapper's names: ``base_model.model.model.mm_projector.0.weight``
``adapter_model.{bin,safetensors}``  LoRA: PEFT's adapter tensors, adapter name removed (written by PEFT)
==============================  ===============================================================================

What kind a checkpoint folder is follows from which of these files it holds (:func:`detect_checkpoint_kind`),
never from the folder's name. Files are written through a temporary file and ``os.replace``, so a crash leaves
the previous file or none, never half of one.
"""

from __future__ import annotations

import contextlib
import enum
import os
import pickle
import uuid
import zipfile
from collections.abc import Collection, Iterable, Mapping

import torch
from torch import nn

from palo.model.config import MultimodalSpec

PROJECTOR_FILE = "mm_projector.bin"
NON_LORA_FILE = "non_lora_trainables.bin"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# Newer PEFT writes safetensors, PEFT 0.4 (the original's) .bin; the first one present is read.
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Every weight file a full checkpoint may hold, as glob patterns: what a new save into a folder replaces (shards of
# an earlier save that the new one did not write would still be read by a loader).
WEIGHT_FILE_PATTERNS = (*WEIGHT_FILES, "model-*.safetensors", "pytorch_model-*.bin")
# What a PEFT wrapper puts before the bare model's parameter names (``PeftModel.base_model.model``).
PEFT_PREFIX = "base_model.model."
# Names containing one of these belong in mm_projector.bin (the original's stage-1 save also matches the resampler).
PROJECTOR_KEYS = ("mm_projector", "vision_resampler")
# ... and, when <im_start>/<im_end> are trained in stage 1, the input embeddings (LLaMA, GPT-NeoX names).
EMBEDDING_KEYS = ("embed_tokens", "embed_in")


class CheckpointError(ValueError):
    """A folder is not a loadable checkpoint, or lacks what its kind needs."""


class CheckpointKind(enum.Enum):
    FULL = "full"
    LORA = "lora"
    PROJECTOR = "projector"


def detect_checkpoint_kind(model_dir: str) -> CheckpointKind:
    """Classify a checkpoint folder by the files it holds.

    Raises:
        CheckpointError: If the folder holds no checkpoint.
    """
    files = set(os.listdir(model_dir))
    if files & set(ADAPTER_FILES):
        if ADAPTER_CONFIG_FILE not in files:
            raise CheckpointError(f"{model_dir!r} has LoRA weights but no {ADAPTER_CONFIG_FILE}")
        return CheckpointKind.LORA
    if "config.json" not in files:
        raise CheckpointError(
            f"{model_dir!r} is not a checkpoint: it has no config.json (files: {sorted(files)[:10]}). Expected a "
            "full model (config.json + model.safetensors or pytorch_model*.bin), a LoRA output "
            f"({ADAPTER_CONFIG_FILE} + adapter_model.*) or a stage-1 output (config.json + {PROJECTOR_FILE})."
        )
    has_weights = bool(files & set(WEIGHT_FILES)) or any(
        f.startswith(("model-", "pytorch_model-")) and f.endswith((".safetensors", ".bin")) for f in files
    )
    if has_weights:
        return CheckpointKind.FULL
    if PROJECTOR_FILE in files:
        return CheckpointKind.PROJECTOR
    raise CheckpointError(
        f"{model_dir!r} has a config.json but no weights: expected model.safetensors, pytorch_model*.bin, "
        f"adapter_model.* (LoRA) or {PROJECTOR_FILE} (stage 1)."
    )


# -- key names ---------------------------------------------------------------------------------------------------
def peft_keys(state: Mapping[str, torch.Tensor], *, wrapped: bool) -> dict[str, torch.Tensor]:
    """Rename a state dict's keys to a PEFT-wrapped model's names or back to the bare model's.

    ``wrapped=True``: ``model.mm_projector.0.weight`` -> ``base_model.model.model.mm_projector.0.weight`` (keys
    that already carry the prefix are kept). ``wrapped=False``: the original LoRA loader's normalisation, which
    accepts both historical forms: drop a leading ``base_model.``, then, if any key starts with ``model.model.``,
    one leading ``model.`` from every key; bare names pass unchanged.
    """
    if wrapped:
        return {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v for k, v in state.items()}
    outer = PEFT_PREFIX.split(".", 1)[0] + "."  # "base_model."
    stripped = {(k[len(outer):] if k.startswith(outer) else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in stripped):
        stripped = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in stripped.items()}
    return stripped


def check_keys(expected: Iterable[str], found: Iterable[str], source: str, hint: str) -> None:
    """Fail unless ``found`` names exactly the tensors in ``expected``.

    Args:
        expected: The names the model needs.
        found: The names the file holds.
        source: The file, for the message.
        hint: What to do about a mismatch, for the message.

    Raises:
        CheckpointError: Naming the missing and the unexpected keys.
    """
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing {_examples(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected {_examples(unexpected)}")
    raise CheckpointError(f"{source} does not match this model: {'; '.join(parts)}. {hint}")


def _examples(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


# -- reading and writing -----------------------------------------------------------------------------------------
def _atomic_save(state: dict[str, torch.Tensor], path: str) -> None:
    """``torch.save`` through a temp file in the same folder and ``os.replace``: never half a file at ``path``."""
    # Named here rather than by mkstemp, whose 0600 mode would make the checkpoint unreadable to other users.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A copy, not a view: torch.save writes a view's whole storage, and the file must not change with the model.
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """A ``.bin`` (torch pickle, tensors only) or ``.safetensors`` state dict, on the CPU.

    Raises:
        CheckpointError: If the file does not exist or cannot be read (cut short, not a state dict file).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    from safetensors import SafetensorError

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    # A cut file: torch's zip reader raises RuntimeError, its memory map OSError (EINVAL), a cut old-style pickle
    # EOFError or UnpicklingError; said with the file's name, not as an anonymous errno or a traceback.
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, SafetensorError) as exc:
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:300]}); is it cut short?"
                              ) from exc


def _file_in(path: str, name: str) -> str:
    """``path`` itself, or ``path/name`` when ``path`` is a folder."""
    return os.path.join(path, name) if os.path.isdir(path) else path


def projector_state(state: Mapping[str, torch.Tensor], embeddings: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a model state dict (bare or PEFT-wrapped) that make ``mm_projector.bin``, bare names.

    Args:
        state: A model state dict.
        embeddings: Also the input embeddings (``mm_use_im_start_end``, as the original).
    """
    keys = PROJECTOR_KEYS + (EMBEDDING_KEYS if embeddings else ())
    return peft_keys({k: v for k, v in state.items() if any(p in k for p in keys)}, wrapped=False)


def save_projector(folder: str, state: Mapping[str, torch.Tensor], embeddings: bool = False) -> str:
    """Write ``folder/mm_projector.bin`` from a model state dict, as the original stage 1 does.

    Args:
        folder: The output folder (created if needed).
        state: The model's state dict, bare or PEFT-wrapped; only the projector's tensors are written, with the
            bare model's names (``model.mm_projector.0.weight``) in their own dtype.
        embeddings: Also write the input embeddings (``model.embed_tokens.weight``): the original does so when
            ``mm_use_im_start_end`` is on, since stage 1 then trains the ``<im_start>``/``<im_end>`` rows.

    Returns:
        The path written.

    Raises:
        CheckpointError: If ``state`` holds no projector tensors.
    """
    projector = projector_state(state, embeddings)
    if not any(p in k for k in projector for p in PROJECTOR_KEYS):
        raise CheckpointError(f"no mm_projector weights to write to {folder} (keys: {list(state)[:5]})")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PROJECTOR_FILE)
    _atomic_save(_cpu_copy(projector), path)
    return path


def load_projector(path: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read ``mm_projector.bin`` (a folder holding it or the file itself), keys as stored.

    Args:
        path: The file, or the stage-1 output folder.
        dtype: Cast floating-point tensors to this dtype (None keeps the stored one).

    Raises:
        CheckpointError: If there is no such file.
    """
    file = _file_in(path, PROJECTOR_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(
            f"{file} does not exist: pass a stage-1 output's {PROJECTOR_FILE} (or the folder holding it)"
        )
    state = load_state_file(file)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def projector_weights(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The projector's own state dict from a file's keys: everything after the first ``mm_projector.``.

    Any file whose projector has the right shapes fits, whatever model it came from (as in the original).

    Raises:
        CheckpointError: If ``state`` has no ``mm_projector`` tensors.
    """
    marker = "mm_projector."
    weights = {k.split(marker, 1)[1]: v for k, v in state.items() if marker in k}
    if not weights:
        raise CheckpointError(
            f"{source} holds no mm_projector weights (keys: {list(state)[:5]}); expected keys like "
            "model.mm_projector.0.weight"
        )
    return weights


def load_into_projector(projector: nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str) -> None:
    """Load a file's ``mm_projector`` tensors into ``projector``, strictly.

    Args:
        projector: The model's projector module.
        state: The file's state dict (any key prefix before ``mm_projector.``).
        source: The file, for messages.
        what: The projector, for messages (e.g. ``"the projector 'mlp2x_gelu' of this config"``).

    Raises:
        CheckpointError: If the file has no projector tensors or they do not fit.
    """
    try:
        projector.load_state_dict(projector_weights(state, source), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{source} does not fit {what}: {str(exc).strip().rstrip('.')}. Use a projector file trained with the "
            "same mm_projector_type and model sizes"
        ) from exc


def new_token_rows(state: Mapping[str, torch.Tensor], num_new: int, rows: int, source: str) -> torch.Tensor:
    """The stage-1 rows of ``<im_start>``/``<im_end>`` in an ``mm_projector.bin``, by the original's rule.

    The file's ``model.embed_tokens.weight`` gives its last ``num_new`` rows when it has the model's ``rows`` rows,
    or all of them when it has exactly ``num_new`` rows.

    Raises:
        CheckpointError: If the file has no embeddings or they fit neither way.
    """
    weight = state.get("model.embed_tokens.weight")
    if weight is None:
        raise CheckpointError(
            f"{source} holds no model.embed_tokens.weight, which --mm_use_im_start_end True needs: use a stage-1 "
            "projector trained with --mm_use_im_start_end True, or fine-tune with --mm_use_im_start_end False"
        )
    if weight.shape[0] == rows:
        return weight[-num_new:]
    if weight.shape[0] == num_new:
        return weight
    raise CheckpointError(
        f"{source}: model.embed_tokens.weight has {weight.shape[0]} rows, expected {rows} (this tokenizer) or "
        f"{num_new} (the new tokens); use a stage-1 projector trained with the same tokenizer"
    )


def non_lora_state(state: Mapping[str, torch.Tensor], trainable: Collection[str]) -> dict[str, torch.Tensor]:
    """What ``non_lora_trainables.bin`` holds: the trainable tensors without ``lora_`` in their name."""
    return {k: v for k, v in state.items() if k in trainable and "lora_" not in k}


def trainable_non_lora_names(model: nn.Module) -> set[str]:
    """The names a PEFT model's ``non_lora_trainables.bin`` has to hold (its trainable, non-LoRA parameters)."""
    return {name for name, param in model.named_parameters() if param.requires_grad and "lora_" not in name}


def save_non_lora(folder: str, state: Mapping[str, torch.Tensor]) -> str:
    """Write ``folder/non_lora_trainables.bin`` with the PEFT wrapper's key names, as the original LoRA run does.

    Args:
        folder: The output folder (created if needed).
        state: The tensors (see :func:`non_lora_state`); bare names get the ``base_model.model.`` prefix.

    Returns:
        The path written.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, NON_LORA_FILE)
    _atomic_save(_cpu_copy(peft_keys(state, wrapped=True)), path)
    return path


def load_non_lora(folder: str, *, wrapped: bool) -> dict[str, torch.Tensor]:
    """Read ``folder/non_lora_trainables.bin``.

    Args:
        folder: The LoRA output folder.
        wrapped: True: keys as a PEFT-wrapped model names them (to resume training); False: as the bare model
            names them (to load before merging), either historical form accepted.

    Raises:
        CheckpointError: If the folder has no such file.
    """
    file = os.path.join(folder, NON_LORA_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(
            f"{folder!r} is a PALO LoRA folder without {NON_LORA_FILE}: copy it from the training run's output "
            "folder (the trainer writes it next to adapter_model.*)"
        )
    return peft_keys(load_state_file(file), wrapped=wrapped)


def load_adapter(folder: str) -> dict[str, torch.Tensor]:
    """The LoRA adapter tensors of a PEFT output folder (keys without the adapter name), either file format.

    Raises:
        CheckpointError: If the folder has no adapter file.
    """
    for name in ADAPTER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return load_state_file(os.path.join(folder, name))
    raise CheckpointError(f"{folder!r} has no LoRA adapter ({' or '.join(ADAPTER_FILES)})")


# -- resuming training -------------------------------------------------------------------------------------------
_RESUME_HINT = (
    "It was written by a run with other flags (LoRA rank, projector type, frozen modules, --tune_mm_mlp_adapter): "
    "resume with the flags of that run, or train into a new --output_dir"
)


def restore_projector(model: nn.Module, folder: str) -> None:
    """Resume stage 1: load ``folder/mm_projector.bin`` into ``model``'s projector, every key checked.

    With ``mm_use_im_start_end`` in the model's config, the file's input embeddings are restored too.

    Args:
        model: The bare PALO model (not a PEFT wrapper).
        folder: A ``checkpoint-N`` folder.

    Raises:
        CheckpointError: If the file is missing or its keys differ from the model's projector's.
    """
    file = os.path.join(folder, PROJECTOR_FILE)
    state = load_projector(file)
    embeddings = MultimodalSpec.from_config(model.config).use_im_start_end
    check_keys(projector_state(model.state_dict(), embeddings), state, file, _RESUME_HINT)
    model.get_model().mm_projector.load_state_dict(projector_weights(state, file), strict=True)
    if embeddings:
        weight = model.get_input_embeddings().weight
        with torch.no_grad():
            weight.copy_(next(v for k, v in state.items() if any(e in k for e in EMBEDDING_KEYS)))


def restore_lora(model: nn.Module, folder: str) -> None:
    """Resume a LoRA run: load the adapter and ``non_lora_trainables.bin`` into a PEFT model, every key checked.

    Args:
        model: The PEFT-wrapped model being trained.
        folder: A ``checkpoint-N`` folder.

    Raises:
        CheckpointError: If a file is missing or holds other tensors than the model trains.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapter = load_adapter(folder)
    check_keys(get_peft_model_state_dict(model), adapter, os.path.join(folder, "adapter_model.*"), _RESUME_HINT)
    set_peft_model_state_dict(model, adapter)
    non_lora = load_non_lora(folder, wrapped=True)
    check_keys(trainable_non_lora_names(model), non_lora, os.path.join(folder, NON_LORA_FILE), _RESUME_HINT)
    model.load_state_dict(non_lora, strict=False)  # the partial state is checked above; strict would want all
