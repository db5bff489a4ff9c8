"""The PALO multimodal causal LM: a CLIP vision tower, a projector and a LLaMA-family language model.

Composition, with the original checkpoint layout:

* ``model`` (:class:`PaloModel`) is the LLaMA decoder. It also *holds* ``vision_tower`` and ``mm_projector`` so
  that their weights keep the released names ``model.vision_tower.vision_tower.*`` and ``model.mm_projector.*``;
  the decoder's own forward never touches them.
* :class:`PaloForCausalLM` encodes images (tower, then projector), splices the features into the embedded prompt
  with :mod:`palo.model.multimodal`, and runs the decoder and ``lm_head``.

``model.generate(input_ids, images=...)`` takes prompts with the ``-200`` image sentinel as in the original and
returns the prompt ids followed by the new ids (PALO's convention: callers slice off ``input_ids.shape[1]``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaForCausalLM, LlamaModel, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from palo.constants import IMAGE_TOKEN_INDEX
from palo.model.config import LlavaLlamaConfig, MultimodalSpec, PaloConfig
from palo.model.multimodal import SplicedInputs, apply_splice, plan_splice
from palo.model.projectors import build_projector
from palo.model.vision_tower import CLIPVisionTower, VisionFeatureSpec, resolve_vision_config

# What LLaMA's forward calls its KV cache: ``past_key_values`` (transformers 5.17, the lent GPU image's) or ``cache``
# (5.25; the old name still works there, with a deprecation warning on every call).
_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _cache_length(cache: Any) -> int:
    """Positions held by a KV cache (transformers' ``Cache``, or the legacy tuple of per-layer ``(k, v)``)."""
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[-1][-1].shape[-2])


def build_vision_tower(config: PaloConfig, spec: MultimodalSpec) -> CLIPVisionTower:
    """Build the (randomly initialised) CLIP tower described by ``config``.

    The architecture comes from ``config.mm_vision_config`` when present (this project writes it), else it is
    resolved from ``mm_vision_tower`` (local folder, cache, or preset).
    """
    vision_config = getattr(config, "mm_vision_config", None)
    if isinstance(vision_config, dict):
        vision_config = CLIPVisionConfig(**vision_config)
    elif vision_config is None:
        vision_config = resolve_vision_config(spec.vision_tower)
    features = VisionFeatureSpec(select_layer=spec.select_layer, select_feature=spec.select_feature)
    return CLIPVisionTower(spec.vision_tower, vision_config, features)


@dataclass
class PaloCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output plus what training statistics need, aligned with ``logits`` ``[B, L]``.

    Attributes:
        spliced_labels: The labels after the image splice (image rows and padding ``IGNORE_INDEX``).
        spliced_attention_mask: 1 on real positions, 0 on padding.
        spliced_position_ids: Packed batches only: positions restarting at 0 where each sample (and the padding)
            starts, which tells the samples of a row apart.
        token_losses: ``[B, L - 1]`` with Liger's fused head in training (:mod:`palo.model.kernels`), which
            returns no logits: the loss of predicting each next token, 0 where its label is ignored.
    """

    spliced_labels: torch.LongTensor | None = None
    spliced_attention_mask: torch.LongTensor | None = None
    spliced_position_ids: torch.LongTensor | None = None
    token_losses: torch.FloatTensor | None = None


class PaloModel(LlamaModel):
    """The LLaMA decoder, also holding the vision tower and the projector under their original names."""

    config_class = PaloConfig

    def __init__(self, config: PaloConfig) -> None:
        super().__init__(config)
        spec = MultimodalSpec.from_config(config)
        if spec.is_multimodal:
            self.vision_tower = build_vision_tower(config, spec)
            mm_hidden = spec.mm_hidden_size or self.vision_tower.hidden_size
            self.mm_projector = build_projector(spec.projector_type, mm_hidden, config.hidden_size)

    def get_vision_tower(self) -> CLIPVisionTower | None:
        """Original API: the vision tower, or None for a text-only model."""
        return getattr(self, "vision_tower", None)


def _flatten_images(images: Any) -> list[torch.Tensor]:
    """Accept ``[N, 3, H, W]``, ``[B, k, 3, H, W]``, or a list of ``[3, H, W]`` / ``[k, 3, H, W]``."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 4:
            return list(images)
        if images.dim() == 5:
            return list(images.flatten(0, 1))
        if images.dim() == 3:
            return [images]
        raise ValueError(f"images must be [N, 3, H, W] or [B, k, 3, H, W], got shape {tuple(images.shape)}")
    flat: list[torch.Tensor] = []
    for item in images:
        flat.extend(_flatten_images(item) if item.dim() != 3 else [item])
    return flat


class _WithPrompt(StoppingCriteria):
    """Shows a stopping criterion the prompt followed by the new ids, as generation from ids would.

    Generation here runs from embeddings, where transformers passes criteria only the new ids; criteria written for
    the original (e.g. :class:`~palo.mm_utils.KeywordsStoppingCriteria`) count new tokens from the prompt length.
    """

    def __init__(self, inner: StoppingCriteria, prompt_ids: torch.Tensor) -> None:
        self.inner = inner
        self.prompt_ids = prompt_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        # Beam search and num_return_sequences run k rows per prompt, each prompt's consecutive (a row count that
        # differed from the prompts' failed to concatenate: model_vqa --num_beams 2 stopped at its first question).
        prompts = self.prompt_ids.to(input_ids.device)
        prompts = prompts.repeat_interleave(input_ids.shape[0] // prompts.shape[0], dim=0)
        full = torch.cat([prompts, input_ids], dim=1)
        result = self.inner(full, scores, **kwargs)
        if isinstance(result, bool):
            result = torch.full((input_ids.shape[0],), result, dtype=torch.bool, device=input_ids.device)
        return result


class _ContextLimit(StoppingCriteria):
    """Ends each row when it fills the model's context: its prompt positions plus the tokens made so far.

    Without it ``generate`` ran past ``max_position_embeddings`` wherever ``max_new_tokens`` allowed (the engine
    stops every row there), so answers near the limit depended on the path.

    Args:
        prompt_positions: ``[B]``, each prompt's positions (images spliced in, padding not).
        limit: The model's context.
        prompt_columns: Columns of the prompt in the ids the criterion is shown (0 when generating from embeddings,
            where transformers shows only the new ids).
    """

    def __init__(self, prompt_positions: torch.Tensor, limit: int, prompt_columns: int) -> None:
        self.prompt_positions = prompt_positions
        self.limit = limit
        self.prompt_columns = prompt_columns

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        made = input_ids.shape[1] - self.prompt_columns
        rows = self.prompt_positions.to(input_ids.device)
        rows = rows.repeat_interleave(input_ids.shape[0] // rows.shape[0])  # beams, num_return_sequences
        return rows + made >= self.limit


class PaloForCausalLM(LlamaForCausalLM):
    """PALO / LLaVA-1.5 multimodal causal LM over a LLaMA-family language model."""

    config_class = PaloConfig
    # Old checkpoints carry buffers that current modules recompute.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"embeddings\.position_ids"]

    def __init__(self, config: PaloConfig) -> None:
        # Skip LlamaForCausalLM.__init__, which would first build a plain LlamaModel only to replace it.
        LlamaPreTrainedModel.__init__(self, config)
        self.model = PaloModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # -- parts -------------------------------------------------------------------------------------------------
    @property
    def spec(self) -> MultimodalSpec:
        return MultimodalSpec.from_config(self.config)

    @property
    def vision_tower(self) -> CLIPVisionTower | None:
        return getattr(self.model, "vision_tower", None)

    @property
    def projector(self) -> torch.nn.Module | None:
        return getattr(self.model, "mm_projector", None)

    def get_model(self) -> PaloModel:
        """Original API: the inner model."""
        return self.model

    def get_vision_tower(self) -> CLIPVisionTower | None:
        """Original API: the vision tower (``.image_processor`` is attached by the loader)."""
        return self.vision_tower

    # -- images --------------------------------------------------------------------------------------------------
    @property
    def image_token_count(self) -> int:
        """LLM positions one image occupies: 576 for CLIP-L/336 with an MLP projector, 144 with LDP.

        Computed from the tower's architecture and the projector type (:meth:`MultimodalSpec.tokens_per_image`);
        nothing is run.
        """
        if self.vision_tower is None:
            return 0
        return self.spec.tokens_per_image(self.vision_tower.config)

    def encode_images(self, images: Any) -> torch.Tensor:
        """Vision tower then projector.

        Args:
            images: Pixel values ``[N, 3, H, W]``, ``[B, k, 3, H, W]`` or a list of ``[3, H, W]`` / ``[k, 3, H, W]``.

        Returns:
            ``[N, n, hidden_size]``: n = :attr:`image_token_count` rows per image.
        """
        if self.vision_tower is None:
            raise ValueError("This checkpoint has no vision tower (no mm_vision_tower in config.json): "
                             "it takes text only")
        pixels = (images if isinstance(images, torch.Tensor) and images.dim() == 4
                  else torch.stack(_flatten_images(images)))
        features = self.vision_tower(pixels)
        return self.projector(features.to(self._projector_weight().dtype))

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        images: Any,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
        packed_position_ids: torch.Tensor | None = None,
        truncate: bool = True,
    ) -> SplicedInputs:
        """Encode ``images`` and splice them into ``input_ids`` (see :mod:`palo.model.multimodal`).

        The layout is planned from ``input_ids`` before the vision tower is launched, so a mismatch fails before any
        compute and the device never waits on the host afterwards. ``packed_position_ids`` (``[B, T]``, 0 where each
        sample of a packed row starts) makes the spliced positions restart per sample. ``truncate``: cut each
        sequence to ``tokenizer_model_max_length`` as the original did (training); generation keeps the whole
        prompt, as the engine does.
        """
        spec = self.spec
        if images is None:
            num_images = 0
        elif isinstance(images, torch.Tensor) and images.dim() in (4, 5):
            num_images = images.shape[0] if images.dim() == 4 else images.shape[0] * images.shape[1]
        else:
            images = _flatten_images(images)
            num_images = len(images)
        plan = plan_splice(
            input_ids,
            num_images,
            self.image_token_count,
            attention_mask,
            padding_side=padding_side or spec.padding_side,
            max_length=spec.max_length if truncate else None,
            position_ids=packed_position_ids,
        )
        features = self.encode_images(images) if num_images else []
        return apply_splice(plan, input_ids, features, self.get_input_embeddings(), labels)

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        labels: torch.Tensor | None,
        images: Any,
        image_sizes: Any = None,
    ) -> tuple[Any, ...]:
        """Original API (PALO / LLaVA-1.5, its argument order), for scripts that embed inputs themselves (scoring,
        log-likelihoods): :meth:`prepare_multimodal_inputs` under the old name.

        Returns:
            ``(None, position_ids, attention_mask, past_key_values, inputs_embeds [B, L, D], labels)`` over the
            spliced sequence; ``position_ids``, ``attention_mask`` and ``labels`` are None where they were given as
            None (the mask also when no row is padded after the splice), as in the original. Without images, or
            for one decoding step, the inputs come back with no embeddings; a decoding step with images, a cache
            and a mask (the images are in the cache) gets the mask grown to the cache and its positions, as the
            original's did.
        """
        if images is None or input_ids.shape[1] == 1:
            if images is not None and past_key_values is not None and attention_mask is not None:
                # A decoding step of a hand-written loop that passes the images every step, as the original's
                # generate did: the images are in the cache already; the text-level mask grows to the cached
                # positions plus this one, and the position follows the real ones.
                missing = _cache_length(past_key_values) + 1 - attention_mask.shape[1]
                if missing > 0:
                    ones = attention_mask.new_ones(len(attention_mask), missing)
                    attention_mask = torch.cat([attention_mask, ones], dim=1)
                position_ids = attention_mask.long().sum(dim=1, keepdim=True) - 1
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        spliced = self.prepare_multimodal_inputs(input_ids, images, attention_mask, labels)
        mask = spliced.attention_mask if attention_mask is not None or spliced.padded else None
        if mask is not None and attention_mask is not None:
            mask = mask.to(attention_mask.dtype)
        positions = spliced.position_ids if position_ids is not None else None
        return None, positions, mask, past_key_values, spliced.inputs_embeds, spliced.labels

    # -- forward / generate --------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        images: Any = None,
        image_sizes: Any = None,
        return_dict: bool | None = None,
        packed: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Causal-LM forward; with ``images``, the ``-200`` sentinels in ``input_ids`` are replaced by image features.

        Args:
            input_ids: ``[B, T]``, possibly with ``IMAGE_TOKEN_INDEX`` sentinels.
            attention_mask: ``[B, T]``.
            position_ids: ``[B, T]``; recomputed when images are spliced.
            inputs_embeds: ``[B, T, D]`` instead of ``input_ids``.
            labels: ``[B, T]``; image rows get ``IGNORE_INDEX``.
            images: Pixel values for the sentinels, in order.
            image_sizes: Accepted for LLaVA-1.6 callers; unused.
            packed: The rows hold several samples each (the packing collator's batches); ``position_ids`` is 0 where
                each starts. Positions restart per sample through the splice, and attention never crosses samples:
                the language model gets no attention mask, so transformers masks by the restarting positions
                (a document mask for sdpa/eager/flex; flash-attn's varlen kernel on one flattened row).
            past_key_values, use_cache, output_attentions, output_hidden_states, return_dict: transformers' (the
                original's positional order is kept); passed on when given.
            **kwargs: Passed to the LLaMA forward (``logits_to_keep`` ...).

        Returns:
            transformers' ``CausalLMOutputWithPast`` over the spliced sequence.
        """
        given = {_CACHE_ARG: past_key_values, "use_cache": use_cache, "output_attentions": output_attentions,
                 "output_hidden_states": output_hidden_states, "return_dict": return_dict}
        kwargs.update((key, value) for key, value in given.items() if value is not None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if images is not None and input_ids is not None and input_ids.shape[1] == 1 and cache is not None:
            # One decoding step with the images passed again (the original's generate loop): they are cached.
            _, position_ids, attention_mask, _, _, _ = self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, cache, None, images)
            images = None
        if inputs_embeds is None and images is None and input_ids is not None and input_ids.shape[1] > 1:
            # (Decoding steps feed one generated id: no check, no host sync on the hot path.)
            if bool((input_ids == IMAGE_TOKEN_INDEX).any()):
                raise ValueError("input_ids contain <image> sentinels (-200) but no images were given")
        if packed and (inputs_embeds is not None or position_ids is None):
            raise ValueError("a packed batch needs input_ids and the position_ids that mark where its samples start")
        probe = None
        if inputs_embeds is None and images is None and self.training and self.projector is not None \
                and torch.is_grad_enabled():
            # A text-only batch must run what an image batch runs, in the same order, or ranks whose batches differ
            # in kind stop matching each other's collectives: every projector parameter needs its (zero) gradient,
            # ZeRO-3 gathers the tower's weights for its forward, and ZeRO-2 reduces gradients in buckets in the
            # order they become ready, which follows the order of the forward (image features before the token
            # embeddings, packed or not). So one blank image goes through the tower and the projector first,
            # weighted by zero (the original gave every text-only sample such an image).
            probe = (self._blank_image_features() * 0.0).sum()  # weighted first: a float16 sum can overflow
        real_mask = attention_mask
        packed_positions = None
        if inputs_embeds is None and (images is not None or packed):
            spliced = self.prepare_multimodal_inputs(
                input_ids, images, attention_mask, labels, packed_position_ids=position_ids if packed else None
            )
            input_ids = None
            inputs_embeds = spliced.inputs_embeds
            real_mask = spliced.attention_mask
            attention_mask = spliced.attention_mask if spliced.padded and not spliced.packed else None
            position_ids = spliced.position_ids
            packed_positions = position_ids if spliced.packed else None
            labels = spliced.labels
        if probe is not None:
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
                input_ids = None
            inputs_embeds = inputs_embeds + probe
        if packed_positions is not None:
            # transformers derives the per-sample mask from the positions only when no cache is built.
            if cache is not None:
                raise ValueError("a packed batch cannot extend a KV cache")
            kwargs["use_cache"] = False
        rows = None
        if packed_positions is not None and self.config._attn_implementation == "flash_attention_2":
            # flash-attn finds the samples (varlen) from restarting positions only in a single row: flatten the rows,
            # whose first positions are each a sample's (or the padding's) start, so nothing crosses a row either.
            rows = inputs_embeds.shape[:2]
            inputs_embeds, position_ids = (inputs_embeds.reshape(1, -1, inputs_embeds.shape[-1]),
                                           position_ids.reshape(1, -1))
            labels = labels.reshape(1, -1) if labels is not None else None
        outputs = self.causal_lm_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )
        if isinstance(outputs, tuple):  # return_dict=False: transformers' tuple, as the original returned it
            if rows is not None:
                raise ValueError("return_dict=False is not supported for packed batches under flash_attention_2")
            return outputs
        if rows is not None:
            if outputs.logits is not None:
                outputs.logits = outputs.logits.view(*rows, -1)
            if outputs.get("token_losses") is not None:
                # Flattened, each row's last position predicted the next row's first, whose label is ignored (0).
                flat = outputs.token_losses.reshape(-1)
                outputs.token_losses = torch.cat([flat, flat.new_zeros(1)]).view(rows)[:, :-1]
            labels = labels.view(rows) if labels is not None else None
        if labels is not None:
            # What per-sample statistics in training need, aligned with ``logits`` (image rows included).
            if real_mask is None:
                real_mask = torch.ones(labels.shape, dtype=torch.long, device=labels.device)
            return PaloCausalLMOutput(
                **dict(outputs.items()),
                spliced_labels=labels,
                spliced_attention_mask=real_mask,
                spliced_position_ids=packed_positions,
            )
        return outputs

    def causal_lm_forward(self, **kwargs: Any) -> Any:
        """The language model and its head on the spliced inputs (LLaMA's forward; Liger's fused one when applied,
        see :mod:`palo.model.kernels`)."""
        return super().forward(**kwargs)

    def _projector_weight(self) -> torch.Tensor:
        # Through parameters(), not a module's .weight: under ZeRO-3 reading .weight gathers the whole tensor from
        # every rank, a collective that only the ranks reaching this line would join.
        return next(self.projector.parameters())

    def _blank_image_features(self) -> torch.Tensor:
        """One blank image through the vision tower and the projector: ``[1, n, hidden_size]``."""
        size = self.vision_tower.config.image_size
        return self.encode_images(self._projector_weight().new_zeros(1, 3, size, size))

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: Any = None,
        image_sizes: Any = None,
        attention_mask: torch.Tensor | None = None,
        stopping_criteria: StoppingCriteriaList | Sequence[StoppingCriteria] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate from prompts that may hold image sentinels.

        Args:
            inputs: Prompt ids ``[B, T]`` (also accepted as ``input_ids=``), left-padded when ``B > 1`` with
                ``attention_mask`` marking real tokens.
            images: Pixel values for all sentinels of all rows, in order (``[N, 3, H, W]`` or a list).
            image_sizes: Accepted for LLaVA-1.6 callers; unused.
            attention_mask: ``[B, T]``; None means no padding.
            stopping_criteria: Criteria written for ids-based generation; they are shown prompt + new ids.
            **kwargs: transformers generation arguments (``max_new_tokens``, ``do_sample``, ``temperature`` ...);
                ``max_length`` / ``min_length`` count the prompt's ids, an image one id, as the original's did.

        Returns:
            ``[B, T + n]``: the prompt ids followed by the generated ids (padded with the pad id where a row stopped
            early); ``[B * r, T + n]`` with ``num_return_sequences=r``, each prompt's answers in consecutive rows.
            With ``return_dict_in_generate=True``, transformers' output object whose ``sequences`` are those ids
            (its ``scores`` / ``logits`` cover the ``n`` new tokens, as for a plain decoder).
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        limit = getattr(self.config, "max_position_embeddings", None)
        if input_ids is None or images is None and not bool((input_ids == IMAGE_TOKEN_INDEX).any()):
            if input_ids is not None and limit:
                positions = (attention_mask.sum(1) if attention_mask is not None
                             else torch.full((input_ids.shape[0],), input_ids.shape[1]))
                _check_room(positions, limit)
                stopping_criteria = StoppingCriteriaList(
                    [*(stopping_criteria or []), _ContextLimit(positions, limit, input_ids.shape[1])])
            return super().generate(
                input_ids, attention_mask=attention_mask, stopping_criteria=stopping_criteria, **kwargs
            )
        kwargs = _lengths_as_new_tokens(kwargs, input_ids.shape[1])
        spliced = self.prepare_multimodal_inputs(input_ids, images, attention_mask, padding_side="left",
                                                 truncate=False)
        criteria = StoppingCriteriaList([_WithPrompt(c, input_ids) for c in (stopping_criteria or [])])
        if limit:
            positions = spliced.attention_mask.sum(1)
            _check_room(positions, limit)
            criteria.append(_ContextLimit(positions, limit, 0))
        out = super().generate(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            stopping_criteria=criteria,
            **kwargs,
        )
        # From embeddings, transformers returns only the new ids (as a tensor, or as the output object's sequences).
        new_ids = out if isinstance(out, torch.Tensor) else out.sequences
        # num_return_sequences: each prompt's answers are consecutive rows.
        prompts = input_ids.to(new_ids.device).repeat_interleave(new_ids.shape[0] // input_ids.shape[0], dim=0)
        ids = torch.cat([prompts, new_ids], dim=1)
        if isinstance(out, torch.Tensor):
            return ids
        out.sequences = ids
        return out


def _lengths_as_new_tokens(kwargs: dict[str, Any], prompt_ids: int) -> dict[str, Any]:
    """``max_length`` / ``min_length`` as the new tokens they leave, for generation from spliced embeddings.

    They count the prompt's ids, an image one id, as generation from ids counts them (the original's generate, and
    this one's without images); from embeddings transformers counts each image's feature positions instead (576 at
    CLIP-L/336), so ``max_length=512`` failed and larger values gave 575 tokens fewer. ``max_new_tokens`` /
    ``min_new_tokens``, when given, win, as in transformers.

    Raises:
        ValueError: When ``max_length`` leaves no room after the prompt's ids (as transformers says it for ids).
    """
    kwargs = dict(kwargs)
    max_length, min_length = kwargs.pop("max_length", None), kwargs.pop("min_length", None)
    if max_length is not None and kwargs.get("max_new_tokens") is None:
        if max_length <= prompt_ids:
            raise ValueError(f"Input length of input_ids is {prompt_ids}, but `max_length` is set to {max_length}: "
                             "no room for new tokens (set `max_new_tokens` instead)")
        kwargs["max_new_tokens"] = max_length - prompt_ids
    if min_length is not None and kwargs.get("min_new_tokens") is None and min_length > prompt_ids:
        kwargs["min_new_tokens"] = min_length - prompt_ids
    return kwargs


def _check_room(positions: torch.Tensor, limit: int) -> None:
    longest = int(positions.max())
    if longest >= limit:
        raise ValueError(f"the prompt takes {longest} of the model's {limit} context positions; no room is left for "
                         "an answer")


class LlavaLlamaForCausalLM(PaloForCausalLM):
    """The same model under LLaVA-1.5's ``model_type`` ``llava_llama``."""

    config_class = LlavaLlamaConfig
