"""otter-gguf serve without a model: a completion's text (stop strings, streamed deltas,
multi-byte characters) and the /metrics text."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit

PIECES = {1: b"He", 2: b"llo", 3: b" wo", 4: b"rld", 5: b"\xe2\x82", 6: b"\xac!", 7: b"STO", 8: b"P"}


def _detok(tokens, prev_tokens=None):
    return b"".join(PIECES[t] for t in tokens)


def _text(stops=()):
    from otter_gguf.server.text import CompletionText

    return CompletionText(_detok, [99], [s.encode() for s in stops])


def test_stop_string_cuts_the_text_and_holds_back_its_prefix():
    t = _text(["STOP"])
    assert [t.add(x) for x in (1, 2, 7)] == [True, True, True]
    assert not t.stopped
    assert t.release(3) == ("Hello", 0, 2)  # "STO" may start the stop: held back
    t.add(8)
    assert t.stopped and t.text == "Hello" and t.tokens == [1, 2, 7, 8]
    assert t.release(4, final=True) == ("", 2, 2)  # the stop's tokens come with the last chunk


def test_first_stop_in_request_order_wins():
    t = _text(["rld", "llo"])
    for x in (1, 2, 3, 4):
        t.add(x)
    assert t.text == "He"  # checked after every token: "llo" completes first
    t2 = _text(["wo", "rld"])
    for x in (1, 2, 3, 4):
        t2.add(x)
    assert t2.text == "Hello "


def test_multibyte_character_skips_end_checks_and_is_released_whole():
    t = _text()
    assert t.add(1) is True
    assert t.add(5) is False  # inside the euro sign: llama-cpp-python skips stop/max_tokens checks
    # half a character is not shown; its token goes with the chunk that took its first byte
    assert t.release(2) == ("He", 0, 2)
    assert t.add(6) is True
    assert t.release(3) == ("\u20ac!", 2, 1)
    assert t.text == "He\u20ac!"


def test_deltas_concatenate_to_the_text():
    t = _text(["xyz"])
    out = []
    for i, x in enumerate((1, 2, 3, 4, 5, 6), 1):
        t.add(x)
        out.append(t.release(i)[0])
    out.append(t.release(6, final=True)[0])
    assert "".join(out) == t.text == "Hello world\u20ac!"


def test_metrics_text_format():
    from otter_gguf.server.metrics import Metrics

    m = Metrics()
    m.counter("requests_total", "requests", endpoint="/v1/completions", status="200")
    m.counter("requests_total", "requests", endpoint="/v1/completions", status="200")
    m.observe("latency_seconds", "latency", 0.3)
    m.gauge("queue_depth", "waiting", lambda: 2)
    m.gauge("tokens_total", "tokens", lambda: 7, kind="counter")
    lines = m.render().splitlines()
    assert 'otter_requests_total{endpoint="/v1/completions",status="200"} 2' in lines
    assert "# TYPE otter_latency_seconds histogram" in lines
    assert 'otter_latency_seconds_bucket{le="0.25"} 0' in lines and 'otter_latency_seconds_bucket{le="0.5"} 1' in lines
    assert 'otter_latency_seconds_bucket{le="+Inf"} 1' in lines and "otter_latency_seconds_count 1" in lines
    assert "otter_queue_depth 2" in lines and "# TYPE otter_tokens_total counter" in lines


def _heads():
    from otter_gguf.runtime.signals import OtterHead

    return [OtterHead("tr", 4, "token_reward", [], 0), OtterHead("r3", 3, "reward", ["a", "b", "c"], 4),
            OtterHead("r1", 1, "reward", ["reward"], 7)]


def test_model_id_names_heads_only_in_the_served_name_form():
    from otter_gguf.server.heads import model_heads

    served = ["m.gguf", "/models/m.gguf"]
    assert model_heads("m.gguf:r1", served) == ["r1"]
    assert model_heads("/models/m.gguf:r1,tr", served) == ["r1", "tr"]
    for other in (None, "", "gpt-4o", "llama3:8b", "m.gguf", "m.gguf:"):
        assert model_heads(other, served) is None, other


def test_head_selection_filters_the_block_and_checks_guidance():
    from otter_gguf.server.heads import select

    heads = _heads()
    with pytest.raises(ValueError, match="unknown head 'nope'; the heads of this server are: tr, r3, r1"):
        select(heads, ["nope"])
    assert select(heads, None).all and select(heads, ["r1", "tr", "r3"]).all
    sel = select(heads, ["r1", "tr"])
    assert sel.chosen == ["tr", "r1"] and sel.signal_names == ["tr/token_reward", "r1/reward"]
    names = ["tr/token_reward", "r3/a", "r3/b", "r3/c", "r1/reward"]
    block = {"tokens": [5, 6], "signal_names": names, "signals": [[0.1, 1, 2, 3, 4], None],
             "rewards": [dict(zip(names, [0.1, 1, 2, 3, 4])), None],
             "signal_rows": [list(range(8)), None]}
    got = sel.block(block)
    assert got["signal_names"] == ["tr/token_reward", "r1/reward"] and got["heads"] == ["tr", "r1"]
    assert got["signals"] == [[0.1, 4], None] and got["rewards"] == [{"tr/token_reward": 0.1, "r1/reward": 4}, None]
    assert got["signal_rows"] == [[0, 1, 2, 3, 7], None] and got["tokens"] == [5, 6]
    assert block["signal_names"] == names  # the engine's block is left as it was
    assert select(heads, ["r1"]).guidance({"top_k": 2}) == {"top_k": 2, "signal": "r1/reward"}
    with pytest.raises(ValueError, match="'r3/a' is not a signal of the request's heads"):
        sel.guidance({"signal": {"r1/reward": 1.0, "r3/a": 1.0}})
    assert sel.guidance({"signal": "tr/token_reward"}) == {"signal": "tr/token_reward"}


# ---------------------------------------------------------------------------
# chat: tools in the prompt, tool calls out of the text
# ---------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
PLAIN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TOOL_TEMPLATE = ("{% if tools %}<|system|>\n<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}"
                 "</tools>\n{% endif %}" + PLAIN_TEMPLATE)


def _formatter(template):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")


def test_tools_go_to_a_template_that_renders_them_else_to_a_system_message():
    from otter_gguf.server import chat

    msgs = chat.normalize([{"role": "user", "content": [{"type": "text", "text": "Weather "},
                                                        {"type": "text", "text": "in Oslo?"}]}])
    assert msgs[0]["content"] == "Weather in Oslo?"
    assert chat.supports_tools(_formatter(TOOL_TEMPLATE)) and not chat.supports_tools(_formatter(PLAIN_TEMPLATE))
    own = chat.render(_formatter(TOOL_TEMPLATE), msgs, TOOLS)
    assert own.prompt.startswith("<|system|>\n<tools>get_weather;</tools>") and own.grammar is None
    sys = chat.render(_formatter(PLAIN_TEMPLATE), msgs, TOOLS)
    assert sys.prompt.startswith("<|system|>\n# Tools") and '"name": "get_weather"' in sys.prompt
    assert "<tool_call>" in sys.prompt and sys.tools == chat._tools(TOOLS)
    none = chat.render(_formatter(PLAIN_TEMPLATE), msgs, TOOLS, "none")
    assert none.prompt == "<|user|>\nWeather in Oslo?\n<|assistant|>\n" and none.tools == []
    named = chat.render(_formatter(PLAIN_TEMPLATE), msgs, TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named.grammar.startswith('root ::= "<tool_call>\\n" call "\\n</tool_call>"')
    assert chat.render(_formatter(PLAIN_TEMPLATE), msgs, TOOLS, "required").grammar == named.grammar
    # a conversation with an earlier call (content null, as clients send it back) and its result
    turn = chat.normalize([msgs[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    p = chat.render(_formatter(PLAIN_TEMPLATE), turn, TOOLS).prompt
    assert '<|assistant|>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in p
    assert "<|user|>\n<tool_response>\nsunny\n</tool_response>" in p


@pytest.mark.parametrize("call,msg", [
    (lambda c: c.normalize([]), "messages is empty"),
    (lambda c: c.normalize([{"role": "robot", "content": "x"}]), "messages[0].role must be one of"),
    (lambda c: c.normalize([{"role": "user", "content": [{"type": "image_url"}]}]), "only text parts"),
    (lambda c: c.normalize([{"role": "user"}]), "messages[0].content is missing"),
    (lambda c: c.render(_formatter(PLAIN_TEMPLATE), [{"role": "user", "content": "x"}], [{"type": "function"}]),
     "tools[0] must be"),
    (lambda c: c.render(_formatter(PLAIN_TEMPLATE), [{"role": "user", "content": "x"}], TOOLS,
                        {"type": "function", "function": {"name": "nope"}}), "names the function 'nope'"),
    (lambda c: c.render(_formatter(PLAIN_TEMPLATE), [{"role": "user", "content": "x"}], None, "required"),
     "tool_choice 'required' needs tools"),
])
def test_bad_chat_requests_name_the_field(call, msg):
    from otter_gguf.server import chat

    with pytest.raises(chat.ChatError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        call(chat)


def test_tool_calls_are_parsed_and_held_back_from_a_stream():
    from otter_gguf.server.chat import ToolStream, parse_tool_calls

    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me look." and len(calls) == 1 and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert parse_tool_calls("no call <tool_call>not json</tool_call>") == \
        ("no call <tool_call>not json</tool_call>", [])
    st = ToolStream()
    shown = [st.push(text[i: i + 3]) for i in range(0, len(text), 3)]
    assert "".join(shown) == "Let me look.\n" and "<" not in "".join(shown)
    rest, calls2 = st.finish()
    assert rest == "" and [c["function"] for c in calls2] == [calls[0]["function"]]
    st = ToolStream()
    assert st.push("a <tool") == "a " and st.push("kit") == "<toolkit"  # held only while it may start a call
    assert st.finish() == ("", [])
    st = ToolStream()  # the stream's end: what push shows now and what finish gives are both shown
    assert st.push("plain") + st.push(" end <tool")  == "plain end " and st.finish() == ("<tool", [])
