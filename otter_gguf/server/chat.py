"""The chat side of ``otter-gguf serve``: messages to a prompt, tool calls in and out.

* :func:`normalize` checks the OpenAI messages (roles, text content; ``content: null``
  with ``tool_calls``, as clients send back an assistant's call) and joins text parts.
* Tools, as llama-server does it: the GGUF's chat template renders ``tools`` when it
  supports them (found by rendering a probe tool, llama-server's capability check);
  otherwise the tools are described in a system message in the Hermes / Qwen 2.5 format
  (``<tools>`` signatures, calls as ``<tool_call>{"name", "arguments"}</tool_call>``),
  and earlier calls and tool results are written in that format too.
* ``tool_choice``: ``"auto"`` (default with tools) lets the model answer or call;
  ``"required"`` and ``{"type": "function", "function": {"name"}}`` constrain the output
  with a GBNF grammar of the call (the arguments through llama-cpp-python's JSON-schema
  converter, so they match the tool's ``parameters``); ``"none"`` leaves the tools out.
* :func:`parse_tool_calls` takes the ``<tool_call>`` blocks out of the generated text:
  ``message.tool_calls`` (ids ``call_...``, ``arguments`` a JSON string), finish reason
  ``"tool_calls"``; :class:`ToolStream` holds a stream's text back from where a call
  starts, so content deltas never show call markup.

Pure Python (Jinja2 through llama-cpp-python's formatter, its GBNF converter).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["ChatPrompt", "normalize", "render", "tool_grammar", "parse_tool_calls", "ToolStream",
           "supports_tools", "OPEN", "CLOSE"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SYSTEM_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")
PROBE = {"type": "function", "function": {"name": "otter_probe_tool_7f3a", "description": "probe",
                                          "parameters": {"type": "object", "properties": {}}}}


class ChatError(ValueError):
    """A request the chat layer refuses; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _text(content: Any, where: str) -> Optional[str]:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatError(f"{where}.content[{j}]: only text parts are supported, got {kind!r}", "messages")
            out.append(part["text"])
        return "".join(out)
    raise ChatError(f"{where}.content must be a string, a list of text parts or null", "messages")


def normalize(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The messages with text content (parts joined), ``developer`` as ``system``; a ChatError names a bad one."""
    if not messages:
        raise ChatError("messages is empty", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ChatError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        m = dict(m)
        m["content"] = _text(m.get("content"), where)
        if m["role"] == "developer":
            m["role"] = "system"
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise ChatError(f"{where}.tool_calls: a list, on an assistant message", "messages")
            for j, c in enumerate(calls):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise ChatError(f"{where}.tool_calls[{j}].function.name is missing", "messages")
        elif m["content"] is None and m["role"] != "assistant":
            raise ChatError(f"{where}.content is missing", "messages")
        out.append(m)
    return out


def _tools(tools: Optional[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    out = []
    for i, t in enumerate(tools or []):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ChatError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                            f"'parameters': {{...}}}}}}", "tools")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ChatError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        out.append({"type": "function", "function": {**f, "parameters": params}})
    return out


def supports_tools(formatter: Any) -> bool:
    """True when the chat template renders a request's ``tools`` (a probe tool's name shows in the prompt)."""
    try:
        res = formatter(messages=[{"role": "user", "content": "x"}], tools=[PROBE])
    except Exception:  # noqa: BLE001 - a template that cannot take the probe does not support tools
        return False
    return PROBE["function"]["name"] in res.prompt


def _call_text(call: Dict[str, Any]) -> str:
    f = call["function"]
    args = f.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            pass
    return f"{OPEN}\n{json.dumps({'name': f['name'], 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def _as_text(messages: List[Dict[str, Any]], tools: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The messages for a template without tools: earlier calls and tool results as text, and the
    tools (if any) described in the system message."""
    out: List[Dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            parts = ([m["content"]] if m.get("content") else []) + [_call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif m["role"] in ("tool", "function"):
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if not tools:
        return out
    text = SYSTEM_TOOLS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


@dataclass
class ChatPrompt:
    prompt: str
    stop: List[str]
    added_special: bool
    tools: List[Dict[str, Any]]  # the tools the model was given (empty: none, or tool_choice "none")
    grammar: Optional[str]  # the tool-call grammar of tool_choice "required" / a named function


def _choice(tool_choice: Any, tools: List[Dict[str, Any]]) -> Tuple[str, List[Dict[str, Any]]]:
    """(mode, tools the output may call): mode "none" | "auto" | "required"."""
    if tool_choice is None:
        return ("auto" if tools else "none"), tools
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ChatError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {tool_choice!r}",
                            "tool_choice")
        if tool_choice != "none" and not tools:
            raise ChatError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
        return tool_choice, tools
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise ChatError(f"tool_choice names the function {name!r}, which is not among the tools "
                        f"({', '.join(t['function']['name'] for t in tools) or 'none given'})", "tool_choice")
    return "required", named


def render(formatter: Any, messages: List[Dict[str, Any]], tools: Optional[List[Dict[str, Any]]] = None,
           tool_choice: Any = None, template_tools: Optional[bool] = None) -> ChatPrompt:
    """The prompt of ``messages`` (already :func:`normalize`\\ d) with ``tools`` and ``tool_choice``."""
    tools = _tools(tools)
    mode, callable_ = _choice(tool_choice, tools)
    given = tools if mode != "none" else []
    toolish = given or any(m.get("tool_calls") or m["role"] in ("tool", "function") for m in messages)
    if toolish and not (supports_tools(formatter) if template_tools is None else template_tools):
        msgs, kw = _as_text(messages, given), {}
    else:
        msgs = [{**m, "content": m.get("content") or ""} for m in messages]
        kw = {"tools": given} if given else {}
    try:
        res = formatter(messages=msgs, **kw)
    except Exception as e:  # noqa: BLE001 - the template's own raise_exception, undefined fields
        raise ChatError(f"messages: the chat template failed: {e}", "messages") from None
    stop = [res.stop] if isinstance(res.stop, str) else list(res.stop or [])
    return ChatPrompt(res.prompt, stop, bool(res.added_special), given,
                      tool_grammar(callable_) if mode == "required" else None)


def tool_grammar(tools: List[Dict[str, Any]]) -> str:
    """GBNF of one call of one of ``tools``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                         "arguments": t["function"]["parameters"]},
                         "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
    if len(tools) == 1:
        schema = schema["anyOf"][0]
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 - the converter's own errors
        raise ChatError(f"tools: a function's parameters cannot be turned into a grammar: {type(e).__name__}: {e}",
                        "tools") from None
    lines = gbnf.splitlines()
    body = [("call ::= " + ln[len("root ::= "):]) if ln.startswith("root ::= ") else ln for ln in lines]
    return "\n".join([f'root ::= "{OPEN}\\n" call "\\n{CLOSE}"', *body]) + "\n"


def parse_tool_calls(text: str) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """(content, tool_calls) of a generated text: each ``<tool_call>`` block whose body is a JSON
    ``{"name", "arguments"}`` becomes a call; a block that is not stays in the content."""
    calls: List[Dict[str, Any]] = []
    content: List[str] = []
    rest = text
    while True:
        i = rest.find(OPEN)
        if i < 0:
            content.append(rest)
            break
        j = rest.find(CLOSE, i)
        body = rest[i + len(OPEN): j if j >= 0 else len(rest)]
        try:
            obj = json.loads(body)
            ok = isinstance(obj, dict) and isinstance(obj.get("name"), str)
        except ValueError:
            ok = False
        if not ok:
            content.append(rest[: (j + len(CLOSE)) if j >= 0 else len(rest)])
        else:
            content.append(rest[:i])
            args = obj.get("arguments", obj.get("parameters", {}))
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": obj["name"],
                                       "arguments": args if isinstance(args, str) else json.dumps(args,
                                                                                                 ensure_ascii=False)}})
        if j < 0:
            break
        rest = rest[j + len(CLOSE):]
    text_out = "".join(content)
    if calls:
        text_out = text_out.strip()
        return (text_out or None), calls
    return text_out, calls


class ToolStream:
    """A chat stream's content deltas for a request with tools: text from a ``<tool_call>`` on
    (or what may start one) is held back; :meth:`finish` gives the rest and the calls."""

    def __init__(self):
        self.text = ""
        self.sent = 0
        self.calling = False

    def push(self, delta: str) -> str:
        """The content to show now, of ``delta`` arriving."""
        self.text += delta
        if self.calling:
            return ""
        i = self.text.find(OPEN, self.sent)
        if i >= 0:
            self.calling = True
            out, self.sent = self.text[self.sent: i], i
            return out
        hold = 0
        for k in range(min(len(OPEN) - 1, len(self.text) - self.sent), 0, -1):
            if self.text.endswith(OPEN[:k]):
                hold = k
                break
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent: end], end
        return out

    def finish(self) -> Tuple[str, List[Dict[str, Any]]]:
        """(content still to show, tool calls) at the end of the stream: with calls, the text
        around them that was not shown yet (stripped), else all that was held back."""
        _, calls = parse_tool_calls(self.text)
        if not calls:
            return self.text[self.sent:], []
        outside, rest = [], self.text[self.sent:]
        while rest:
            i = rest.find(OPEN)
            if i < 0:
                outside.append(rest)
                break
            outside.append(rest[:i])
            j = rest.find(CLOSE, i)
            rest = rest[j + len(CLOSE):] if j >= 0 else ""
        return "".join(outside).strip(), calls
