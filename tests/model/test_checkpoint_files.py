"""``palo.model.checkpoint_files``: the stage-1 and LoRA side files, their key names, and resuming from them.

The expected key names are written out literally (the original's layouts, docs/formats.md §1.6), never derived from
the module under test, so a change of layout fails here even though every writer and reader shares the module.
"""

from __future__ import annotations

import os

import pytest
import torch

from palo.model import checkpoint_files as cf
from palo.testing import tiny

# The original's names for the mlp2x_gelu projector (Linear, GELU, Linear).
PROJECTOR_KEYS = ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                  "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
NON_LORA_KEYS = ["base_model.model." + k for k in PROJECTOR_KEYS]


def _raw(path: str) -> dict[str, torch.Tensor]:
    """A file as plain torch reads it: what any other tool (the original loader, LLaVA) sees."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _projector(world) -> dict[str, torch.Tensor]:
    return {k: v for k, v in world.model.state_dict().items() if k in PROJECTOR_KEYS}


# -- key names ---------------------------------------------------------------------------------------------------
def test_peft_prefix_added_and_stripped():
    t = torch.zeros(1)
    bare = {"model.mm_projector.0.weight": t, "lm_head.weight": t}
    wrapped = cf.peft_keys(bare, wrapped=True)
    assert sorted(wrapped) == ["base_model.model.lm_head.weight", "base_model.model.model.mm_projector.0.weight"]
    assert cf.peft_keys(wrapped, wrapped=True).keys() == wrapped.keys()  # already wrapped: unchanged
    assert cf.peft_keys(wrapped, wrapped=False).keys() == bare.keys()
    assert cf.peft_keys(bare, wrapped=False).keys() == bare.keys()  # already bare: unchanged


def test_stripping_accepts_both_historical_non_lora_forms():
    t = torch.zeros(1)
    # The original loader's rule: drop "base_model.", then one "model." if any key starts with "model.model.".
    assert list(cf.peft_keys({"base_model.model.model.mm_projector.0.weight": t}, wrapped=False)) == [
        "model.mm_projector.0.weight"]
    assert list(cf.peft_keys({"base_model.model.mm_projector.0.weight": t}, wrapped=False)) == [
        "model.mm_projector.0.weight"]


def test_key_check_names_missing_and_unexpected_keys_and_what_to_do():
    cf.check_keys(["a", "b"], ["b", "a"], "f.bin", "do this")  # equal sets pass
    with pytest.raises(cf.CheckpointError) as err:
        cf.check_keys(["a", "b"], ["b", "c"], "f.bin", "resume with the flags of that run")
    message = str(err.value)
    assert "f.bin" in message and "1 missing ['a']" in message and "1 unexpected ['c']" in message
    assert "resume with the flags of that run" in message
    with pytest.raises(cf.CheckpointError, match=r"20 missing .* and 12 more"):
        cf.check_keys([f"k{i:02d}" for i in range(20)], [], "f.bin", "")


# -- mm_projector.bin --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projector_file_round_trip_in_the_original_layout(world, tmp_path, dtype):
    state = {k: v.to(dtype) for k, v in world.model.state_dict().items()}
    path = cf.save_projector(str(tmp_path), state)
    assert path == str(tmp_path / "mm_projector.bin")
    raw = _raw(path)
    assert sorted(raw) == PROJECTOR_KEYS  # nothing of the LLM or the tower
    for key in PROJECTOR_KEYS:
        assert raw[key].dtype == dtype and torch.equal(raw[key], state[key])
    loaded = cf.load_projector(str(tmp_path))  # the folder or the file
    assert loaded.keys() == raw.keys() and all(torch.equal(loaded[k], raw[k]) for k in raw)
    half = cf.load_projector(path, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values())
    assert sorted(cf.projector_weights(loaded, path)) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_projector_file_from_a_peft_model_has_the_bare_names(world, tmp_path):
    wrapped = {"base_model.model." + k: v for k, v in world.model.state_dict().items()}
    assert sorted(_raw(cf.save_projector(str(tmp_path), wrapped))) == PROJECTOR_KEYS


def test_projector_file_is_a_copy_not_a_view(world, tmp_path):
    # torch.save would write a view's whole storage; the file must hold the projector tensors alone.
    big = torch.arange(20.0)
    cf.save_projector(str(tmp_path), {"model.mm_projector.0.bias": big[:2]})
    assert _raw(str(tmp_path / "mm_projector.bin"))["model.mm_projector.0.bias"].untyped_storage().size() == 8


def test_loading_into_a_projector_of_other_shapes_says_what_fits(world, tmp_path):
    ldp = tiny.build_palo_model(world.ldp_config, world.clip_dir)
    cf.save_projector(str(tmp_path), ldp.state_dict())
    with pytest.raises(cf.CheckpointError, match="(?s)does not fit the projector 'mlp2x_gelu'.*same mm_projector_type"):
        cf.load_into_projector(world.model.projector, cf.load_projector(str(tmp_path)), "x",
                               "the projector 'mlp2x_gelu'")
    with pytest.raises(cf.CheckpointError, match="holds no mm_projector weights"):
        cf.projector_weights({"lm_head.weight": torch.zeros(1)}, "x.bin")
    with pytest.raises(cf.CheckpointError, match="does not exist: pass a stage-1 output"):
        cf.load_projector(str(tmp_path / "nothing"))


# -- non_lora_trainables.bin -------------------------------------------------------------------------------------
def test_non_lora_file_round_trip_in_the_original_layout(world, tmp_path):
    projector = _projector(world)
    path = cf.save_non_lora(str(tmp_path), projector)  # bare names in, PEFT names on disk
    assert path == str(tmp_path / "non_lora_trainables.bin")
    raw = _raw(path)
    assert sorted(raw) == NON_LORA_KEYS
    assert all(torch.equal(raw["base_model.model." + k], v) for k, v in projector.items())
    bare = cf.load_non_lora(str(tmp_path), wrapped=False)
    assert bare.keys() == projector.keys() and all(torch.equal(bare[k], projector[k]) for k in projector)
    assert sorted(cf.load_non_lora(str(tmp_path), wrapped=True)) == NON_LORA_KEYS
    cf.save_non_lora(str(tmp_path), raw)  # PEFT names in: written unchanged, not prefixed twice
    assert sorted(_raw(path)) == NON_LORA_KEYS


def test_non_lora_holds_the_trainable_tensors_without_lora():
    t = torch.zeros(1)
    state = {"base_model.model.model.mm_projector.0.weight": t, "base_model.model.lm_head.weight": t,
             "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": t}
    trainable = {"base_model.model.model.mm_projector.0.weight",
                 "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"}
    assert list(cf.non_lora_state(state, trainable)) == ["base_model.model.model.mm_projector.0.weight"]


def test_lora_folder_without_non_lora_file_says_where_it_comes_from(tmp_path):
    with pytest.raises(cf.CheckpointError, match="without non_lora_trainables.bin: copy it from the training run"):
        cf.load_non_lora(str(tmp_path), wrapped=False)
    with pytest.raises(cf.CheckpointError, match="no LoRA adapter"):
        cf.load_adapter(str(tmp_path))


def test_tiny_fixtures_have_the_original_layout(world):
    assert sorted(_raw(os.path.join(world.projector_dir, "mm_projector.bin"))) == PROJECTOR_KEYS
    assert sorted(_raw(os.path.join(world.lora_dir, "non_lora_trainables.bin"))) == NON_LORA_KEYS
    assert cf.detect_checkpoint_kind(world.projector_dir) is cf.CheckpointKind.PROJECTOR
    assert cf.detect_checkpoint_kind(world.lora_dir) is cf.CheckpointKind.LORA


# -- crash safety ------------------------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp_file(world, tmp_path, monkeypatch):
    cf.save_projector(str(tmp_path), world.model.state_dict())
    before = (tmp_path / "mm_projector.bin").read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a pickle")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    changed = {k: v + 1 for k, v in world.model.state_dict().items()}
    with pytest.raises(OSError, match="disk full"):
        cf.save_projector(str(tmp_path), changed)
    with pytest.raises(OSError, match="disk full"):
        cf.save_non_lora(str(tmp_path), _projector(world))
    assert (tmp_path / "mm_projector.bin").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["mm_projector.bin"]


# -- the trainer's save and resume -------------------------------------------------------------------------------
def _peft_model(world, targets=("q_proj", "v_proj"), train_projector=True):
    from peft import LoraConfig, get_peft_model

    model = tiny.build_palo_model(world.config, world.clip_dir, seed=3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM",
                        exclude_modules=r".*(mm_projector|vision_tower).*")
    peft_model = get_peft_model(model, config)
    peft_model.base_model.model.get_model().mm_projector.requires_grad_(train_projector)
    return peft_model


def _trainer(model, out: str, stage1: bool = False):
    from palo.train.arguments import TrainingArguments
    from palo.train.trainer import PaloTrainer

    args = TrainingArguments(output_dir=out, report_to=[], use_cpu=True)
    return PaloTrainer(model=model, args=args, stage1=stage1)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_lora_save_and_resume_restore_every_trained_tensor(world, tmp_path):
    saved_model = _peft_model(world)
    _randomise(saved_model, seed=1)
    folder = str(tmp_path / "checkpoint-1")
    _trainer(saved_model, str(tmp_path))._save(folder)
    assert sorted(_raw(os.path.join(folder, "non_lora_trainables.bin"))) == NON_LORA_KEYS
    assert {"adapter_model.bin", "adapter_config.json", "config.json"} <= set(os.listdir(folder))

    resumed = _peft_model(world)
    _randomise(resumed, seed=2)
    _trainer(resumed, str(tmp_path))._load_from_checkpoint(folder)
    expected, got = _trainable(saved_model), _trainable(resumed)
    assert expected.keys() == got.keys() and any("mm_projector" in k for k in got)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_trainer_resume_with_other_lora_targets_names_the_keys(world, tmp_path):
    folder = str(tmp_path / "checkpoint-1")
    _trainer(_peft_model(world, targets=("q_proj",)), str(tmp_path))._save(folder)
    with pytest.raises(cf.CheckpointError) as err:
        _trainer(_peft_model(world, targets=("q_proj", "v_proj")), str(tmp_path))._load_from_checkpoint(folder)
    message = str(err.value)
    assert "adapter_model" in message and "missing" in message and "v_proj.lora_A.weight" in message
    assert "resume with the flags of that run" in message


def test_trainer_resume_of_a_run_that_froze_the_projector_names_the_keys(world, tmp_path):
    # The checkpoint trained only LoRA (--freeze_mm_mlp_adapter); the resumed run also trains the projector.
    folder = str(tmp_path / "checkpoint-1")
    _trainer(_peft_model(world, train_projector=False), str(tmp_path))._save(folder)
    assert _raw(os.path.join(folder, "non_lora_trainables.bin")) == {}
    with pytest.raises(cf.CheckpointError, match=r"non_lora_trainables.bin does not match this model: 4 missing "
                                                 r"\['base_model.model.model.mm_projector.0.bias'"):
        _trainer(_peft_model(world), str(tmp_path))._load_from_checkpoint(folder)


def test_trainer_stage1_save_and_resume(world, tmp_path):
    saved_model = tiny.build_palo_model(world.config, world.clip_dir, seed=4)
    folder = str(tmp_path / "checkpoint-1")
    _trainer(saved_model, str(tmp_path), stage1=True)._save(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "mm_projector.bin"]
    assert sorted(_raw(os.path.join(folder, "mm_projector.bin"))) == PROJECTOR_KEYS

    resumed = tiny.build_palo_model(world.config, world.clip_dir, seed=5)
    _trainer(resumed, str(tmp_path), stage1=True)._load_from_checkpoint(folder)
    for key, value in saved_model.projector.state_dict().items():
        assert torch.equal(resumed.projector.state_dict()[key], value), key

    other = tiny.build_palo_model(world.ldp_config, world.clip_dir)
    with pytest.raises(cf.CheckpointError, match=r"mm_projector.bin does not match this model: \d+ missing "
                                                 r"\['model.mm_projector.model"):
        _trainer(other, str(tmp_path), stage1=True)._load_from_checkpoint(folder)


# -- <im_start>/<im_end> rows (mm_use_im_start_end) --------------------------------------------------------------
def test_with_start_end_tokens_the_projector_file_also_holds_the_input_embeddings(world, tmp_path):
    state = world.model.state_dict()
    raw = _raw(cf.save_projector(str(tmp_path), state, embeddings=True))
    assert sorted(raw) == sorted(PROJECTOR_KEYS + ["model.embed_tokens.weight"])
    assert torch.equal(raw["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_new_token_rows_follow_the_original_rule():
    full = torch.arange(12.0).view(6, 2)
    assert torch.equal(cf.new_token_rows({"model.embed_tokens.weight": full}, 2, 6, "f"), full[-2:])
    assert torch.equal(cf.new_token_rows({"model.embed_tokens.weight": full[:2]}, 2, 6, "f"), full[:2])
    with pytest.raises(cf.CheckpointError, match="has 6 rows, expected 7 .* or 2"):
        cf.new_token_rows({"model.embed_tokens.weight": full}, 2, 7, "f")
    with pytest.raises(cf.CheckpointError, match="no model.embed_tokens.weight.*--mm_use_im_start_end"):
        cf.new_token_rows({"model.mm_projector.0.weight": full}, 2, 6, "f")


def test_trainer_stage1_with_start_end_tokens_saves_and_resumes_the_embeddings(world, tmp_path):
    saved_model = tiny.build_palo_model(world.config, world.clip_dir, seed=6)
    saved_model.config.mm_use_im_start_end = True
    folder = str(tmp_path / "checkpoint-1")
    _trainer(saved_model, str(tmp_path), stage1=True)._save(folder)
    assert (sorted(_raw(os.path.join(folder, "mm_projector.bin")))
            == sorted(PROJECTOR_KEYS + ["model.embed_tokens.weight"]))

    resumed = tiny.build_palo_model(world.config, world.clip_dir, seed=7)
    resumed.config.mm_use_im_start_end = True
    _trainer(resumed, str(tmp_path), stage1=True)._load_from_checkpoint(folder)
    assert torch.equal(resumed.get_input_embeddings().weight, saved_model.get_input_embeddings().weight)
    assert torch.equal(resumed.projector.state_dict()["0.weight"], saved_model.projector.state_dict()["0.weight"])


def test_fine_tuning_from_a_stage1_file_takes_its_start_end_rows(world, tmp_path):
    from palo.model.tokenizer import load_tokenizer
    from palo.train.arguments import ModelArguments
    from palo.train.model_setup import _add_vision_tokens

    stage1 = tiny.build_palo_model(world.config, world.clip_dir, seed=8)
    rows = stage1.get_input_embeddings().weight.shape[0]
    tokens = torch.randn(rows + 3, stage1.config.hidden_size)  # + <im_patch>, <im_start>, <im_end>
    cf.save_projector(str(tmp_path), {**stage1.state_dict(), "model.embed_tokens.weight": tokens}, embeddings=True)
    model = tiny.build_palo_model(world.config, world.clip_dir, seed=9)
    args = ModelArguments(mm_use_im_start_end=True, pretrain_mm_mlp_adapter=str(tmp_path / "mm_projector.bin"))
    _add_vision_tokens(model, load_tokenizer(world.tokenizer_dir), args)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == rows + 3 and torch.equal(weight[-2:], tokens[-2:])
