"""Pre-training the quickstart's small CLIP-shaped vision tower, the stand-in for OpenAI's pretrained CLIP.

Real PALO starts from a CLIP ViT-L/14-336 that already encodes colours, shapes and counts, and keeps it frozen.
A randomly initialised tower keeps that information only weakly: with one frozen in the quickstart, 1500 stage-2
steps left shape and count questions at chance. So, before stage 1, the tower is trained on the *training* images
(never the held-out bench) so that every patch token of ``mm_vision_select_layer`` (the features the projector
actually sees) describes the whole image: its colour, shape and count, the way CLIP's penultimate-layer tokens carry
global content. A throw-away probe (a per-token MLP and one linear head per attribute, applied to each token on its
own) is trained with it and then dropped; only the tower is saved, in the hub-style folder stage 1 and 2 load.
Supervising each token rather than a pooled vector matters for counting: with a pooled probe the count stayed
spread over the shapes' tokens and the LLM learned it slowly (73 % after 1500 stage-2 steps, against 99 % for shape).
Gathering the count into every token needs two attention layers below the selected one, hence the quickstart's
3-layer tower read at layer -2.

The last tenth of the training images is held out from this step and its per-token probe accuracy is reported, so
a tower that did not learn is visible before any LLM training starts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from palo.quickstart import shapes_task

ATTRIBUTES = ("colour", "shape", "count")
DONE_FILE = "pretraining.json"  # the summary, saved with the trained tower


@dataclass(frozen=True)
class TowerPretraining:
    """Schedule of the tower pre-training.

    Attributes:
        steps: Optimiser steps.
        batch_size: Images per step.
        lr: Peak AdamW learning rate (linear warm-up over 5% of the steps, then cosine decay).
        max_images: At most this many training images are used (their pixels are held in memory).
        select_layer: The ``mm_vision_select_layer`` whose patch tokens the probe reads.
        seed: Seed for the probe's initialisation and the batch order.
    """

    # 3-layer tower, held-out per-token accuracy: colour 100 %, shape 98.5 %, count 98 % (about 1 min)
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    max_images: int = 4000
    select_layer: int = -2
    seed: int = 0


def labels(spec: shapes_task.ImageSpec) -> list[int]:
    """Class indices of an image's colour, shape and count (in :data:`ATTRIBUTES` order)."""
    return [list(shapes_task.COLOURS).index(spec.colour), shapes_task.SHAPES.index(spec.shape),
            shapes_task.COUNTS.index(spec.count)]


class AttributeProbe(nn.Module):
    """Per-token MLP, then one linear head per attribute, on every token separately.

    Args:
        hidden: Width of the tower's features.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.token_mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.heads = nn.ModuleList(
            [nn.Linear(hidden, len(shapes_task.COLOURS)), nn.Linear(hidden, len(shapes_task.SHAPES)),
             nn.Linear(hidden, len(shapes_task.COUNTS))]
        )

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        """``features`` ``(batch, tokens, hidden)`` -> one ``(batch, tokens, classes)`` logit tensor per attribute."""
        hidden = self.token_mlp(features)
        return [head(hidden) for head in self.heads]


def probe_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the cross-entropy of every token against its image's label.

    Args:
        logits: Per attribute, ``(batch, tokens, classes)``.
        targets: ``(batch, attributes)`` class indices.
    """
    return sum(
        nn.functional.cross_entropy(lg.flatten(0, 1), targets[:, k].repeat_interleave(lg.shape[1]))
        for k, lg in enumerate(logits)
    )


def _load_pixels(processor, folder: str, specs: list[shapes_task.ImageSpec], chunk: int = 256) -> torch.Tensor:
    """Every image through the tower's own processor, as training and inference will see it."""
    out = []
    for start in range(0, len(specs), chunk):
        images = [Image.open(os.path.join(folder, s.name)).convert("RGB") for s in specs[start:start + chunk]]
        out.append(processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(out)


@torch.no_grad()
def probe_accuracy(tower: nn.Module, probe: AttributeProbe, pixels: torch.Tensor,
                   targets: torch.Tensor) -> dict[str, float]:
    """Fraction of (image, token) pairs whose colour / shape / count the probe gets right from that token alone."""
    tower.eval()
    probe.eval()
    correct = torch.zeros(len(ATTRIBUTES))
    for start in range(0, len(pixels), 256):
        logits = probe(tower(pixels[start:start + 256]))
        for k, head_logits in enumerate(logits):
            correct[k] += (head_logits.argmax(-1) == targets[start:start + 256, k, None]).float().mean(-1).sum()
    return {name: float(correct[k]) / len(pixels) for k, name in enumerate(ATTRIBUTES)}


def pretrain_tower(clip_dir: str, out_dir: str, image_folder: str, specs: list[shapes_task.ImageSpec],
                   schedule: TowerPretraining = TowerPretraining(), progress: bool = True) -> dict:
    """Train the tower in ``clip_dir`` on the attributes of ``specs``' images and save it to ``out_dir``.

    The tower is the model's own :class:`~palo.model.vision_tower.CLIPVisionTower`, so the probe reads exactly
    the features the projector will (and the unread last layer is not even run).

    Args:
        clip_dir: Hub-style CLIP vision folder (``config.json``, weights, ``preprocessor_config.json``).
        out_dir: Where the trained tower goes, in the same layout, with ``pretraining.json`` (the returned summary).
        image_folder: Where the images named by ``specs`` are.
        specs: Drawing parameters of the training images (the labels).
        schedule: Steps, batch, learning rate and the layer read.
        progress: Show a progress bar.

    Returns:
        The schedule and the held-out probe accuracy before and after.
    """
    from tqdm.auto import tqdm
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from palo.model.vision_tower import CLIPVisionTower, VisionFeatureSpec, load_image_processor

    if len(specs) < 10:
        raise ValueError(f"tower pre-training needs at least 10 images, got {len(specs)}")
    config = CLIPVisionConfig.from_pretrained(clip_dir)
    tower = CLIPVisionTower(clip_dir, config, VisionFeatureSpec(schedule.select_layer))
    tower.load_weights_from(clip_dir)
    tower.requires_grad_(True)  # the model's tower is frozen; here it is what trains
    processor = load_image_processor(clip_dir, config.image_size)  # the processor training and inference use
    specs = specs[: schedule.max_images]
    held = max(1, len(specs) // 10)
    pixels = _load_pixels(processor, image_folder, specs)
    targets = torch.tensor([labels(s) for s in specs])
    train_x, train_y, held_x, held_y = pixels[:-held], targets[:-held], pixels[-held:], targets[-held:]

    torch.manual_seed(schedule.seed)
    probe = AttributeProbe(config.hidden_size)
    before = probe_accuracy(tower, probe, held_x, held_y)
    optimizer = torch.optim.AdamW([*tower.parameters(), *probe.parameters()], lr=schedule.lr, weight_decay=0.0)
    warmup = max(1, schedule.steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, schedule.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(schedule.seed)
    tower.train()
    probe.train()
    bar = tqdm(range(schedule.steps), desc="vision tower", disable=not progress)
    for step in bar:
        index = torch.randint(0, len(train_x), (schedule.batch_size,), generator=generator)
        loss = probe_loss(probe(tower(train_x[index])), train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    after = probe_accuracy(tower, probe, held_x, held_y)

    summary = {"schedule": schedule.__dict__, "train_images": len(train_x), "held_out_images": held,
               "held_out_accuracy_before": before, "held_out_accuracy_after": after}
    model = CLIPVisionModel(config)
    getattr(model, "vision_model", model).load_state_dict(tower.vision_tower.vision_model.state_dict())
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, DONE_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary
