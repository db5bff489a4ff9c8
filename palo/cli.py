"""``palo <verb> ...``: one command line for every PALO tool (the ``palo`` console script, ``python -m palo``).

    palo quickstart | chat | data | train | export | demo
    palo eval  vqa | review | summary | report | bench | run-llava | shards
    palo serve controller | worker | openai-worker | web | register-worker | test-message | run-batch

Each verb hands the rest of the command line, unchanged, to the ``main`` of the module that has always run that
tool (``palo eval vqa ...`` is ``python -m palo.eval.model_vqa ...``), with ``sys.argv[0]`` set to ``palo eval vqa``
so its usage line names the command typed. The module is imported only when its verb is chosen: ``palo --help``
imports neither torch nor transformers.

Backward compatibility: ``palo`` was the quickstart alone, so ``palo`` with no argument, or with a first argument
that is an option other than ``-h``/``--help``/``--version`` (``palo --workdir runs/q --no-serve``), still runs the
quickstart. The older console scripts (``palo-chat``, ``palo-data``, ``palo-eval-vqa``, ``palo-controller``, ...)
and every ``python -m palo.<package>.<module>`` path are unchanged.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass

from palo.extras import PACKAGES as EXTRA_PACKAGES
from palo.extras import MissingExtra, install_hint

HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class Command:
    """A verb: the module whose ``main`` runs it and the one line ``--help`` shows."""

    module: str
    help: str
    func: str = "main"


EVAL = {
    "vqa": Command("palo.eval.model_vqa", "answer benchmark questions with a checkpoint (model_vqa)"),
    "review": Command("palo.eval.eval_gpt_review_bench",
                      "judge answers against references with an OpenAI-compatible LLM"),
    "summary": Command("palo.eval.summarize_gpt_review", "relative scores from judge reviews"),
    "report": Command("palo.eval.report", "one results table across languages (markdown, CSV, JSON, chart)"),
    "bench": Command("palo.eval.run_bench", "the whole multilingual LLaVA-Bench run: answer, judge, summarise"),
    "run-llava": Command("palo.eval.run_llava", "one query about one or more images, answer printed (run_llava)"),
    "shards": Command("palo.eval.shards", "`shards merge`: merge answer files of model_vqa --num-chunks runs"),
}

SERVE = {
    "controller": Command("palo.serve.controller", "the controller: worker registry, routing, OpenAI-compatible API"),
    "worker": Command("palo.serve.model_worker", "a model worker serving one checkpoint (original protocol)"),
    "openai-worker": Command("palo.serve.openai_worker",
                             "a worker in front of an OpenAI-compatible server (vLLM, SGLang)"),
    "web": Command("palo.serve.gradio_web_server", "the Gradio web demo"),
    "register-worker": Command("palo.serve.register_worker", "register a worker with a controller by hand"),
    "test-message": Command("palo.serve.test_message", "send one message to a model through a worker (smoke test)"),
    "run-batch": Command("palo.serve.run_batch",
                         "run a file of requests in OpenAI's Batch format against an OpenAI-compatible server"),
}

GROUPS = {"eval": EVAL, "serve": SERVE}
EXTRAS = {  # the optional extras (pyproject.toml) whose packages a verb imports: named when one is missing
    "eval": ("eval",), "serve": ("serve",), "quickstart": ("eval", "serve"), "data": ("eval",), "train": ("train",),
}
GROUP_TITLE = {"eval": "evaluation", "serve": "serving"}  # `palo --help`: "<title>: <sub-verbs>"
GROUP_HELP = {
    "eval": "Evaluate: multilingual LLaVA-Bench answering, judging and reports.",
    "serve": "Serve: the controller, model workers, the web UI and their tools.",
}

COMMANDS: dict[str, Command | None] = {
    "quickstart": Command("palo.quickstart.cli", "train, evaluate and serve a small PALO offline (the default verb)"),
    "chat": Command("palo.serve.cli", "chat about an image in the terminal, streamed"),
    "data": Command("palo.data.cli", "training data tools: inspect, validate, stats, translate, apply-review, merge"),
    "train": Command("palo.train.train",
                     "fine-tune (the flags of the original train.py; torchrun/deepspeed for many GPUs)"),
    "eval": None,  # a group, see GROUPS
    "serve": None,
    "export": Command("palo.export.cli",
                      "export a checkpoint to transformers' Llava (--to hf-llava) or llama.cpp's GGUF (--to gguf)"),
    "demo": Command("palo.testing.demo", "chat with a tiny random checkpoint built on the spot (seconds, no download)"),
}


def _version() -> str:
    from palo import __version__

    return __version__


def _listing(entries: dict[str, str]) -> str:
    width = max(map(len, entries))
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in entries.items())


def usage() -> str:
    """The text of ``palo --help``."""
    entries = {name: command.help if command else f"{GROUP_TITLE[name]}: {', '.join(GROUPS[name])}"
               for name, command in COMMANDS.items()}
    return (
        "usage: palo <command> [args...]\n"
        "       palo [quickstart options]      (no command: the quickstart, as `palo` has always run)\n\n"
        "PALO: a polyglot LLaVA-style vision-language model in 10 languages.\n\n"
        f"commands:\n{_listing(entries)}\n\n"
        "`palo <command> --help` shows a command's options; `palo eval --help` and `palo serve --help` list theirs.\n"
        "The older console scripts (palo-chat, palo-data, palo-eval-vqa, palo-controller, ...) and\n"
        "`python -m palo.<package>.<module>` still work.\n"
    )


def group_usage(group: str) -> str:
    """The text of ``palo eval --help`` / ``palo serve --help``."""
    return (
        f"usage: palo {group} <command> [args...]\n\n{GROUP_HELP[group]}\n\n"
        f"commands:\n{_listing({name: command.help for name, command in GROUPS[group].items()})}\n\n"
        f"`palo {group} <command> --help` shows a command's options.\n"
    )


def _unknown(kind: str, name: str, valid: list[str], help_command: str) -> int:
    print(f"palo: unknown {kind} {name!r}; valid: {', '.join(valid)} (see `{help_command}`)", file=sys.stderr)
    return 2


def run(command: Command, prog: str, argv: list[str], extras: tuple[str, ...] = ()) -> int:
    """Import ``command``'s module and run its ``main`` on ``argv``, with ``sys.argv`` = ``[prog, *argv]``;
    ``extras``: the optional extras it needs.

    A package the command needs that is not installed (an optional extra left out) is named in one line with the
    ``pip install`` that brings it, not a traceback (``palo serve controller --help`` failed on ``import httpx``).
    """
    saved = sys.argv
    sys.argv = [prog, *argv]  # argparse's usage line names the command typed; argv-less mains read sys.argv
    try:
        entry = getattr(importlib.import_module(command.module), command.func)
        result = entry(list(argv)) if inspect.signature(entry).parameters else entry()
    except MissingExtra as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        package = (exc.name or "").split(".")[0]
        if not package or package == "palo":
            raise
        # The extra's install where the package is one of its own; else the package (a dependency of a dependency).
        ours = [extra for extra in extras if package in EXTRA_PACKAGES[extra]]
        hint = install_hint(*ours) if ours else f"pip install {package}"
        print(f"{prog}: needs the package {package!r}, not installed here: {hint}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0 if result is None else result


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``palo <verb> [<sub-verb>] args...`` (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in (*HELP_FLAGS, "--version")):
        # `palo`, `palo --workdir ...`: the quickstart, as before
        return run(COMMANDS["quickstart"], "palo", argv, EXTRAS["quickstart"])
    verb, rest = argv[0], argv[1:]
    if verb in HELP_FLAGS:
        print(usage(), end="")
        return 0
    if verb == "--version":
        print(f"palo {_version()}")
        return 0
    if verb not in COMMANDS:
        return _unknown("command", verb, list(COMMANDS), "palo --help")
    if verb in GROUPS:
        group = GROUPS[verb]
        if not rest or rest[0] in HELP_FLAGS:
            print(group_usage(verb), end="", file=sys.stdout if rest else sys.stderr)
            return 0 if rest else 2
        if rest[0] not in group:
            return _unknown(f"{verb} command", rest[0], list(group), f"palo {verb} --help")
        return run(group[rest[0]], f"palo {verb} {rest[0]}", rest[1:], EXTRAS[verb])
    return run(COMMANDS[verb], f"palo {verb}", rest, EXTRAS.get(verb, ()))


def _script(*verbs: str):
    """The ``main`` of an older console script (``palo-controller`` is ``palo serve controller``): the same run,
    its usage line naming the script, and a missing extra said in one line."""
    def script() -> int:
        group = GROUPS.get(verbs[0])
        command = group[verbs[1]] if group else COMMANDS[verbs[0]]
        return run(command, os.path.basename(sys.argv[0]), sys.argv[1:], EXTRAS.get(verbs[0], ()))

    return script


def module_main(module: str) -> int:
    """Run ``python -m <module>`` (or ``python <path>/<module>.py``) of a verb's module through :func:`run`.

    The module calls this before its own imports, which would fail on a missing extra (``fastapi``, ``gradio``) with
    a traceback; here the extra is named in one line. Arguments and usage line are the module's as before.
    """
    for verb, command in COMMANDS.items():
        for candidate in GROUPS[verb].values() if verb in GROUPS else (command,):
            if candidate.module == module:
                return run(candidate, os.path.basename(sys.argv[0]), sys.argv[1:], EXTRAS.get(verb, ()))
    raise ValueError(f"{module} is not the module of a palo command")


# [project.scripts] in pyproject.toml
chat_script = _script("chat")
data_script = _script("data")
eval_vqa_script = _script("eval", "vqa")
eval_review_script = _script("eval", "review")
eval_summary_script = _script("eval", "summary")
eval_report_script = _script("eval", "report")
eval_bench_script = _script("eval", "bench")
controller_script = _script("serve", "controller")
worker_script = _script("serve", "worker")
web_script = _script("serve", "web")


if __name__ == "__main__":
    sys.exit(main())
