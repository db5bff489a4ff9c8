"""Chat templates (Jinja) that render exactly the prompt of a PALO conversation template.

transformers' ``apply_chat_template`` takes OpenAI-style messages (``{"role", "content"}``, content a string or a
list of ``{"type": "text" | "image", ...}`` items). :func:`chat_template_for` turns one of
:data:`palo.conversation.conv_templates` into a Jinja template whose output equals
:meth:`palo.conversation.Conversation.get_prompt` for the same turns, so the exported folder prompts the model
the way it was trained.

Rules shared by every style:

* a leading ``system`` message replaces the template's system prompt;
* images of a user turn are put at its front as ``<image>\\n`` each (``<im_start><image><im_end>\\n`` when the
  checkpoint uses start/end tokens), before the turn's text: PALO's demo and evaluation always place the image
  there, whatever the order of the content items;
* several text items of one turn are joined with a newline;
* ``add_generation_prompt`` opens the assistant turn exactly as a ``None`` last message does in ``get_prompt``.

Supported separator styles: ``TWO`` (``vicuna_v1``, ``llava_v1``), ``SINGLE`` without pre-filled examples
(``llava_v0``), ``MPT`` (``mpt``, ``chatml_direct``) and ``LLAMA_2`` (``llama_2``, ``llava_llama_2``,
``mistral_instruct``). ``PLAIN`` (stage-1 captioning, no roles), the ``mmtag`` versions (an extra image exchange)
and ``v0``/``default`` (two pre-filled example turns) are refused.
"""

from __future__ import annotations

import json

from palo.conversation import MPT_SYSTEM_PREFIX, Conversation, SeparatorStyle, conv_templates

__all__ = ["ChatTemplateError", "chat_template_for"]


class ChatTemplateError(ValueError):
    """A conversation template has no faithful Jinja rendering here."""


def _lit(text: str) -> str:
    """A Jinja string literal for ``text`` (JSON escapes are valid Jinja escapes)."""
    return json.dumps(text, ensure_ascii=False)


# Reduces one message's content to its prompt text: images first (one placeholder each), then the text items.
# A string content is kept as it is, unless the template knows a marker family (MARKER ... MARKER_END, set only for
# llama.cpp): llama-server flattens a message's parts into one string with a marker where each image was, so each
# marker found is moved to the front with the newline PALO puts after an image, and a newline the text already had
# right after a marker is not doubled. Text on both sides of a marker was two text parts, which PALO joins with a
# newline (llama-server puts none next to a marker).
_CONTENT_MACRO = """{%- macro render(message) -%}
{%- if message['content'] is string -%}
{%- if MARKER and MARKER in message['content'] -%}
{%- set ns = namespace(images='', text='', after=false) -%}
{%- set pieces = message['content'].split(MARKER_END) -%}
{%- for piece in pieces -%}
{%- if not loop.last and MARKER in piece -%}
{%- set parts = piece.split(MARKER) -%}
{%- set before = parts[0][1:] if ns.after and parts[0].startswith('\n') else parts[0] -%}
{%- set join = '\n' if ns.after and ns.text and before and not ns.text.endswith('\n') else '' -%}
{%- set ns.text = ns.text + join + before -%}
{%- set ns.images = ns.images + MARKER + parts[1] + MARKER_END + '\n' -%}
{%- set ns.after = true -%}
{%- else -%}
{%- set piece = piece if loop.last else piece + MARKER_END -%}
{%- set piece = piece[1:] if ns.after and piece.startswith('\n') else piece -%}
{%- set join = '\n' if ns.after and ns.text and piece and not ns.text.endswith('\n') else '' -%}
{%- set ns.text = ns.text + join + piece -%}
{%- set ns.after = false -%}
{%- endif -%}
{%- endfor -%}
{{ ns.images }}{{ ns.text }}
{%- else -%}{{ message['content'] }}
{%- endif -%}
{%- else -%}
{%- set ns = namespace(images='', texts=[]) -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' or item['type'] == 'image_url' -%}{%- set ns.images = ns.images + IMAGE + '\\n' -%}
{%- elif item['type'] == 'text' -%}{%- set ns.texts = ns.texts + [item['text']] -%}
{%- endif -%}
{%- endfor -%}
{{ ns.images }}{{ ns.texts | join('\\n') }}
{%- endif -%}
{%- endmacro -%}
"""

_PREAMBLE = """{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = SYSTEM_PREFIX + render(messages[0]) -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set system = SYSTEM -%}{%- set turns = messages -%}
{%- endif -%}
"""

_ROLE_CHECK = """{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/... after an optional system message') }}
{%- endif -%}
"""

_BODIES = {
    # TWO: system + sep, "ROLE: text" + sep (user) / sep2 (assistant); an open turn is "ROLE:".
    SeparatorStyle.TWO: """{{- system + SEP -}}
{%- for message in turns -%}""" + _ROLE_CHECK + """{%- set text = render(message) -%}
{%- if message['role'] == 'user' -%}{{ USER + ':' }}{%- if text %} {{ text + SEP }}{%- endif -%}
{%- else -%}{{ ASSISTANT + ':' }}{%- if text %} {{ text + SEP2 }}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ ASSISTANT + ':' }}{%- endif -%}""",
    # SINGLE: system + sep, "Role: text" + sep for every turn; an open turn is "Role:".
    SeparatorStyle.SINGLE: """{{- system + SEP -}}
{%- for message in turns -%}""" + _ROLE_CHECK + """{%- set text = render(message) -%}
{%- set role = USER if message['role'] == 'user' else ASSISTANT -%}
{{ role + ':' }}{%- if text %} {{ text + SEP }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ ASSISTANT + ':' }}{%- endif -%}""",
    # MPT (ChatML): system + sep, role tag + text + sep; an open turn is the role tag alone.
    SeparatorStyle.MPT: """{{- system + SEP -}}
{%- for message in turns -%}""" + _ROLE_CHECK + """{%- set text = render(message) -%}
{%- set role = USER if message['role'] == 'user' else ASSISTANT -%}
{{ role }}{%- if text -%}{{ text + SEP }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ ASSISTANT }}{%- endif -%}""",
    # LLAMA_2: the first user turn carries the <<SYS>> block; "[INST] q [/INST]" and " a </s>"; the leading sep is
    # stripped (the original's lstrip), so only later user turns start with it.
    SeparatorStyle.LLAMA_2: """{%- for message in turns -%}""" + _ROLE_CHECK + """{%- set text = render(message) -%}
{%- if loop.first -%}
{%- if not text -%}{{ raise_exception('LLAMA_2 prompts need a first user message with text') }}{%- endif -%}
{%- if system -%}{%- set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + text -%}{%- endif -%}
{%- endif -%}
{%- if text -%}
{%- if message['role'] == 'user' -%}{{ ('' if loop.first else SEP) + '[INST] ' + text + ' [/INST]' }}
{%- else -%}{{ ' ' + text + ' ' + SEP2 }}
{%- endif -%}
{%- endif -%}
{%- endfor -%}""",
}


def chat_template_for(conv_mode: str, image_placeholder: str = "<image>",
                      marker: tuple[str, str] | None = None, bos: bool = False) -> str:
    """The Jinja chat template rendering ``conv_templates[conv_mode]``.

    Args:
        conv_mode: A key of :data:`palo.conversation.conv_templates` (PALO checkpoints: ``vicuna_v1``).
        image_placeholder: What one image becomes in the prompt (``<image>``, or ``<im_start><image><im_end>``
            for checkpoints with ``mm_use_im_start_end``).
        marker: The start and end of the image markers a server may already have put into string contents
            (llama.cpp: ``("<__media", "__>")``, which covers its fixed ``<__media__>`` and llama-server's
            ``<__media_<random>__>``): found markers are laid out as image parts are. None: strings are kept.
        bos: Start with the tokenizer's ``bos_token``, as PALO's prompt ids do: transformers' convention (its
            tokenizer's ``apply_chat_template`` adds no special tokens, nor do vLLM's and SGLang's chat APIs by
            default). Not for llama.cpp, which adds BOS itself (``add_bos_token``).

    Returns:
        The template source.

    Raises:
        ChatTemplateError: For an unknown key or a template without a faithful rendering (see the module doc).
    """
    if conv_mode not in conv_templates:
        raise ChatTemplateError(f"unknown conversation template {conv_mode!r}; known: {sorted(conv_templates)}")
    conv: Conversation = conv_templates[conv_mode]
    if conv.messages or conv.offset:
        raise ChatTemplateError(
            f"{conv_mode!r} starts with pre-filled example turns, which a chat template cannot reproduce; "
            "PALO checkpoints use 'vicuna_v1'"
        )
    if "mmtag" in conv.version:
        raise ChatTemplateError(f"{conv_mode!r} (mmtag) puts images in an extra exchange; no chat template for it")
    if conv.sep_style not in _BODIES:
        raise ChatTemplateError(
            f"{conv_mode!r} uses the {conv.sep_style.name} style (stage-1 captioning, no roles): nothing to chat with"
        )
    constants = {
        "SYSTEM": conv.system,
        # A given system message is tagged as the template's own system prompt is (ChatML's), as the API does.
        "SYSTEM_PREFIX": MPT_SYSTEM_PREFIX if conv.sep_style is SeparatorStyle.MPT else "",
        "USER": conv.roles[0],
        "ASSISTANT": conv.roles[1],
        "SEP": conv.sep,
        "SEP2": conv.sep2 or "",
        "IMAGE": image_placeholder,
        "MARKER": marker[0] if marker else "",
        "MARKER_END": marker[1] if marker else "",
    }
    header = "".join(f"{{%- set {name} = {_lit(value)} -%}}\n" for name, value in constants.items())
    return header + _CONTENT_MACRO + _PREAMBLE + ("{{- bos_token -}}\n" if bos else "") + _BODIES[conv.sep_style]
