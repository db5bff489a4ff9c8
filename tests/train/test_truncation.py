"""Samples longer than ``--model_max_length``: the loss is the mean over the answer tokens the model trains on.

The Trainer divides the summed token losses by the labelled tokens it counts in the batch (``num_items_in_batch``),
while the model only sees the first ``--model_max_length`` positions of each spliced sample. Both must count the same
tokens, so an over-long sample's cut-off answer cannot dilute the loss (and the gradient) of its batch.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from palo.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from palo.model.multimodal import spliced_length
from palo.testing import tiny_data
from palo.train.preprocess import BadSampleError
from palo.train.train import train

ANSWER = "The shape in the picture is a red square on a white ground. "


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> str:
    """Six English samples: over-long image and text-only ones (past 128 positions) and short ones."""
    root = str(tmp_path_factory.mktemp("long"))
    os.makedirs(os.path.join(root, "images"))
    samples = []
    for i, (image, repeats) in enumerate([(True, 12), (False, 12), (True, 1), (False, 1), (True, 9), (True, 2)]):
        turns = [{"from": "human", "value": ("<image>\n" if image else "") + "What is in the picture?"},
                 {"from": "gpt", "value": ANSWER * repeats}]
        sample = {"id": f"s{i}", "conversations": turns}
        if image:
            tiny_data.draw_shape("red", seed=i).save(os.path.join(root, "images", f"{i}.png"))
            sample["image"] = f"{i}.png"
        samples.append(sample)
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return path


def _flags(world, data: str, out: str, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", world.base_dir, "--version", "v1", "--data_path", data,
        "--image_folder", os.path.join(os.path.dirname(data), "images"), "--vision_tower", world.clip_dir,
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--image_aspect_ratio", "pad",
        "--output_dir", out, "--per_device_train_batch_size", "6", "--max_steps", "1", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--model_max_length", "128", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "True", "--seed", "7", "--dataloader_num_workers", "0", *extra,
    ]


@pytest.mark.parametrize("packing", ["False", "True"])
def test_the_logged_loss_is_the_mean_over_the_answer_tokens_trained_on(world, long_data, tmp_path, packing):
    trainer = train(_flags(world, long_data, str(tmp_path / "out"), "--packing", packing))
    dataset = trainer.train_dataset
    assert max(spliced_length(dataset[i]["input_ids"], dataset.image_tokens) for i in range(len(dataset))) <= 128
    (entry,) = [e for e in trainer.state.log_history if "loss" in e]
    # Every sample is English: the overall loss is English's (logged to 4 decimals).
    assert entry["loss"] == pytest.approx(entry["loss_english"], abs=2e-4)


def _dataset(world, data: str, max_length: int):
    from palo.model.tokenizer import load_tokenizer
    from palo.model.vision_tower import load_image_processor
    from palo.train.dataset import LazySupervisedDataset

    return LazySupervisedDataset(data, load_tokenizer(world.tokenizer_dir), "vicuna_v1",
                                 image_folder=os.path.join(os.path.dirname(data), "images"),
                                 image_processor=load_image_processor(world.clip_dir, 56), image_aspect_ratio="pad",
                                 model_max_length=max_length, image_tokens=world.model.image_token_count)


@pytest.mark.parametrize("fault", ["over_length", "bad"])
def test_a_run_of_skipped_samples_is_counted_once_and_spread_over_other_samples(world, tmp_path, fault):
    """Four skipped neighbours: each gave its place to the next sample (which so trained 5 times an epoch) and was
    counted on every try (10 an epoch, 4 in the file); in a file sorted by length with an over-length tail, one
    sample filled most of the epoch."""
    from palo.model.tokenizer import load_tokenizer
    from palo.train.dataset import LazySupervisedDataset

    answers = [f"Answer number {word}." for word in ("one two three four five six seven eight nine ten eleven "
                                                     "twelve").split()]
    samples = [{"id": f"s{i}", "conversations": [{"from": "human", "value": "Count?"},
                                                 {"from": "gpt", "value": answer}]} for i, answer in enumerate(answers)]
    for i in range(3, 7):  # over --model_max_length, or with an empty answer
        samples[i]["conversations"][1]["value"] = ANSWER * 12 if fault == "over_length" else ""
    (tmp_path / "train.json").write_text(json.dumps(samples))

    def dataset():
        return LazySupervisedDataset(str(tmp_path / "train.json"), load_tokenizer(world.tokenizer_dir), "vicuna_v1",
                                     model_max_length=128, over_length="skip", skip_bad_samples=fault == "bad")

    data = dataset()
    epochs = [[tuple(data[i]["input_ids"].tolist()) for i in range(len(data))] for _ in range(2)]
    counter = data.over_length_skipped if fault == "over_length" else data.bad_samples
    assert counter.value == 4  # each skipped sample once, over both epochs
    assert epochs[0] == epochs[1]
    drawn = [epochs[0].count(ids) for ids in set(epochs[0])]
    assert len(drawn) == 8 and sorted(drawn) == [1] * 4 + [2] * 4  # 4 places, 4 different samples
    again = dataset()  # a resumed run draws the same samples
    assert [tuple(again[i]["input_ids"].tolist()) for i in range(len(again))] == epochs[0]


def test_an_over_long_sample_is_cut_where_the_model_would_cut_it(world, long_data):
    dataset, full = _dataset(world, long_data, 128), _dataset(world, long_data, 4096)
    cut_samples = 0
    for i in range(len(dataset)):
        cut, whole = dataset[i], full[i]
        n = len(cut["input_ids"])
        # A prefix of the whole sample, as long as fits: the next token would start at position 128 or later.
        assert torch.equal(cut["input_ids"], whole["input_ids"][:n]) and torch.equal(cut["labels"], whole["labels"][:n])
        if n < len(whole["input_ids"]):
            cut_samples += 1
            assert spliced_length(cut["input_ids"], dataset.image_tokens) == 128
        assert (cut["labels"] != IGNORE_INDEX).any()
        assert int((cut["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == ("image" in cut)
    assert cut_samples == 4  # all but the two one-sentence answers (this tokenizer takes many pieces a word)


def test_an_image_whose_placeholder_is_cut_off_is_not_loaded(world, tmp_path):
    """A sample whose <image> comes after --model_max_length keeps the text before it, text-only: its image was
    still loaded, so its batch had one image more than placeholders (ImagePlaceholderMismatch beside a text-only
    sample, another sample's image spliced in beside an image one)."""
    from palo.train.dataset import DataCollator

    os.makedirs(tmp_path / "images")
    tiny_data.draw_shape("red", seed=0).save(tmp_path / "images" / "0.png")
    late = {"id": "late-image", "image": "0.png", "conversations": [
        {"from": "human", "value": "Describe a red square."}, {"from": "gpt", "value": ANSWER * 4},
        {"from": "human", "value": "<image>\nIs this one red?"}, {"from": "gpt", "value": "Yes."}]}
    text = {"id": "text", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]}
    (tmp_path / "train.json").write_text(json.dumps([late, text]))
    dataset = _dataset(world, str(tmp_path / "train.json"), 128)
    cut = dataset[0]
    assert len(cut["input_ids"]) == 128 and (cut["labels"] != IGNORE_INDEX).any()  # cut in the first answer
    assert "image" not in cut and not (cut["input_ids"] == IMAGE_TOKEN_INDEX).any()
    batch = DataCollator(pad_token_id=0)([cut, dataset[1]])
    batch.pop("languages")
    with torch.no_grad():
        assert torch.isfinite(world.model(**batch).loss)


@pytest.mark.parametrize("index", [0, 1], ids=["image", "text-only"])
def test_truncation_keeps_at_least_one_answer_token_or_refuses_the_sample(world, long_data, index):
    """A cut that ends right before the first answer token (spliced, image rows counted) leaves nothing to train on:
    the sample is refused, not trained on zero tokens; one position more keeps exactly that answer token."""
    with open(long_data) as f:
        sample = json.load(f)[index]
    ids, labels = _dataset(world, long_data, 4096).tokenize(sample)
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    first_spliced = spliced_length(ids[:first], world.model.image_token_count)
    assert first_spliced < spliced_length(ids, world.model.image_token_count) - 1  # a sample longer than both cuts
    with pytest.raises(BadSampleError, match="no answer token is left"):
        _dataset(world, long_data, first_spliced).tokenize(sample)
    _, kept = _dataset(world, long_data, first_spliced + 1).tokenize(sample)
    assert int((kept != IGNORE_INDEX).sum()) == 1 and len(kept) == first + 1
