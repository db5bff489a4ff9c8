"""A feature started without its optional extra says so in one line, with the ``pip install`` that brings it, and
before its work: a base install (no ``[serve]``/``[eval]``) got tracebacks naming packages the user never asked for
(``import httpx`` for ``palo serve controller --help``, ``starlette`` for ``palo.LLM``), or, in the quickstart, a
traceback at the plot after all the training."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from palo.extras import MissingExtra, missing, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _without(packages: list[str], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``packages`` cannot be imported (as if not installed)."""
    hide = "import sys\n" + "".join(f"sys.modules[{p!r}] = None\n" for p in packages)
    return subprocess.run([sys.executable, "-c", hide + code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_missing_and_require_name_the_packages_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert missing("json", "matplotlib", "no_such_package_xyz") == ["matplotlib", "no_such_package_xyz"]
    hint = r"^the plot needs matplotlib, not installed here: pip install 'palo\[eval\]'$"
    with pytest.raises(MissingExtra, match=hint):
        require("the plot", "eval", packages=("json", "matplotlib"))
    require("the plot", "eval", packages=("json",))


@pytest.mark.parametrize("entry", ["main(['serve', 'controller', '--help'])", "controller_script()"])
def test_a_serving_command_without_the_serve_extra_says_what_to_install(entry):
    run = _without(["httpx"], f"sys.argv = ['palo-controller']\nfrom palo.cli import *\nsys.exit({entry})")
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().endswith("needs the package 'httpx', not installed here: pip install 'palo[serve]'")
    assert "Traceback" not in run.stderr



@pytest.mark.parametrize("module", ["controller", "model_worker", "openai_worker", "gradio_web_server"])
@pytest.mark.parametrize("how", ["module", "path"])
def test_python_m_of_a_serving_module_without_the_serve_extra_says_what_to_install(module, how):
    """The original commands (``python -m palo.serve.controller``) import fastapi/gradio before their main runs."""
    run_it = (f"runpy.run_module('palo.serve.{module}', run_name='__main__', alter_sys=True)" if how == "module" else
              f"runpy.run_path('palo/serve/{module}.py', run_name='__main__')")
    run = _without(["fastapi", "starlette", "gradio"], f"import runpy\nsys.argv = ['{module}.py', '--help']\n{run_it}")
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith(f"{module}.py: needs the package "), run.stderr
    assert run.stderr.strip().endswith("not installed here: pip install 'palo[serve]'")
    assert "Traceback" not in run.stderr

def test_a_missing_package_that_no_extra_brings_is_named_as_itself():
    """shortuuid is a base dependency: installing the eval extra would not bring it back."""
    run = _without(["shortuuid"], "from palo.cli import main\nsys.exit(main(['eval', 'vqa', '--help']))")
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip() == ("palo eval vqa: needs the package 'shortuuid', not installed here: "
                                  "pip install shortuuid")


def test_a_data_command_without_the_eval_extra_says_what_to_install(tmp_path):
    """palo-data translate imports openai when it starts translating."""
    data = tmp_path / "data.json"
    data.write_text('[{"id": "1", "conversations": [{"from": "human", "value": "Hi"}, '
                    '{"from": "gpt", "value": "Hello"}]}]')
    run = _without(["openai"], "from palo.cli import data_script\nsys.argv = ['palo-data', 'translate', '--data_path', "
                   f"{str(data)!r}, '--languages', 'ar', '--output_dir', {str(tmp_path / 'out')!r}, '--base-url', "
                   "'http://127.0.0.1:9/v1', '--model', 'm', '--api-key', 'k', '--quiet']\nsys.exit(data_script())")
    assert run.returncode == 1, run.stderr
    assert "needs the package 'openai', not installed here: pip install 'palo[eval]'" in run.stderr
    assert "Traceback" not in run.stderr


def test_palo_llm_without_the_serve_extra_fails_before_loading(tmp_path):
    run = _without(["starlette"], f"from palo import LLM\nLLM({str(tmp_path / 'no-such-checkpoint')!r})")
    assert run.returncode == 1
    assert "MissingExtra: palo.LLM needs starlette, not installed here: pip install 'palo[serve]'" in run.stderr


def test_the_quickstart_checks_its_extras_before_training(tmp_path, monkeypatch, capsys):
    from palo.quickstart import cli

    monkeypatch.setattr("palo.quickstart.pipeline.run", lambda *a, **k: pytest.fail("trained without its extras"))
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert cli.main(["--workdir", str(tmp_path / "q"), "--preset", "tiny"]) == 2
    assert "serving the model; --no-serve stops before) needs gradio" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["--workdir", str(tmp_path / "q"), "--preset", "tiny", "--no-serve"]) == 2
    err = capsys.readouterr().err
    assert "(its results plot) needs matplotlib, not installed here: pip install 'palo[eval]'" in err
