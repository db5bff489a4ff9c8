"""The chat CLI's context budget: an image takes ``image_token_count`` positions, its sentinel none of its own.

``palo.serve.cli.main`` runs in this process with the real loader, whose model's positions
(``max_position_embeddings``, the CLI's limit as every generating path's) are shrunk so that the first turn fits
exactly (or by one token): any miscount of the spliced prompt turns one case into the other.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from palo.conversation import conv_templates
from palo.mm_utils import tokenizer_image_token
from palo.model import builder
from palo.serve import cli

QUESTION = "What is in the image?"


@pytest.fixture
def image_file(tmp_path) -> str:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), "red").save(path)
    return str(path)


@pytest.fixture(scope="module")
def first_turn_positions(world) -> int:
    """Context positions of the CLI's first prompt, counted by hand: text ids without the sentinel, plus the image."""
    tokenizer, model, _, _ = builder.load_pretrained_model(world.full_dir, device="cpu")
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + QUESTION)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer)
    return len(ids) - 1 + model.image_token_count


def _chat(world, image_file, monkeypatch, capsys, positions: int | None = None,
          context_len: int = 2048) -> tuple[int, str, list]:
    """Run one CLI turn with the model's config saying ``positions`` (None: as it is) and the loader reporting
    ``context_len``; (exit status, stdout, tower calls)."""
    real = builder.load_pretrained_model
    tower_calls: list = []

    def shrunk(*args, **kwargs):
        tokenizer, model, processor, _ = real(*args, **kwargs)
        model.get_vision_tower().register_forward_hook(lambda *a: tower_calls.append(1))
        if positions is not None:
            model.config.max_position_embeddings = positions
        return tokenizer, model, processor, context_len

    monkeypatch.setattr(builder, "load_pretrained_model", shrunk)
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION + "\n\n"))
    capsys.readouterr()
    rc = cli.main(["--model-path", world.full_dir, "--image-file", image_file, "--device", "cpu",
                   "--temperature", "0", "--max-new-tokens", "5"])
    return rc, capsys.readouterr().out, tower_calls


def test_a_prompt_that_fills_the_context_is_refused_with_its_true_length(world, image_file, monkeypatch, capsys,
                                                                         first_turn_positions):
    rc, out, tower_calls = _chat(world, image_file, monkeypatch, capsys, positions=first_turn_positions)
    assert f"[the conversation is {first_turn_positions} tokens, over the model's {first_turn_positions};" in out
    assert "this turn was not sent" in out and rc == 0  # the chat went on (to the empty line that ends it)
    # The image's size came from the config: the tower never ran for a turn that was refused.
    assert tower_calls == []


def test_a_loader_context_past_the_models_positions_is_held_to_the_models(world, image_file, monkeypatch, capsys):
    """A conversation longer than the model's positions but within the loader's context length (2048 unless the
    config says otherwise) is refused like any other, not a traceback from the engine."""
    _, model, _, _ = builder.load_pretrained_model(world.full_dir, device="cpu")
    positions = model.config.max_position_embeddings
    turns = iter(["word " * positions, ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    rc, out, tower_calls = _chat(world, image_file, monkeypatch, capsys, context_len=positions + 10_000)
    assert rc == 0 and f"tokens, over the model's {positions}; this turn was not sent" in out and tower_calls == []


def test_one_free_position_gives_a_one_token_answer(world, image_file, monkeypatch, capsys, first_turn_positions):
    rc, out, tower_calls = _chat(world, image_file, monkeypatch, capsys, positions=first_turn_positions + 1)
    assert rc == 0, out
    assert "the conversation is" not in out and out.rstrip().endswith("exit...")
    assert len(tower_calls) == 1  # the engine encoded the image once, to answer


def test_the_cache_holds_one_conversation_and_serves_every_turn(world, image_file, monkeypatch, capsys):
    """On a GPU the engine's default cache is a share of the device's memory; the chat CLI holds one conversation,
    so it asks for one full-context sequence (plus the scratch block) and still answers turn after turn."""
    from palo import engine as engine_package

    configs = []

    class Recording(engine_package.LLMEngine):
        def __init__(self, model, tokenizer, config):
            configs.append(config)
            super().__init__(model, tokenizer, config)

    monkeypatch.setattr(engine_package, "LLMEngine", Recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is in the image?\nWhat color is it?\nAnd the shape?\n\n"))
    rc = cli.main(["--model-path", world.full_dir, "--image-file", image_file, "--device", "cpu",
                   "--temperature", "0", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("ASSISTANT: ") == 3 and out.rstrip().endswith("exit...")
    (config,) = configs
    _, model, _, _ = builder.load_pretrained_model(world.full_dir, device="cpu")
    context_len = model.config.max_position_embeddings  # the model's own positions
    assert config.max_num_seqs == 1 and config.max_model_len == context_len
    assert config.num_blocks == -(-context_len // config.block_size) + 1
