"""Request bodies of the served API and their checks.

The completion and chat requests are llama-cpp-python's server request models
(``llama_cpp.server.types``: the fields, defaults and ranges of
``python -m llama_cpp.server``) plus one ``otter`` object, the per-request
Otter options an OpenAI client sends through ``extra_body``::

    {"otter": {"guidance": {"weight": 1.5, "top_k": 4, "signal": "helpfulness"},
               "full_signals": false, "side_stream": true, "heads": ["harmless"]}}

Every problem is a :class:`RequestError` (HTTP 400 unless said otherwise)
with a message naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Union

from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RequestError", "OtterOptions", "CompletionRequest", "ChatRequest", "ScoreRequest",
           "check_sampling", "grammar", "logprobs_n", "logit_bias", "stop_list"]


class RequestError(ValueError):
    """A request the server refuses: ``status`` (400 by default) and an OpenAI-style error type."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.param = param
        self.type = type


class OtterOptions(BaseModel):
    """The ``otter`` object of a request."""

    model_config = ConfigDict(extra="forbid")

    guidance: Optional[Dict[str, Any]] = Field(
        default=None, description="reward-guided decoding: weight, top_k, mode, signal, trace (docs/API.md)")
    full_signals: Optional[bool] = Field(
        default=None, description="token_reward heads: the full signal row (n_vocab floats) of every token")
    side_stream: bool = Field(default=True, description="false: no Otter signals for this request (no otter field)")
    heads: Optional[List[str]] = Field(
        default=None, description="the loaded heads this request's otter block and guidance use (default: all)")


RESPONSE_FORMAT = Field(
    default=None, description='{"type": "text" | "json_object" | "json_schema"}: OpenAI\'s json_schema form '
                              '({"json_schema": {"name", "schema", "strict"}}) or a "schema" beside the type')


SPECULATIVE = Field(default=None, description="speculative decoding on a server with a drafter (--draft-ngram, "
                                             "--model-draft): false to opt out, {\"n_max\": N} drafts per step")
CACHE_PROMPT = Field(default=True, description="reuse the longest prefix of the prompt a sequence of the pool "
                                              "holds (llama-server's cache_prompt); false: decode the whole prompt")


class CompletionRequest(CreateCompletionRequest):
    prompt: Union[str, List[int], List[str]] = Field(
        default="", description="The prompt: a string, or token ids (no BOS is added to token ids).")
    response_format: Optional[Dict[str, Any]] = RESPONSE_FORMAT
    cache_prompt: bool = CACHE_PROMPT
    speculative: Optional[Union[bool, Dict[str, Any]]] = SPECULATIVE
    otter: Optional[OtterOptions] = None


class ChatRequest(CreateChatCompletionRequest):
    # checked by server.chat.normalize: OpenAI's message forms (content null beside tool_calls, text parts)
    messages: List[Dict[str, Any]] = Field(default_factory=list, description="the chat, OpenAI's message objects")
    tools: Optional[List[Dict[str, Any]]] = Field(default=None, description="functions the model may call")
    tool_choice: Optional[Union[str, Dict[str, Any]]] = Field(
        default=None, description='"none" | "auto" | "required" | {"type": "function", "function": {"name"}}')
    functions: Optional[List[Dict[str, Any]]] = Field(default=None, description="deprecated form of tools")
    function_call: Optional[Union[str, Dict[str, Any]]] = Field(default=None,
                                                                description="deprecated form of tool_choice")
    response_format: Optional[Dict[str, Any]] = RESPONSE_FORMAT
    cache_prompt: bool = CACHE_PROMPT
    speculative: Optional[Union[bool, Dict[str, Any]]] = SPECULATIVE
    otter: Optional[OtterOptions] = None


class ScoreRequest(BaseModel):
    """``POST /v1/otter/score``: exactly one of ``text`` / ``tokens``."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    text: Optional[str] = None
    tokens: Optional[List[int]] = None
    add_bos: bool = True
    special: bool = True


def _finite(name: str, v: Union[int, float, None]) -> None:
    if v is not None and not math.isfinite(float(v)):
        raise RequestError(f"{name} must be a finite number, got {v!r}", param=name)


def check_sampling(req: Union[CompletionRequest, ChatRequest], *, max_tokens_limit: int) -> None:
    """The checks llama-cpp-python's models leave out; unsupported options are refused, not ignored."""
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty",
                 "mirostat_tau", "mirostat_eta"):
        _finite(name, getattr(req, name, None))
    if req.temperature < 0 or req.temperature > 2:
        raise RequestError(f"temperature must be in [0, 2], got {req.temperature}", param="temperature")
    if req.max_tokens is not None:
        if req.max_tokens < 0:
            raise RequestError(f"max_tokens must be >= 0, got {req.max_tokens}", param="max_tokens")
        if req.max_tokens > max_tokens_limit:
            raise RequestError(f"max_tokens={req.max_tokens} exceeds this server's limit of {max_tokens_limit} "
                               f"(--max-tokens-limit)", param="max_tokens")
    if req.n is not None and req.n < 1:
        raise RequestError(f"n must be >= 1, got {req.n}", param="n")
    if getattr(req, "best_of", 1) not in (None, 1):
        raise RequestError("best_of must be 1", param="best_of")
    if req.min_tokens:
        raise RequestError("min_tokens is not supported", param="min_tokens")
    if req.logit_bias_type not in (None, "tokens"):
        raise RequestError("logit_bias_type must be 'tokens'", param="logit_bias_type")
    if req.seed is not None and not 0 <= req.seed < 2 ** 32:
        raise RequestError(f"seed must be in [0, 2**32), got {req.seed}", param="seed")


def logprobs_n(req: Union[CompletionRequest, ChatRequest], n_vocab: int) -> Optional[int]:
    """How many top log-probabilities a request asks for per token (None: no logprobs):
    completions' ``logprobs=N``; chat's ``top_logprobs`` when ``logprobs`` is true (0 without it)."""
    if isinstance(req, ChatRequest):
        n, name = ((req.top_logprobs or 0) if req.logprobs else None), "top_logprobs"
    else:
        n, name = req.logprobs, "logprobs"
    if n is not None and n > n_vocab:
        raise RequestError(f"{name}={n} exceeds the vocabulary ({n_vocab} tokens)", param=name)
    return n


def grammar(req: Union[CompletionRequest, ChatRequest], tools: Optional[str] = None) -> Optional[str]:
    """The GBNF grammar a request constrains its output with: ``grammar`` as given, the one of
    ``response_format`` (llama-cpp-python's JSON grammar, its JSON-schema-to-GBNF converter), or
    ``tools``, the grammar of a required tool call (server.chat)."""
    rf = req.response_format
    given = [n for n, v in (("grammar", req.grammar), ("response_format", rf and rf.get("type") != "text"),
                            ("tool_choice", tools)) if v]
    if len(given) > 1:
        raise RequestError(f"give one of {' and '.join(given)}", param=given[-1])
    if tools:
        return tools
    if rf is None or rf.get("type") == "text":
        return req.grammar
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    kind = rf.get("type")
    if kind == "json_object":
        schema = rf.get("schema")
    elif kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else rf.get("schema")
        if schema is None:
            raise RequestError('response_format: type "json_schema" needs a schema '
                               '({"json_schema": {"name": ..., "schema": {...}}})', param="response_format")
    else:
        raise RequestError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format")
    if schema is None:
        return JSON_GBNF
    if not isinstance(schema, (dict, bool)):
        raise RequestError(f"response_format: the schema must be a JSON object, got {type(schema).__name__}",
                           param="response_format")
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 - the converter's own errors (unsupported keywords, bad refs)
        raise RequestError(f"response_format: this JSON schema cannot be turned into a grammar: "
                           f"{type(e).__name__}: {e}", param="response_format") from None


MAX_DRAFT = 32  # drafts per step: --draft-ngram, --draft-max, a request's speculative.n_max


def draft_max(req: Union[CompletionRequest, ChatRequest], served: int) -> Optional[int]:
    """A request's drafts per step: None for the server's (``served``), 0 for none."""
    sp = req.speculative
    if sp is None or sp is True:
        return None
    if sp is False:
        return 0
    unknown = sorted(set(sp) - {"n_max"})
    if unknown:
        raise RequestError(f"speculative: unknown option(s) {', '.join(map(repr, unknown))}; expected: n_max",
                           param="speculative")
    n = sp.get("n_max")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_DRAFT:
        raise RequestError(f"speculative.n_max must be an integer in 0..{MAX_DRAFT}, got {n!r}", param="speculative")
    if n and not served:
        raise RequestError("speculative.n_max: this server has no drafter (--draft-ngram N or --model-draft FILE)",
                           param="speculative")
    return n


def logit_bias(req: Union[CompletionRequest, ChatRequest], n_vocab: int) -> Optional[Dict[int, float]]:
    """``logit_bias`` with token-id keys (checked against the vocabulary)."""
    if not req.logit_bias:
        return None
    out: Dict[int, float] = {}
    for k, v in req.logit_bias.items():
        try:
            t = int(k)
        except ValueError:
            raise RequestError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
        if not 0 <= t < n_vocab:
            raise RequestError(f"logit_bias token id {t} is outside the vocabulary (0..{n_vocab - 1})",
                               param="logit_bias")
        _finite("logit_bias", v)
        out[t] = float(v)
    return out


def stop_list(stop: Union[str, List[str], None]) -> List[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
