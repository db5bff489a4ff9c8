"""``PALO_JUDGE_RULE``: the environment variable of the eval scripts that makes the judge use an original rule.json.

Checked in two links: the scripts turn the variable into ``--rule`` (and pass no ``--rule`` without it), and
``run_bench --rule`` makes every judge request carry that file's prompt for the question's category instead of the
built-in rubric.
"""

from __future__ import annotations

import json
import os
import subprocess

from palo.eval import run_bench
from palo.eval.judge import DEFAULT_RULES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts", "eval")


def _stub_python(tmp_path) -> str:
    """An interpreter stand-in that records its arguments, to see what the scripts pass without running them."""
    stub = tmp_path / "python-stub"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_ARGS"\n')
    stub.chmod(0o755)
    return str(stub)


def _script_argv(tmp_path, script: str, args: list[str], **env_extra: str) -> list[str]:
    args_file = tmp_path / "args.txt"
    env = {k: v for k, v in os.environ.items() if k != "PALO_JUDGE_RULE"}
    env.update(PYTHON=_stub_python(tmp_path), STUB_ARGS=str(args_file), **env_extra)
    subprocess.run(["bash", os.path.join(SCRIPTS, script), *args], env=env, check=True)
    return args_file.read_text().splitlines()


def test_scripts_pass_palo_judge_rule_as_rule(tmp_path):
    rule = str(tmp_path / "my rules" / "rule.json")  # a space in the path survives the scripts' quoting
    one = ["/b/images", "/m", "/b/q.jsonl", "/b/a.jsonl", "/b/c.jsonl", "/out", "name_Urdu"]
    for script, args in (("llavabench.sh", one), ("eval_all_languages.sh", ["/m", "run1", "-"])):
        argv = _script_argv(tmp_path, script, args, PALO_JUDGE_RULE=rule)
        assert argv[argv.index("--rule") + 1] == rule, script
        assert "--rule" not in _script_argv(tmp_path, script, args), script  # unset: the built-in rubric


def test_rule_file_reaches_every_judge_request(world, bench, judge_server, tmp_path):
    rules = {f"llava_bench_{c}": {"role": "Assistant", "prompt": f"RULE-{c} judge strictly"}
             for c in ("conv", "detail", "complex")}
    rule_file = tmp_path / "rule.json"
    rule_file.write_text(json.dumps(rules), encoding="utf-8")
    arabic = os.path.join(bench, "arabic", "corrected")
    rc = run_bench.main([
        "--model-path", world.full_dir, "--images", os.path.join(bench, "images"),
        "--questions", os.path.join(arabic, "question.jsonl"), "--answers", os.path.join(arabic, "answers.jsonl"),
        "--context", os.path.join(arabic, "context.jsonl"), "--output-dir", str(tmp_path / "out"),
        "--output-file", "m_Arabic", "--device", "cpu", "--max-new-tokens", "2",
        "--judge-base-url", judge_server.base_url, "--rule", str(rule_file), "--cache", str(tmp_path / "c.sqlite"),
    ])
    assert rc == 0
    questions = [json.loads(line) for line in open(os.path.join(arabic, "question.jsonl"), encoding="utf-8")]
    assert len(judge_server.contents) == len(questions) == 4
    for content in judge_server.contents:
        asked = [q for q in questions if f"[Question]\n{q['text']}\n" in content]
        assert len(asked) == 1, content[:300]
        assert content.endswith(f"[System]\nRULE-{asked[0]['category']} judge strictly\n\n"), content[-200:]
    # None of the built-in rubric's prompts was sent.
    for rule in DEFAULT_RULES.values():
        assert not any(rule["prompt"] in c for c in judge_server.contents)

