"""lmms-eval runs PALO on a local task this test writes, in process (``--model palo``) and through a running server
(``--model palo_api``), and both give exactly ``model_vqa``'s answers.

The task (``--include_path``): four questions, three with images of different shapes and one text-only, an
exact-match metric against targets that are ``model_vqa``'s own answers for two questions and wrong for the
other two, so the score must come out 0.5. lmms-eval is an optional install (``bash scripts/install_lmms.sh``);
without it these tests skip.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image, ImageDraw

from palo.eval import model_vqa

if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed (bash scripts/install_lmms.sh installs it)", allow_module_level=True)
if not any(ep.name == "palo" for ep in importlib.metadata.entry_points(group="lmms_eval.models")):
    pytest.skip("palo's lmms_eval.models entry point is not registered (reinstall: pip install -e '.[lmms]')",
                allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve"))
from serve_helpers import REPO, Service, free_port, wait_until  # noqa: E402

TASK = "palo_tiny_vqa"
QUESTIONS = [  # (image name or None, question)
    ("wide.png", "What colour is the circle?"),
    ("tall.png", "ما لون المربع؟"),
    (None, "Name a colour."),
    ("square.png", "这是什么形状？"),
]
MAX_NEW_TOKENS = 6
NEVER = "<never-generated>"  # the task's stop string; the default "\n\n" could cut an answer model_vqa keeps


def _images(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    wide = Image.new("RGB", (84, 56), "white")
    ImageDraw.Draw(wide).ellipse((4, 8, 44, 48), fill="red")
    wide.save(os.path.join(folder, "wide.png"))
    tall = Image.new("RGB", (40, 70), "white")
    ImageDraw.Draw(tall).rectangle((8, 25, 32, 45), fill="blue")
    tall.save(os.path.join(folder, "tall.png"))
    square = Image.new("RGB", (56, 56), "white")
    ImageDraw.Draw(square).polygon([(28, 6), (50, 50), (6, 50)], fill="green")
    square.save(os.path.join(folder, "square.png"))


@pytest.fixture(scope="module")
def task(world, tmp_path_factory) -> dict:
    """model_vqa's answers, and an lmms-eval task over the same questions whose targets use two of them."""
    root = tmp_path_factory.mktemp("lmms")
    images = str(root / "images")
    _images(images)
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": q, **({"image": img} if img else {})},
                                            ensure_ascii=False) + "\n" for i, (img, q) in enumerate(QUESTIONS)),
                         encoding="utf-8")
    answers = root / "answers.jsonl"
    assert model_vqa.main([
        "--model-path", world.full_dir, "--image-folder", images, "--question-file", str(questions),
        "--answers-file", str(answers), "--conv-mode", "vicuna_v1", "--temperature", "0",
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu",
    ]) == 0
    expected = [json.loads(line)["text"] for line in answers.read_text(encoding="utf-8").splitlines()]
    assert len(expected) == 4 and any(expected)
    targets = [expected[0], "surely not this", expected[2], "nor this"]

    task_dir = root / "task"
    task_dir.mkdir()
    docs = task_dir / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "image": os.path.join(images, img) if img else "", "question": q,
                                        "answer": targets[i]}, ensure_ascii=False) + "\n"
                            for i, (img, q) in enumerate(QUESTIONS)), encoding="utf-8")
    (task_dir / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {docs}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          until: ["{NEVER}"]
          max_new_tokens: {MAX_NEW_TOKENS}
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          - version: 0.0
        """), encoding="utf-8")
    (task_dir / "utils.py").write_text(textwrap.dedent("""\
        from PIL import Image


        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")] if doc["image"] else []


        def doc_to_text(doc):
            return doc["question"]


        def process_results(doc, results):
            return {"exact_match": float(results[0].strip() == doc["answer"])}
        """), encoding="utf-8")
    return {"dir": str(task_dir), "expected": expected, "root": root}


def _run_lmms(task_name: str, include_dir: str, out: str, model: str, model_args: str,
              *extra: str) -> tuple[dict, dict]:
    """Run the lmms-eval CLI on a local task; return its metrics and each document's ``filtered_resps``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=os.path.join(out, "hf"),
               NO_PROXY="127.0.0.1,localhost", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args,
                             "--tasks", task_name, "--include_path", include_dir, "--output_path", out,
                             "--log_samples", *extra], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    # lmms-eval exits 0 even when the evaluation failed: no results file is the failure.
    results = glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True)
    assert result.returncode == 0 and len(results) == 1, (result.stdout[-3000:], result.stderr[-5000:])
    metrics = json.load(open(results[0], encoding="utf-8"))["results"][task_name]
    [samples_file] = glob.glob(os.path.join(out, "**", f"*samples_{task_name}.jsonl"), recursive=True)
    responses = {}
    for line in open(samples_file, encoding="utf-8"):
        sample = json.loads(line)
        responses[sample["doc_id"]] = sample["filtered_resps"]
    return metrics, responses


def _lmms_eval(task: dict, out: str, model: str, model_args: str, *extra: str) -> dict:
    """The generation task through lmms-eval: its metrics and the answers in document order."""
    metrics, responses = _run_lmms(TASK, task["dir"], out, model, model_args, *extra)
    # A string in 0.7.3, a one-element list in older versions.
    answers = [r if isinstance(r, str) else r[0] for r in (responses[i] for i in range(len(QUESTIONS)))]
    return {"metrics": metrics, "responses": answers}


def _exact_match(metrics: dict) -> float:
    return next(v for k, v in metrics.items() if k.startswith("exact_match") and "stderr" not in k)


@pytest.mark.slow  # one lmms-eval process (~20 s)
def test_in_process_model_gives_model_vqa_answers(world, task, tmp_path):
    run = _lmms_eval(task, str(tmp_path / "out"), "palo", f"pretrained={world.full_dir},device=cpu",
                     "--batch_size", "2")
    assert run["responses"] == task["expected"]
    assert _exact_match(run["metrics"]) == 0.5


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("lmms_serve"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PALO_LOGDIR=logdir,
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cport, wport = free_port(), free_port()
    curl = f"http://127.0.0.1:{cport}"
    services = [
        Service("controller", [sys.executable, "-m", "palo.serve.controller", "--host", "127.0.0.1", "--port",
                               str(cport), "--api-key", "lmms-key"], os.path.join(logdir, "controller.out"), env,
                url=curl),
        Service("worker", [sys.executable, "-m", "palo.serve.model_worker", "--host", "127.0.0.1", "--controller",
                           curl, "--port", str(wport), "--worker", f"http://127.0.0.1:{wport}", "--model-path",
                           world.full_dir, "--model-name", "tiny", "--device", "cpu", "--heart-beat-interval", "0.5"],
                os.path.join(logdir, "worker.out"), env, url=f"http://127.0.0.1:{wport}"),
    ]
    import httpx

    try:
        for service in services:
            service.start()

        def ready() -> bool:
            for service in services:
                if not service.alive():
                    raise RuntimeError(f"{service.name} exited early:\n{service.log()[-3000:]}")
            return httpx.post(curl + "/worker_get_status", timeout=2).json()["speed"] == 1

        wait_until(ready, 120, "the controller and the worker")
        yield curl + "/v1"
    finally:
        for service in reversed(services):
            service.kill()


@pytest.mark.slow  # a controller, a worker and one lmms-eval process (~30 s)
def test_server_model_gives_model_vqa_answers(task, server, tmp_path):
    run = _lmms_eval(task, str(tmp_path / "out"), "palo_api",
                     f"base_url={server},model=tiny,api_key=lmms-key,num_concurrent=4")
    assert run["responses"] == task["expected"]
    assert _exact_match(run["metrics"]) == 0.5


def test_server_model_refuses_a_model_the_server_does_not_serve(server):
    from palo.eval.lmms.api import PaloAPI

    with pytest.raises(RuntimeError, match="does not serve 'other'"):
        PaloAPI(base_url=server, model="other", api_key="lmms-key")
    with pytest.raises(RuntimeError, match="answered 401"):
        PaloAPI(base_url=server, model="tiny", api_key="wrong")
    with pytest.raises(ValueError, match="unknown model_args colour"):
        PaloAPI(base_url=server, model="tiny", api_key="lmms-key", colour="red")


MC_TASK = "palo_tiny_mc"
MC_DOCS = [  # (image names, question, options)
    (["wide.png"], "What colour is the circle?", ["red", "blue", "green"]),
    (["tall.png"], "ما لون المربع؟", ["أزرق", "أحمر"]),
    ([], "Name a colour.", ["yellow", "purple", "white", "black"]),
    (["wide.png", "tall.png"], "Which picture is wider?", ["the first", "the second"]),
]


def _direct_scores(world, images: str) -> list[list[tuple[float, bool]]]:
    """Each option's (mean loss, is_greedy) computed here with the scoring function and model_vqa's prompt."""
    from palo.eval.lmms.scoring import score_continuation
    from palo.mm_utils import preprocess_image, tokenizer_image_token
    from palo.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cpu")
    out = []
    for names, question, options in MC_DOCS:
        prompt = model_vqa.build_prompt(question, "vicuna_v1", len(names), False)
        pixels = None
        if names:
            pixels = torch.stack([preprocess_image(Image.open(os.path.join(images, n)).convert("RGB"), processor, "pad")
                                  for n in names])
        context = tokenizer_image_token(prompt, tokenizer)
        scores = []
        for option in options:
            s = score_continuation(model.eval(), context, tokenizer_image_token(prompt + " " + option, tokenizer),
                                   pixels)
            scores.append((s.mean_nll, s.is_greedy))
        out.append(scores)
    return out


@pytest.fixture(scope="module")
def mc_expected(world, task) -> list[list[tuple[float, bool]]]:
    return _direct_scores(world, str(task["root"] / "images"))


@pytest.mark.slow  # one lmms-eval process (~20 s; with palo_api a controller and a worker as well)
@pytest.mark.parametrize("through", ["palo", "palo engine=hf", "palo_api"])
def test_models_score_multiple_choice_options(world, task, mc_expected, tmp_path, through, request):
    """A multiple_choice task (one loglikelihood request per option): lmms-eval receives the per-token losses this
    project computes, in process or through a running server (the option as the assistant's answer, scored by
    the server), and its accuracy is the share of documents whose gold option has the lowest loss."""
    images = str(task["root"] / "images")
    expected = mc_expected
    best = [min(range(len(s)), key=lambda i: s[i][0]) for s in expected]
    gold = [best[0], (best[1] + 1) % 2, best[2], best[3]]  # three right, one wrong: accuracy 3/4
    task_dir = tmp_path / "mc"
    task_dir.mkdir()
    docs = task_dir / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "images": [os.path.join(images, n) for n in names], "question": q,
                                        "options": options, "gold": gold[i]}, ensure_ascii=False) + "\n"
                            for i, (names, q, options) in enumerate(MC_DOCS)), encoding="utf-8")
    (task_dir / f"{MC_TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {MC_TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {docs}
        test_split: test
        output_type: multiple_choice
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_choice: !function utils.doc_to_choice
        doc_to_target: gold
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        metadata:
          - version: 0.0
        """), encoding="utf-8")
    (task_dir / "utils.py").write_text(textwrap.dedent("""\
        from PIL import Image


        def doc_to_visual(doc):
            return [Image.open(path).convert("RGB") for path in doc["images"]]


        def doc_to_text(doc):
            return doc["question"]


        def doc_to_choice(doc):
            return doc["options"]
        """), encoding="utf-8")
    model, _, engine = through.partition(" ")  # in process: the paged engine scores them together, or one
    model_args = (f"pretrained={world.full_dir},device=cpu,{engine}".rstrip(",") if model == "palo" else  # by one
                  f"base_url={request.getfixturevalue('server')},model=tiny,api_key=lmms-key,num_concurrent=4")
    metrics, got = _run_lmms(MC_TASK, str(task_dir), str(tmp_path / "out"), model, model_args)
    acc = next(v for k, v in metrics.items() if k.startswith("acc") and "stderr" not in k and "norm" not in k)
    assert acc == pytest.approx(3 / 4)
    # got: one [loss, is_greedy] per option and document, logged as strings
    for doc_id, scores in enumerate(expected):
        assert [float(r[0]) for r in got[doc_id]] == [pytest.approx(loss, abs=1e-4) for loss, _ in scores]
        assert [str(r[1]) for r in got[doc_id]] == [str(g) for _, g in scores]


class _Request:
    def __init__(self, *args):
        self.args = args


def test_in_process_model_names_the_document_whose_prompt_leaves_no_room(world):
    """A document whose question fills the model's positions is refused naming task, split and document (not the
    question's place in a batch), before anything is generated."""
    from palo.eval.lmms.model import PaloLMM

    model = PaloLMM(pretrained=world.full_dir, device="cpu", batch_size=2)
    docs = [{"q": "Name a colour."}, {"q": "colour " * 600}]
    model.task_dict = {"t": {"test": docs}}
    requests = [_Request(doc["q"], {"max_new_tokens": 2, "until": [NEVER]}, lambda doc: [], i, "t", "test")
                for i, doc in enumerate(docs)]
    with pytest.raises(ValueError, match=r"^t/test/1: the prompt takes \d+ of the model's \d+ positions"):
        model.generate_until(requests)
    assert len(model.generate_until(requests[:1])) == 1


@pytest.mark.parametrize("engine", ["paged", "hf"])
def test_scoring_a_document_past_the_positions_is_refused_naming_it_on_both_engines(world, engine):
    """engine=hf returned a score computed past the model's positions; the engine refused the whole batch without
    naming the document."""
    from palo.eval.lmms.model import PaloLMM

    model = PaloLMM(pretrained=world.full_dir, device="cpu", engine=engine)
    docs = [{"q": "Name a colour."}, {"q": "colour " * 600}]
    model.task_dict = {"t": {"test": docs}}
    requests = [_Request(doc["q"], " red", lambda doc: [], i, "t", "test") for i, doc in enumerate(docs)]
    with pytest.raises(ValueError, match=r"^t/test/1: the question and its option take \d+ of the model's \d+ "):
        model.loglikelihood(requests)
    assert len(model.loglikelihood(requests[:1])) == 1


@pytest.mark.parametrize("arg, refused", [
    ("conv_mode=bogus", "conv_mode='bogus' is not a template"),
    ("image_preprocess=Pad", "image_preprocess='Pad' must be 'pad' or 'crop'"),  # it ran as the centre crop
])
def test_a_mistyped_template_or_preprocessing_is_refused_before_loading(tmp_path, arg, refused):
    from palo.eval.lmms.model import PaloLMM

    with pytest.raises(ValueError, match=refused):  # a missing checkpoint: refused before anything loads
        PaloLMM.create_from_arg_string(f"pretrained={tmp_path / 'none'},device=cpu,{arg}")
