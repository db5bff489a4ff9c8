"""``mm_vision_select_layer`` indexes CLIP's ``hidden_states`` (the embedding output and one entry per layer)."""

from __future__ import annotations

import pytest
import torch

from palo.model.vision_tower import CLIPVisionTower, VisionFeatureSpec, VisionTowerError
from palo.testing import tiny


@pytest.fixture(scope="module")
def clip_config():
    return tiny.tiny_clip_config()


def test_every_index_of_hidden_states_selects_that_hidden_state(clip_config):
    layers = clip_config.num_hidden_layers
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, clip_config.image_size, clip_config.image_size)
    for select_layer in (-(layers + 1), -2, 0, layers):  # both ends of the range, PALO's -2, the embeddings
        tower = CLIPVisionTower("clip", clip_config, VisionFeatureSpec(select_layer=select_layer)).eval()
        with torch.no_grad():
            expected = tower.vision_tower.vision_model(pixel_values=pixels, output_hidden_states=True)
            features = tower(pixels)
        torch.testing.assert_close(features, expected.hidden_states[select_layer][:, 1:])


def test_a_select_layer_outside_hidden_states_is_refused_naming_it(clip_config):
    """A value past either end wrapped round (select_layer % (layers + 1)) to another layer with no error: on
    CLIP-L, 25 silently fed the raw patch embeddings and -26 the last layer. The original's hidden_states[25]
    fails."""
    layers = clip_config.num_hidden_layers
    for select_layer in (layers + 1, -(layers + 2), 25):
        with pytest.raises(ValueError, match=f"mm_vision_select_layer={select_layer} .*from {-(layers + 1)} to "
                                             f"{layers}") as refused:
            CLIPVisionTower("clip", clip_config, VisionFeatureSpec(select_layer=select_layer))
        # A VisionTowerError too, which training reports in one line (it was a traceback after the LLM loaded).
        assert isinstance(refused.value, VisionTowerError)
