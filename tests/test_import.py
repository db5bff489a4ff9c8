"""``import palo`` is cheap (no torch, no transformers); the model classes load on first use and register then."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_import_palo_and_the_light_modules_import_no_torch():
    _run(
        "import sys\n"
        "import palo, palo.jsonl, palo.openai_client, palo.cli\n"
        "from palo import LLM\n"  # the class; its module imports torch when a model is loaded
        "heavy = sorted(m for m in ('torch', 'transformers', 'palo.model') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert palo.__version__ == '0.1.0' and LLM.__module__ == 'palo.llm'\n"
        "assert {'PaloForCausalLM', 'PaloConfig', 'LlavaLlamaForCausalLM', 'model', 'LLM'} <= set(dir(palo))\n"
    )


def test_the_controller_and_the_openai_api_import_no_torch():
    """The controller process routes and validates requests; the model's heavy imports belong to the workers."""
    _run(
        "import sys\n"
        "import palo.serve.controller, palo.serve.openai_api, palo.serve.protocol, palo.serve.tokenizer_api\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )


def test_model_classes_resolve_lazily_and_register_the_auto_classes():
    _run(
        "import sys\n"
        "import palo\n"
        "assert 'palo.model' not in sys.modules\n"
        "from palo import PaloForCausalLM\n"
        "import palo.model\n"
        "assert PaloForCausalLM is palo.model.PaloForCausalLM is palo.PaloForCausalLM\n"
        "assert palo.PaloConfig is palo.model.PaloConfig and "
        "palo.LlavaLlamaForCausalLM is palo.model.LlavaLlamaForCausalLM\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "assert type(AutoConfig.for_model('palo')) is palo.PaloConfig\n"
        "assert AutoConfig.for_model('llava_llama').model_type == 'llava_llama'\n"
        "assert AutoModelForCausalLM._model_mapping[palo.PaloConfig] is PaloForCausalLM\n"
        "try:\n"
        "    palo.no_such_name\n"
        "except AttributeError as error:\n"
        "    assert 'no_such_name' in str(error)\n"
        "else:\n"
        "    raise AssertionError('palo.no_such_name resolved')\n"
    )


def test_subpackages_are_reachable_as_attributes():
    """``import palo; palo.conversation...`` works as when ``import palo`` loaded palo.model and its imports."""
    _run("import sys, palo\nassert palo.conversation.conv_templates\nassert 'torch' not in sys.modules\n")


def test_the_loader_registers_without_import_palo_model_by_hand():
    """``palo.model.builder`` (what every loader uses) registers, so ``AutoConfig`` knows ``palo`` after it."""
    _run(
        "from palo.model.builder import load_pretrained_model\n"
        "from transformers import AutoConfig\n"
        "assert AutoConfig.for_model('palo').model_type == 'palo'\n"
    )
