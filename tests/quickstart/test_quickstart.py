"""A shortened ``palo quickstart`` end to end (tiny preset, one step, no serving), then its served check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from palo import cli
from palo.conversation import conv_templates
from palo.data.languages import LANGUAGES
from palo.eval.bench import display_name
from palo.model.builder import load_pretrained_model
from palo.quickstart.exact_match import COLUMNS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("quickstart"))
    assert cli.main(["quickstart", "--workdir", workdir, "--no-serve", "--preset", "tiny", "--steps", "1"]) == 0
    return workdir


def test_short_quickstart_writes_loadable_checkpoint_and_table(workdir, capsys):
    checkpoint = os.path.join(workdir, "checkpoints", "palo-quickstart")
    assert os.path.isfile(os.path.join(workdir, "checkpoints", "stage1-projector", "mm_projector.bin"))
    tokenizer, model, processor, _ = load_pretrained_model(checkpoint, None, "palo-quickstart", device="cpu")
    assert processor is not None and model.config.mm_projector_type == "mlp2x_gelu"
    assert model.get_vision_tower().config.image_size == 84
    # The tokenizer learned the v1 prompt's words: its system message is a few dozen pieces, not 80 byte-ish ones.
    system = conv_templates["vicuna_v1"].system
    assert len(tokenizer(system).input_ids) < 40 and tokenizer.tokenize("USER:")[0] == "▁USER"
    state = json.load(open(os.path.join(checkpoint, "trainer_state.json")))
    assert state["global_step"] == 1

    prefix = os.path.join(workdir, "eval", "quickstart_summary")
    table = open(prefix + ".md", encoding="utf-8").read()
    assert "| language | " + " | ".join(COLUMNS) + " | failed |" in table
    for language in LANGUAGES:
        assert f"| {display_name(language)} |" in table
    assert "| Overall avg |" in table and os.path.getsize(prefix + ".png") > 1000
    scores = json.load(open(prefix + ".json", encoding="utf-8"))
    assert all(row["all_n"] == 6 and row["failed"] == 0 for row in scores["languages"].values())


def test_rerun_skips_finished_stages(workdir, capsys):
    assert cli.main(["quickstart", "--workdir", workdir, "--no-serve", "--preset", "tiny", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("[skip]") >= 5 and "vision tower already pre-trained" in out and "| Overall avg |" in out
    # Other settings on the same workdir: refused before any stage, not the earlier run's table under a new banner.
    before = sorted(os.listdir(workdir))
    assert cli.main(["quickstart", "--workdir", workdir, "--no-serve", "--preset", "tiny", "--steps", "7"]) == 2
    assert "holds a quickstart run with other settings (steps)" in capsys.readouterr().err
    assert cli.main(["quickstart", "--workdir", workdir, "--no-serve"]) == 2  # the default preset
    assert "other settings" in capsys.readouterr().err and sorted(os.listdir(workdir)) == before
    # A workdir from before settings were recorded: its stage-2 run's own flags say how many steps it took.
    record = os.path.join(workdir, "quickstart-config.json")
    saved = open(record, encoding="utf-8").read()
    os.remove(record)
    try:
        assert cli.main(["quickstart", "--workdir", workdir, "--no-serve", "--preset", "tiny", "--steps", "7"]) == 2
        assert "holds a quickstart run of 1 stage-2 steps, not 7" in capsys.readouterr().err
    finally:
        with open(record, "w", encoding="utf-8") as f:
            f.write(saved)


def test_bad_arguments(tmp_path, capsys):
    assert cli.main(["serv"]) == 2 and "unknown command 'serv'" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert cli.main(["quickstart", "--workdir", str(a_file), "--no-serve"]) == 2
    assert "is not a writable folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quickstart", "--no-serve", "--check-served"])
    assert exit_info.value.code == 2
    assert cli.main(["quickstart", "--steps", "0", "--no-serve"]) == 2
    for port in ("70000", "-5"):
        assert cli.main(["quickstart", "--workdir", str(tmp_path / "w"), "--port", port]) == 2
        assert "--port must be from 0 to 65535" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_check_served_asks_every_question_through_the_openai_api(workdir, capsys):
    assert cli.main(["quickstart", "--workdir", workdir, "--check-served", "--preset", "tiny", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "palo-quickstart (served)" in out and "| Overall avg |" in out
    scores = json.load(open(os.path.join(workdir, "eval", "served_summary.json"), encoding="utf-8"))
    assert all(row["all_n"] == 6 and row["failed"] == 0 for row in scores["languages"].values())
    # Same checkpoint, prompt and greedy decoding as the offline model_vqa run, so the same answers. Batches (of
    # other sizes and rows when served) change a row's logits only in their last bits, which can change a greedy
    # token only at a near-tie of the two best candidates: any answer that differs must part from the request's
    # lone greedy answer exactly at such a step (README, "Use").
    texts, differing = set(), []
    for language in LANGUAGES:
        offline = {r["question_id"]: r["text"] for r in _rows(workdir, "answers", language)}
        served = {r["question_id"]: r["text"] for r in _rows(workdir, "served_answers", language)}
        assert served.keys() == offline.keys()
        differing += [(language, q, offline[q], served[q]) for q in offline if served[q] != offline[q]]
        texts |= set(offline.values())
    # One step leaves the tiny model near its random start: answers are long, varied garbage, not a shared "".
    assert len(texts) > 5 and all(texts)
    if differing:
        _assert_only_near_ties(workdir, differing)


def _assert_only_near_ties(workdir: str, differing: list[tuple[str, int, str, str]]) -> None:
    from palo.eval import model_vqa
    from palo.eval.bench import language_files
    from palo.mm_utils import tokenizer_image_token
    from palo.testing.greedy import divergence_is_a_near_tie, greedy_trace

    tokenizer, model, processor, _ = load_pretrained_model(os.path.join(workdir, "checkpoints", "palo-quickstart"),
                                                           device="cpu")
    bench = os.path.join(workdir, "data", "bench")
    for language, qid, offline, served in differing:
        files = language_files(bench, language)
        question = next(q for q in map(json.loads, open(files.questions, encoding="utf-8")) if q["question_id"] == qid)
        prompt = model_vqa.build_prompt(question["text"], "vicuna_v1", True, False)
        ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
        pixels = model_vqa.preprocess_image(os.path.join(files.images, question["image"]), processor, "pad")[None]
        alone = greedy_trace(model, ids, pixels, max_new_tokens=16, pad_token_id=0)
        for answer in (offline, served):
            assert divergence_is_a_near_tie(alone, answer, tokenizer), (
                f"{language} question {qid}: {answer!r} departs from the lone greedy answer "
                f"{tokenizer.decode(alone.tokens, skip_special_tokens=True)!r} where the model is not at a near-tie "
                f"(offline {offline!r}, served {served!r})")


def _rows(workdir: str, folder: str, language: str) -> list[dict]:
    path = os.path.join(workdir, "eval", folder, f"{display_name(language)}.jsonl")
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_staged_folder_never_leaves_a_half_written_stage(tmp_path):
    from palo.quickstart.pipeline import staged_folder

    final = str(tmp_path / "data")
    with pytest.raises(RuntimeError):
        with staged_folder(final) as staging:
            open(os.path.join(staging, "stage1.json"), "w").close()
            raise RuntimeError("killed while drawing")
    assert not os.path.exists(final)  # so the next run does not mistake it for finished data
    with staged_folder(final) as staging:
        assert os.listdir(staging) == []  # the crashed attempt's files are gone
        open(os.path.join(staging, "stage2.json"), "w").close()
    assert os.listdir(final) == ["stage2.json"] and not os.path.exists(final + ".partial")


def test_refused_requests_are_counted_as_failed_not_lost(tmp_path, capsys):
    """An API that answers every request with an error: every question is reported and scored as failed."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from palo.quickstart import exact_match, shapes_task
    from palo.quickstart.serve import ask_served

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"error": {"message": "model not found", "type": "invalid_request_error"}}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bench = shapes_task.write_bench(str(tmp_path / "bench"), 1, 84, seed=0)
        answers = str(tmp_path / "answers")
        assert ask_served(f"http://127.0.0.1:{server.server_port}/v1", "m", bench, answers) == 30
    finally:
        server.shutdown()
    assert capsys.readouterr().err.count("no answer") == 30
    table = exact_match.build_table(bench, answers, "m")
    assert all(row["failed"] == 3 and row["all"] is None for row in table["languages"].values())


def test_a_second_ctrl_c_while_stopping_still_stops_every_service(tmp_path):
    """Ctrl-C is often pressed twice; the second one used to interrupt the shutdown with a traceback and leave the
    services running. Run in a child process: a SIGINT in the test process would end the whole session."""
    script = tmp_path / "stop.py"
    script.write_text(textwrap.dedent('''
        import os, signal, subprocess, sys, threading
        # As in a terminal: a test run started in the background inherits SIGINT ignored, and Python then keeps it so.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from palo.quickstart.serve import Services
        slow = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.5), sys.exit(0))); " \\
               "print('up', flush=True); time.sleep(60)"
        proc = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.PIPE)
        proc.stdout.readline()  # its SIGTERM handler is installed
        services = Services("http://c", "http://w", "m", [proc])
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            services.stop()
        finally:
            print("service exited:", proc.poll() is not None, flush=True)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again afterwards
    '''))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr
    assert "service exited: True" in result.stdout


def test_a_workdir_another_quickstart_runs_in_is_refused_in_one_line(tmp_path, capsys):
    """Two runs in one workdir replaced each other's stage folders while the other loaded them (tracebacks). A lock
    is held per open descriptor, so one taken here stands for another process's."""
    from palo.jsonl import lock_folder

    other_run = lock_folder(str(tmp_path / "w"))
    try:
        assert cli.main(["quickstart", "--workdir", str(tmp_path / "w"), "--no-serve", "--preset", "tiny"]) == 2
    finally:
        os.close(other_run)
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'w'}: another quickstart is running in it; wait "
                                               "for it to finish, or choose another --workdir")
    assert os.listdir(tmp_path / "w") == []


def test_a_stage_that_fails_is_one_line_saying_how_to_go_on(tmp_path, monkeypatch, capsys):
    """model_vqa's own error line was followed by a RuntimeError traceback."""
    from types import SimpleNamespace

    from palo.eval import model_vqa
    from palo.quickstart import pipeline

    bench = tmp_path / "bench" / "english"
    bench.mkdir(parents=True)
    for name in ("questions.jsonl", "answers.jsonl", "context.jsonl"):
        (bench / name).write_text("")
    monkeypatch.setattr(model_vqa, "answer_file", lambda *args, **kwargs: 2)
    stopped = r"^answering the English questions failed \(model_vqa exit status 2\)$"
    with pytest.raises(pipeline.StageFailed, match=stopped):
        pipeline.evaluate(pipeline.Paths(str(tmp_path)), pipeline.QuickstartConfig.tiny(),
                          SimpleNamespace(bench=str(tmp_path / "bench")))

    def failed(workdir, config):
        raise pipeline.StageFailed("answering the Hindi questions failed (model_vqa exit status 2)")

    monkeypatch.setattr(pipeline, "run", failed)
    assert cli.main(["quickstart", "--workdir", str(tmp_path / "w"), "--no-serve"]) == 1
    assert capsys.readouterr().err.strip() == ("error: answering the Hindi questions failed (model_vqa exit status 2); "
                                               "run the same command again to go on (finished stages are kept)")


def test_ctrl_c_says_how_to_go_on_instead_of_a_traceback(tmp_path, monkeypatch, capsys):
    from palo.quickstart import pipeline

    def interrupted(workdir, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    assert cli.main(["quickstart", "--workdir", str(tmp_path / "w"), "--no-serve"]) == 130
    assert "interrupted: run the same command again to go on" in capsys.readouterr().err
