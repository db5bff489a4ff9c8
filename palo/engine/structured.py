"""Structured outputs: answers held to a JSON schema, a regular expression or a list of choices, token by token.

Each step, the tokens that cannot continue a request's answer within its grammar are masked out of its logits before
sampling (after its penalties and logit bias), so greedy and sampled answers alike only ever spell a prefix of
something the grammar accepts, and end-of-sequence is allowed only once it is complete. The grammars are compiled and
matched by ``xgrammar`` (the library vLLM and SGLang use for the same), imported on the first such request; the
request's :class:`StructuredOutput` itself is plain data that the servers import without torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

# What an answer can be held to (OpenAI's ``json_object`` / ``json_schema``, vLLM's regex and choice).
Kind = Literal["json_object", "json_schema", "regex", "choice"]
GRAMMAR_CACHE_BYTES = 256 << 20  # compiled grammars kept for reuse
_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # the "[time] file.cc:123: " before xgrammar's messages


@dataclass(frozen=True)
class StructuredOutput:
    """The shape a request's answer must take.

    Attributes:
        kind: ``"json_object"`` (any JSON object), ``"json_schema"`` (JSON valid under ``spec``, a JSON Schema
            document as text), ``"regex"`` (the whole answer matches the pattern ``spec``) or ``"choice"`` (the
            answer is one of the strings of the JSON list ``spec``).
        spec: As ``kind`` says; empty for ``json_object``.
    """

    kind: Kind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("json_object", "json_schema", "regex", "choice"):
            raise ValueError(f"unknown structured output kind {self.kind!r}")

    @classmethod
    def choice(cls, options: list[str]) -> StructuredOutput:
        return cls("choice", json.dumps(options, ensure_ascii=False))


class GrammarError(ValueError):
    """A schema, pattern or choice list that cannot be compiled into a grammar."""


class StructuredOutputs:
    """Compiles a request's :class:`StructuredOutput` for one tokenizer and masks the logits of the rows that have
    one.

    Args:
        tokenizer: The model's (Hugging Face) tokenizer.
        vocab_size: Width of the model's logits (may exceed the tokenizer's length).
        stop_ids: The ids that end an answer (the grammar allows them only once the answer is complete).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        import xgrammar  # imported here: only a request that asks for structure pays for it

        self._xgr = xgrammar
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_ids))
        # Compiled grammars are kept for the next request with the same shape, up to a bound: a server that meets
        # ever new schemas must not grow without limit. max_threads: this worker's compile, not the whole machine.
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_limit_bytes=GRAMMAR_CACHE_BYTES)

    def matcher(self, output: StructuredOutput) -> Any:
        """A fresh matcher (the grammar's state for one answer) for ``output``.

        Raises:
            GrammarError: For a schema, pattern or choice list that does not compile, with the library's reason.
        """
        try:
            if output.kind == "json_object":
                compiled = self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif output.kind == "json_schema":
                compiled = self._compiler.compile_json_schema(output.spec, any_whitespace=False)
            elif output.kind == "regex":
                compiled = self._compiler.compile_regex(output.spec)
            else:  # one alternative per choice, each a JSON string literal (EBNF's escapes are JSON's)
                options = json.loads(output.spec)
                compiled = self._compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _LOCATION.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise GrammarError(f"the {output.kind.replace('_', ' ')} cannot be used: {reason[:300]}") from None
        return self._xgr.GrammarMatcher(compiled)

    def mask(self, logits: torch.Tensor, matchers: list[Any | None]) -> torch.Tensor:
        """The logits with every token a row's grammar does not allow next set to ``-inf``.

        Args:
            logits: ``[B, V]``.
            matchers: B matchers, None for a row without a grammar.

        Returns:
            ``[B, V]``: ``logits`` itself when no row has a grammar, otherwise a float32 copy.
        """
        import torch

        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return logits
        bitmask = self._xgr.allocate_token_bitmask(len(matchers), self.vocab_size)  # all allowed
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, index=i)
        masked = logits.to(torch.float32, copy=True)
        self._xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device), indices=rows)
        return masked


def accept(matcher: Any, token: int) -> None:
    """Advance a row's grammar past its chosen token (one the mask allowed, so it is always accepted)."""
    if not matcher.accept_token(token):
        raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")
