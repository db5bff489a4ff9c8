"""The exported GGUF files run in llama.cpp itself (through llama-cpp-python's bindings to libllama and libmtmd).

Skipped where llama-cpp-python is not installed (``bash scripts/install_llama_cpp.sh`` builds it from source for this
machine, about 5 minutes on 2 cores; CI does). What it shows, on the tiny models in float32:

* llama.cpp tokenizes text in the 10 languages to PALO's ids, and its logits equal PALO's;
* its image embeddings (vision tower + projector, ``mlp`` and MobilePALO's ``ldp``) equal what its LLaVA graph
  computes from PALO's weights. That graph is PALO's computation except for one known llama.cpp defect
  (ggml-org/llama.cpp#25814: since a refactor it appends CLIP's class position after the patches instead of before
  them, shifting the position embeddings by one and passing the class output on as the last image token): the
  reference is PALO's own tower with the class position wherever the installed llama.cpp puts it, and the test
  says which;
* a chat completion through llama.cpp's multimodal path with the file's own chat template evaluates PALO's prompt:
  the same text tokens around the image and as many image positions as PALO's projector makes.
"""

from __future__ import annotations

import base64
import ctypes
import io
import warnings

import gguf
import numpy as np
import pytest
import torch
from PIL import Image

from palo.constants import IMAGE_TOKEN_INDEX
from palo.conversation import conv_templates
from palo.export.gguf import export_gguf
from palo.mm_utils import process_images, tokenizer_image_token
from palo.model.builder import load_pretrained_model
from palo.testing import tiny

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                "(bash scripts/install_llama_cpp.sh builds it)")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")

TEXTS = [
    "What is in this picture? Describe it.",
    "这张图片里有什么？",
    "ما الذي يظهر في هذه الصورة؟",
    "इस चित्र में क्या है?",
    "এই ছবিতে কী আছে?",
    "اس تصویر میں کیا ہے؟",
    "この画像には何がありますか？",
    "Что на изображении?",
    "¿Qué hay en la imagen?",
    "Qu'y a-t-il sur l'image ?  Two  spaces,\nand a new line.",
]


_OPEN: list = []


def _llama(path: str, **kwargs) -> llama_cpp.Llama:
    llm = llama_cpp.Llama(path, n_ctx=2048, n_threads=2, verbose=False, **kwargs)
    _OPEN.append(llm)
    return llm


@pytest.fixture(autouse=True)
def _close_models():
    """Each test's llama.cpp models are freed when it ends (not by the garbage collector at interpreter exit)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def _image(size: int, seed: int) -> Image.Image:
    """Noise at the tower's own size: llama.cpp and PALO both leave such an image's pixels as they are."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _llama_cpp_image_embeddings(llm: llama_cpp.Llama, mmproj: str, image: Image.Image) -> np.ndarray:
    """``[n, D]``: libmtmd's embeddings of one image (the rows it feeds the LLM)."""
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, 2, False
    ctx = mtmd.mtmd_init_from_file(mmproj.encode(), llm.model, params)
    assert ctx, f"libmtmd did not load {mmproj}"
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes()
    bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        images = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        images = [c for c in images if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        assert len(images) == 1
        assert mtmd.mtmd_encode_chunk(ctx, images[0]) == 0
        rows, width = mtmd.mtmd_input_chunk_get_n_tokens(images[0]), llama_cpp.llama_model_n_embd(llm.model)
        return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(rows * width,)).reshape(rows, width).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)


@torch.no_grad()
def _palo_image_embeddings(model, pixels: torch.Tensor, class_last: bool) -> np.ndarray:
    """PALO's tower and projector, with CLIP's class position first (PALO) or last (llama.cpp#25814), and the rows
    after the first passed on, as llama.cpp's LLaVA graph does."""
    tower = model.get_vision_tower()
    vision = tower.vision_tower.vision_model
    embeddings = vision.embeddings
    patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (1, n, D)
    cls = embeddings.class_embedding[None, None]
    tokens = torch.cat([patches, cls] if class_last else [cls, patches], dim=1) + embeddings.position_embedding.weight
    hidden = vision.pre_layrnorm(tokens)
    for layer in vision.encoder.layers[: tower.features.select_layer % (len(vision.encoder.layers) + 1)]:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.get_model().mm_projector(hidden[:, 1:])[0].numpy()


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    return export_gguf(world.full_dir, str(tmp_path_factory.mktemp("gguf-f32")), outtype="f32", name="tiny")


@pytest.fixture(scope="module")
def palo(world):
    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cpu", device_map=None)
    return tokenizer, model, processor


def test_llama_cpp_tokenizes_and_scores_text_as_palo(palo, exported):
    tokenizer, model, _ = palo
    llm = _llama(exported.model_file, logits_all=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer(text).input_ids, text
    ids = tokenizer(" ".join(TEXTS[:5])).input_ids
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].float().numpy()
    assert np.abs(theirs - ours).max() < 1e-3 * np.abs(ours).max()
    # The same question asked by a different path differs by far more: the tolerance is not what makes this pass.
    assert np.abs(theirs[1:] - ours[:-1]).max() > 0.1 * np.abs(ours).max()


def _check_image_embeddings(model, processor, model_file: str, mmproj: str, tolerance: float = 5e-3) -> None:
    size = model.get_vision_tower().config.image_size
    llm = _llama(model_file)
    layouts = []
    for seed in (0, 1):
        image = _image(size, seed)
        pixels = process_images([image], processor, model.config)
        palo_rows = _palo_image_embeddings(model, pixels, class_last=False)
        with torch.no_grad():  # the reference is PALO's own encoder where the class position is first
            assert np.allclose(palo_rows, model.encode_images(pixels)[0].numpy(), atol=1e-6)
        theirs = _llama_cpp_image_embeddings(llm, mmproj, image)
        assert theirs.shape == palo_rows.shape
        scale = np.abs(palo_rows).max()
        errors = {last: np.abs(theirs - _palo_image_embeddings(model, pixels, class_last=last)).max() / scale
                  for last in (False, True)}
        # llama.cpp's depthwise convolution (LDP) unfolds the image into float16 columns: errors up to ~1.2e-3 of the
        # largest feature; the other layout is off by ~1 (hundreds of times more).
        matched = [last for last, error in errors.items() if error < tolerance]
        assert matched, f"llama.cpp's image embeddings match neither class-position layout: {errors}"
        layouts.append(matched[0])
    assert len(set(layouts)) == 1
    if layouts[0]:
        warnings.warn("the installed llama.cpp puts CLIP's class position after the patches "
                      "(ggml-org/llama.cpp#25814); its image embeddings are PALO's under that layout", stacklevel=2)


def test_llama_cpp_image_embeddings_are_palos_mlp(palo, exported):
    _, model, processor = palo
    _check_image_embeddings(model, processor, exported.model_file, exported.mmproj_file)


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_16_bit_mmproj_runs_in_llama_cpp(world, palo, tmp_path, outtype):
    """The default f16 export (and bf16): ggml takes each storage the export writes for the tower's convolution and
    matrices, within the storage's rounding (f16 ~6e-4 of the largest feature, bf16 ~4e-3)."""
    _, model, processor = palo
    written = export_gguf(world.full_dir, str(tmp_path / outtype), outtype=outtype)
    _check_image_embeddings(model, processor, written.model_file, written.mmproj_file,
                            tolerance=2e-2 if outtype == "bf16" else 5e-3)


def test_llama_cpp_image_embeddings_are_palos_ldp(world, tmp_path):
    """MobilePALO's LDP projector on a CLIP at 336 pixels (the 24 x 24 grid llama.cpp's LDP graph assumes)."""
    clip_dir = tiny.save_tiny_clip(str(tmp_path / "clip336"), tiny.TinyShapes(image_size=336))
    config = tiny.palo_config_dict(tiny.tiny_llama_config(world.config["vocab_size"]), clip_dir,
                                   projector_type="ldpnet")
    checkpoint = tiny.write_full_checkpoint(str(tmp_path / "ldp"), tiny.build_palo_model(config, clip_dir, seed=4),
                                            config, world.tokenizer_dir)
    written = export_gguf(checkpoint, str(tmp_path / "out"), outtype="f32")
    _, model, processor, _ = load_pretrained_model(checkpoint, device="cpu", device_map=None)
    _check_image_embeddings(model, processor, written.model_file, written.mmproj_file)


def test_chat_completion_evaluates_palos_prompt(palo, exported):
    """llama-cpp-python's LLaVA chat handler, given the file's chat template, builds PALO's prompt: its text chunks
    are PALO's ids around the image, the image takes as many positions as PALO's projector makes, and it answers."""
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    tokenizer, model, processor = palo
    template = _chat_template(exported.model_file)

    class PaloHandler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = template

    question = TEXTS[2]
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX)
    image_rows = model.encode_images(process_images([_image(56, 0)], processor, model.config)).shape[1]

    handler = PaloHandler(clip_model_path=exported.mmproj_file, verbose=False)
    handler._mtmd_cpp = recorder = _TokenizeRecorder(handler._mtmd_cpp)  # the prompt text it hands to libmtmd
    llm = _llama(exported.model_file, chat_handler=handler)
    buffer = io.BytesIO()
    _image(56, 0).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    result = llm.create_chat_completion(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": question}]}],
        temperature=0, max_tokens=4, repeat_penalty=1.0)
    assert recorder.texts == [conv.get_prompt().replace("<image>", mtmd.mtmd_default_marker().decode())]
    assert result["usage"]["prompt_tokens"] == len(ids) - 1 + image_rows
    assert result["usage"]["completion_tokens"] >= 1
    before, after = ids[: ids.index(IMAGE_TOKEN_INDEX)], ids[ids.index(IMAGE_TOKEN_INDEX) + 1:]
    assert _mtmd_text_chunks(handler, recorder.texts[0]) == [before, after]


class _TokenizeRecorder:
    """libmtmd's bindings, recording the text of each ``mtmd_tokenize`` call."""

    def __init__(self, module) -> None:
        self._module, self.texts = module, []

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def mtmd_tokenize(self, ctx, chunks, text, bitmaps, n):
        self.texts.append(text._obj.text.decode())  # text is ctypes.byref(mtmd_input_text)
        return self._module.mtmd_tokenize(ctx, chunks, text, bitmaps, n)


def _chat_template(path: str) -> str:
    return gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()


def _mtmd_text_chunks(handler, prompt: str) -> list[list[int]]:
    """The token ids of each text chunk libmtmd makes of ``prompt`` (with one image)."""
    rgb = np.zeros((56, 56, 3), dtype=np.uint8).tobytes()
    bitmap = mtmd.mtmd_bitmap_init(56, 56, (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        text = mtmd.mtmd_input_text()
        encoded = prompt.encode()
        text.text, text.text_len, text.add_special, text.parse_special = encoded, len(encoded), True, True
        assert mtmd.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(text),
                                  (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        out = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                out.append([pointer[j] for j in range(n.value)])
        return out
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)


def test_q8_0_file_runs_close_to_palo(world, palo, tmp_path):
    tokenizer, model, _ = palo
    written = export_gguf(world.full_dir, str(tmp_path / "q8"), outtype="q8_0")
    llm = _llama(written.model_file, logits_all=True)
    ids = tokenizer(TEXTS[0]).input_ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].float().numpy()
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()
