"""``palo <verb>``: the one command line forwards to each tool's ``main``, lazily, and ``palo`` alone is the quickstart.

The mains are monkeypatched (no model is built); subprocesses only ask for ``--help``.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import types

import pytest

from palo import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_HEAVY = "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\nassert not heavy, heavy\n"


def _python(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, *(["-c", code] if code else []), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


class Recorder:
    """Stands in for a module's ``main``: records the argv it got and ``sys.argv`` at the time."""

    def __init__(self, takes_argv: bool = True, result: int | None = 0):
        self.calls: list[tuple[list[str] | None, list[str]]] = []
        self.result = result
        self.takes_argv = takes_argv

    def fake(self):
        if self.takes_argv:
            def main(argv=None):
                self.calls.append((argv, list(sys.argv)))
                return self.result
        else:
            def main():
                self.calls.append((None, list(sys.argv)))
                return self.result
        return main


@pytest.fixture
def fake_main(monkeypatch):
    """``fake_main(module)`` replaces ``module.main`` (imported here, as the verb would) with a recorder."""

    def install(module: str, **kwargs) -> Recorder:
        recorder = Recorder(**kwargs)
        monkeypatch.setattr(importlib.import_module(module), "main", recorder.fake())
        return recorder

    return install


ALL_VERBS = [
    (["quickstart"], "palo.quickstart.cli", "palo quickstart"),
    (["chat"], "palo.serve.cli", "palo chat"),
    (["data"], "palo.data.cli", "palo data"),
    (["export"], "palo.export.cli", "palo export"),
    (["demo"], "palo.testing.demo", "palo demo"),
    (["eval", "vqa"], "palo.eval.model_vqa", "palo eval vqa"),
    (["eval", "review"], "palo.eval.eval_gpt_review_bench", "palo eval review"),
    (["eval", "summary"], "palo.eval.summarize_gpt_review", "palo eval summary"),
    (["eval", "report"], "palo.eval.report", "palo eval report"),
    (["eval", "bench"], "palo.eval.run_bench", "palo eval bench"),
    (["eval", "run-llava"], "palo.eval.run_llava", "palo eval run-llava"),
    (["eval", "shards"], "palo.eval.shards", "palo eval shards"),
    (["serve", "controller"], "palo.serve.controller", "palo serve controller"),
    (["serve", "worker"], "palo.serve.model_worker", "palo serve worker"),
    (["serve", "openai-worker"], "palo.serve.openai_worker", "palo serve openai-worker"),
    (["serve", "web"], "palo.serve.gradio_web_server", "palo serve web"),
    (["serve", "register-worker"], "palo.serve.register_worker", "palo serve register-worker"),
    (["serve", "test-message"], "palo.serve.test_message", "palo serve test-message"),
    (["serve", "run-batch"], "palo.serve.run_batch", "palo serve run-batch"),
]


def test_the_table_names_every_verb_the_tests_check():
    table = {tuple(v) for v, _, _ in ALL_VERBS} | {("train",)}
    named = {(v,) for v, c in cli.COMMANDS.items() if c} | {(g, s) for g, sub in cli.GROUPS.items() for s in sub}
    assert named == table
    for verb, module, _ in ALL_VERBS:
        command = cli.COMMANDS[verb[0]] if len(verb) == 1 else cli.GROUPS[verb[0]][verb[1]]
        assert command.module == module


@pytest.mark.parametrize("verb, module, prog", ALL_VERBS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_each_verb_forwards_its_argv_unchanged(fake_main, verb, module, prog):
    recorder = fake_main(module, result=3)
    saved = list(sys.argv)
    args = ["--flag", "value with spaces", "--", "-x", "eval"]
    assert cli.main([*verb, *args]) == 3
    assert recorder.calls == [(args, [prog, *args])]
    assert sys.argv == saved  # restored afterwards


def test_an_argv_less_main_reads_sys_argv_and_none_is_success(monkeypatch):
    """``palo train``: train.py's ``main()`` takes no argv and parses ``sys.argv`` (HfArgumentParser), returning None.

    A stand-in module takes its place, so the test does not import the trainer (torch, transformers, deepspeed).
    """
    assert cli.COMMANDS["train"].module == "palo.train.train"
    source = open(os.path.join(ROOT, "palo", "train", "train.py"), encoding="utf-8").read()
    assert re.search(r"^def main\(", source, re.M)  # argv-less today; the dispatcher runs either form
    recorder = Recorder(takes_argv=False, result=None)
    stand_in = types.ModuleType("palo_cli_test_train")
    stand_in.main = recorder.fake()
    monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command(stand_in.__name__, "train"))
    assert cli.main(["train", "--output_dir", "out", "--bf16", "True"]) == 0
    assert recorder.calls == [(None, ["palo train", "--output_dir", "out", "--bf16", "True"])]


@pytest.mark.parametrize("argv", [[], ["--workdir", "w", "--no-serve"], ["--preset", "tiny"], ["--steps=3"]])
def test_no_verb_or_an_option_first_is_the_quickstart(fake_main, argv):
    recorder = fake_main("palo.quickstart.cli")
    assert cli.main(argv) == 0
    assert recorder.calls == [(argv, ["palo", *argv])]


def test_argv_none_reads_the_command_line(fake_main, monkeypatch):
    recorder = fake_main("palo.eval.report")
    monkeypatch.setattr(sys, "argv", ["palo", "eval", "report", "--name", "x"])
    assert cli.main() == 0
    assert recorder.calls == [(["--name", "x"], ["palo eval report", "--name", "x"])]


def test_help_lists_every_verb_and_sub_verb(capsys):
    assert cli.main(["--help"]) == 0 and cli.main(["-h"]) == 0
    out = capsys.readouterr().out
    for verb in cli.COMMANDS:
        assert re.search(rf"^  {re.escape(verb)}\s+\S", out, re.M), verb
    for group, sub in cli.GROUPS.items():
        assert cli.main([group, "--help"]) == 0
        group_out = capsys.readouterr().out
        assert group_out.startswith(f"usage: palo {group} <command>")
        for name, command in sub.items():
            assert re.search(rf"^  {re.escape(name)}\s+{re.escape(command.help)}$", group_out, re.M), name


def test_version(capsys):
    import palo

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"palo {palo.__version__}"


def test_unknown_verbs_exit_2_naming_the_valid_ones(capsys):
    assert cli.main(["frobnicate", "--x"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and all(verb in err for verb in cli.COMMANDS)
    assert cli.main(["eval", "vqq"]) == 2
    err = capsys.readouterr().err
    assert "unknown eval command 'vqq'" in err and "run-llava" in err and "palo eval --help" in err
    assert cli.main(["serve"]) == 2  # a group without its sub-verb: its usage on stderr
    assert "usage: palo serve <command>" in capsys.readouterr().err


def test_help_imports_no_torch_in_a_fresh_interpreter():
    code = "import sys\nfrom palo.cli import main\nassert main(['--help']) == 0\nassert main(['eval', '-h']) == 0\n"
    result = _python(code=code + NO_HEAVY)
    assert result.returncode == 0, result.stderr
    assert "quickstart" in result.stdout and "run-llava" in result.stdout


def test_python_dash_m_palo():
    result = _python("-m", "palo", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: palo <command>") and "serving: controller" in result.stdout
    result = _python("-m", "palo", "nope")
    assert result.returncode == 2 and "unknown command 'nope'" in result.stderr


def test_a_forwarded_help_names_the_typed_command():
    """Through the real (light) main of register_worker: argparse's usage line says ``palo serve register-worker``."""
    result = _python("-m", "palo", "serve", "register-worker", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: palo serve register-worker")
    result = _python("-m", "palo", "data", "merge", "--help")  # the data tools' parser named itself palo-data
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: palo data merge")


def test_pyproject_scripts(monkeypatch):
    """``palo`` is the dispatcher; every older script still runs the main it always ran (through palo.cli, which
    names a missing optional extra in one line), with its own name in the usage line and the arguments unchanged."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["scripts"]
    assert scripts["palo"] == "palo.cli:main"
    old = {
        "palo-chat": "palo.serve.cli:main", "palo-data": "palo.data.cli:main",
        "palo-eval-vqa": "palo.eval.model_vqa:main", "palo-eval-review": "palo.eval.eval_gpt_review_bench:main",
        "palo-eval-summary": "palo.eval.summarize_gpt_review:main", "palo-eval-report": "palo.eval.report:main",
        "palo-eval-bench": "palo.eval.run_bench:main", "palo-controller": "palo.serve.controller:main",
        "palo-worker": "palo.serve.model_worker:main", "palo-web": "palo.serve.gradio_web_server:main",
    }
    ran = []
    monkeypatch.setattr(cli, "run", lambda command, prog, argv, extras=(): ran.append(
        (f"{command.module}:{command.func}", prog, argv)) or 0)
    for name, target in old.items():
        module, func = scripts[name].split(":")
        assert module == "palo.cli", name
        monkeypatch.setattr(sys, "argv", [f"/venv/bin/{name}", "--x", "1"])
        assert getattr(cli, func)() == 0
        assert ran[-1] == (target, name, ["--x", "1"])
    for target in set(old.values()):  # each names a module that has that function (checked without importing)
        module, func = target.split(":")
        source = open(os.path.join(ROOT, *module.split(".")) + ".py", encoding="utf-8").read()
        assert re.search(rf"^def {func}\(", source, re.M), target


def test_installed_console_script_when_present():
    """The ``palo`` the editable install put next to this Python runs the dispatcher (skipped when not installed)."""
    script = os.path.join(os.path.dirname(sys.executable), "palo")
    if not os.path.isfile(script) or "palo.cli" not in open(script, encoding="utf-8", errors="replace").read():
        pytest.skip("no `palo` console script for palo.cli next to this Python (pip install -e . to add it)")
    result = subprocess.run([script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: palo <command>")
