"""Unit tests of the runtime's parts that need no model and no patched library:
the typed Otter C API declaration (otter_gguf.runtime.capi) against a fake library.
"""

from __future__ import annotations

import ctypes
import inspect
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from otter_gguf.runtime import capi

pytestmark = pytest.mark.unit


class FakeLib(SimpleNamespace):
    """A stand-in for a ctypes.CDLL: attributes are the exported symbols."""

    _name = "/fake/libllama.so"


@pytest.fixture
def fake_lib():
    """Bind capi to a fake library for the test, then back to llama-cpp-python's."""
    libs = []

    def use(**symbols):
        lib = FakeLib(**symbols)
        libs.append(capi._use_library(lib))
        return lib

    yield use
    if libs:
        capi._use_library(libs[0])


def test_capi_declares_the_patch_series_functions_with_their_c_signatures():
    from pathlib import Path

    header = "".join(p.read_text() for p in sorted(Path(__file__).parents[1].glob("patches/000*.patch")))
    declared = {line.split("(")[0].split()[-1].lstrip("*")
                for line in header.splitlines() if line.startswith("+") and "LLAMA_API" in line and "otter" in line}
    assert set(capi.NAMES) == declared and len(capi.NAMES) == 22
    assert capi._DECLARED["llama_adapter_otter_init"] == ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p)
    assert list(inspect.signature(capi.llama_otter_n_out).parameters) == ["ctx"]
    sig = inspect.signature(capi.llama_model_otter_n_out)
    assert list(sig.parameters) == ["model"] and sig.return_annotation == "int"
    assert inspect.signature(capi.llama_otter_series).return_annotation == "bytes"
    assert inspect.signature(capi.llama_model_has_otter).return_annotation == "bool"
    assert list(inspect.signature(capi.llama_get_otter_signals_pos).parameters) == ["ctx", "i"]
    assert capi._DECLARED["llama_model_otter_signal_name"] == ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_char_p)
    assert capi._DECLARED["llama_set_otter"] == ([ctypes.c_void_p, ctypes.c_bool], None)
    assert capi._DECLARED["llama_set_adapters_otter"] == (
        [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t], ctypes.c_int32)
    assert capi._DECLARED["llama_model_get_adapter_otter"] == ([ctypes.c_void_p], ctypes.c_void_p)
    assert capi._DECLARED["llama_get_otter_signals_ith"][1] is ctypes.POINTER(ctypes.c_float)
    assert capi.MODEL_FUNCTIONS == ("llama_model_has_otter", "llama_model_otter_n_out", "llama_model_otter_head_kind",
                                    "llama_model_otter_n_signal_names", "llama_model_otter_signal_name",
                                    "llama_model_get_adapter_otter")


def test_capi_import_loads_no_library():
    code = "import sys; from otter_gguf.runtime import capi; print('llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_capi_binds_lazily_and_sets_the_declared_types(fake_lib):
    calls = []

    def n_out(model):
        calls.append(model)
        return 3

    lib = fake_lib(llama_model_otter_n_out=n_out, llama_otter_series=lambda: b"otter-gguf/abc")
    assert not hasattr(n_out, "argtypes")  # nothing bound before the first call
    assert capi.llama_model_otter_n_out(7) == 3 and calls == [7]
    assert n_out.argtypes == [ctypes.c_void_p] and n_out.restype is ctypes.c_int32
    assert capi.series() == "otter-gguf/abc"
    assert lib.llama_otter_series.restype is ctypes.c_char_p


def test_capi_unpatched_library_names_what_is_missing(fake_lib):
    fake_lib(llama_otter_series=lambda: b"otter-gguf/abc", llama_model_has_otter=lambda m: True)
    assert capi.available("llama_otter_series", "llama_model_has_otter")
    assert not capi.available() and not capi.otter_runtime_available()
    assert capi.missing("llama_model_has_otter", "llama_set_otter") == ["llama_set_otter"]
    with pytest.raises(capi.OtterRuntimeError, match=r"/fake/libllama\.so.*missing llama_set_otter\)"
                                                     r".*otter-gguf build-runtime"):
        capi.llama_set_otter(1, True)
    with pytest.raises(capi.OtterRuntimeError) as e:
        capi.load()
    assert "llama_model_otter_n_out, llama_model_otter_head_kind" in str(e.value)
    assert "llama_otter_series," not in str(e.value)
    capi.require("llama_model_has_otter")  # present: no error
    with pytest.raises(ValueError, match="not an Otter C API function: llama_decode"):
        capi.require("llama_decode")


def test_capi_load_returns_the_typed_module(fake_lib):
    fake_lib(**{n: (lambda *a: 0) for n in capi.NAMES})
    lib = capi.load()
    assert lib is capi and capi.otter_runtime_available()
    assert inspect.signature(lib.llama_model_otter_n_out) == inspect.signature(capi.llama_model_otter_n_out)


# ---------------------------------------------------------------------------
# the signal store (otter_gguf.runtime.signals)
# ---------------------------------------------------------------------------
def _row(*v):
    return np.array(v, dtype=np.float32)


@pytest.mark.parametrize("dense", [True, False])
def test_signal_store_put_get_array_truncate(dense):
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(8, 2, token_head=False, dense=dense)
    st.keep_from = 0  # sparse: keep every row (as for full signals from position 0)
    assert st.dense is dense and st.get(0) is None and st.array(3).shape == (3, 2)
    assert np.isnan(st.array(3)).all()
    st.put(0, _row(1, 2))
    st.put(2, _row(5, 6))
    assert st.get(1) is None and st.get(-1) is None and st.get(8) is None
    np.testing.assert_array_equal(st.get(2), [5, 6])
    arr = st.array(3)
    np.testing.assert_array_equal(arr[[0, 2]], [[1, 2], [5, 6]])
    assert np.isnan(arr[1]).all() and st.hi == 3
    assert st.array(2).shape == (2, 2)  # positions >= n are not part of the array
    st.truncate(1)  # an n_tokens rewind to 1
    assert st.get(2) is None and st.hi == 1 and st.get(0) is not None
    st.truncate(5)  # beyond what was written: nothing happens
    np.testing.assert_array_equal(st.get(0), [1, 2])
    st.truncate(-3)
    assert st.get(0) is None and st.hi == 0


def test_signal_store_token_rewards_are_the_previous_row_at_the_token():
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(6, 4, token_head=True)
    assert st.dense  # 6 x 4 floats
    st.note_token(0, 1)  # position 0 has no previous row
    st.put(0, _row(0.5, 1.5, 2.5, 3.5))
    st.note_token(1, 3)
    st.note_token(2, 0)  # no row at 1 yet
    st.note_token(1, 9)  # outside the row: ignored (the reward of 1 stays)
    assert st.token_reward(0) is None and st.token_reward(1) == 3.5 and st.token_reward(2) is None
    assert st.token_reward(6) is None and st.hi == 2
    st.truncate(1)
    assert st.token_reward(1) is None and st.get(0) is not None
    plain = SignalStore(6, 2, token_head=False)
    plain.put(0, _row(1, 2))
    plain.note_token(1, 1)
    assert plain.token_reward(1) is None and plain.tok_reward is None


def test_signal_store_sparse_keeps_only_the_latest_row_before_keep_from():
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(16, 3, token_head=True, dense=False)
    for p in range(4):
        st.put(p, _row(p, p + 1, p + 2))
    assert sorted(st.rows) == [3]
    st.keep_from = 4
    for p in range(4, 7):
        st.note_token(p, 2)
        st.put(p, _row(10 * p, 10 * p + 1, 10 * p + 2))
    assert sorted(st.rows) == [4, 5, 6]  # 3 < keep_from went when 4 came (after giving 4 its reward)
    assert [st.token_reward(p) for p in (4, 5, 6)] == [5.0, 42.0, 52.0]


def test_signal_store_sparse_holds_the_rows_of_the_last_decode():
    """Speculative decoding samples the rows of one decode (a token and its drafts) one by one, and
    token_reward guidance reads each: with ``hold_from`` (OtterLlama.eval sets it to the decode's first
    position) the rows from there on stay until the next decode."""
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(16, 3, token_head=True, dense=False)
    st.hold_from = 0
    for p in range(3):  # the prompt's decode
        st.put(p, _row(p, p + 1, p + 2))
    assert sorted(st.rows) == [0, 1, 2]
    st.hold_from = 3  # a decode of a token and three drafts
    for p in range(3, 7):
        st.put(p, _row(p, p, p))
    assert sorted(st.rows) == [3, 4, 5, 6] and st.get(4)[0] == 4.0
    st.hold_from = None
    st.put(7, _row(7, 7, 7))
    assert sorted(st.rows) == [7]


@pytest.mark.parametrize("dense", [True, False])
def test_signal_store_snapshot_restore(dense):
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(10, 3, token_head=True, dense=dense)
    st.keep_from = 0
    for p, t in enumerate([2, 0, 1, 2]):
        st.note_token(p, t)
        st.put(p, _row(p, p + 0.25, p + 0.5))
    snap = st.snapshot(3)  # the state holds 3 tokens
    st.truncate(1)
    st.put(1, _row(-1, -1, -1))
    st.put(5, _row(7, 7, 7))
    st.restore(snap)
    assert st.hi == 3 and st.get(3) is None and st.get(5) is None
    np.testing.assert_array_equal(st.array(3), [[0, 0.25, 0.5], [1, 1.25, 1.5], [2, 2.25, 2.5]])
    assert [st.token_reward(p) for p in range(4)] == [None, 0.0, 1.25, None]
    st.put(4, _row(9, 9, 9))  # after restore, writing and truncating works as before
    st.truncate(3)
    assert st.get(4) is None and st.hi == 3


# ---------------------------------------------------------------------------
# completion assembly: the `otter` blocks (otter_gguf.runtime.completion)
# ---------------------------------------------------------------------------
# token id -> bytes; 11 and 12 split the two bytes of "é" (b"\xc3\xa9"); 13 is end-of-generation
PIECES = {10: b"Hi", 11: b" \xc3", 12: b"\xa9!", 13: b"", 14: b" ok"}
EOG = 13


def _detokenize(tokens, prev_tokens=None):
    return b"".join(PIECES[t] for t in tokens)


def _assembler(store, head_kind="reward", names=("alpha", "beta")):
    from otter_gguf.runtime.completion import CompletionAssembler

    return CompletionAssembler(store, head_kind=head_kind, signal_names=list(names), detokenize=_detokenize,
                               is_eog=lambda t: t == EOG)


def _reward_store(prompt_len, rows):
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(32, 2, token_head=False)
    for i, r in enumerate(rows):
        if r is not None:
            st.put(prompt_len + i, _row(*r))
    return st


def test_otter_block_of_a_reward_head():
    from otter_gguf.runtime.completion import CompletionRun

    st = _reward_store(3, [(0.5, -1.0), (1.5, np.nan), None])
    asm = _assembler(st)
    run = CompletionRun(guidance=None, prompt="Say:", prompt_len=3, generated=[10, 11, 12, EOG])
    toks = asm.completion_tokens(run)
    assert toks == [10, 11, 12]  # the final end-of-generation token is not part of the completion
    block = asm.block(run, 0, len(toks))
    assert block == {
        "tokens": [10, 11, 12],
        "token_texts": ["Hi", " ", "!"],  # invalid UTF-8 (half of "é") dropped
        "text_offset": [0, 2, 3],  # in "Hi é!": "é" starts at 3, where token 12 completes it
        "head_kind": "reward",
        "signal_names": ["alpha", "beta"],
        "signals": [[0.5, -1.0], [1.5, None], None],  # NaN -> None; no row -> None
        "rewards": [{"alpha": 0.5, "beta": -1.0}, {"alpha": 1.5, "beta": None}, None],
    }
    # a later block continues the offsets; echo=True counts the prompt's characters
    run2 = CompletionRun(guidance=None, prompt="Say:", echo=True, prompt_len=3, generated=[10, 11, 12, 14])
    assert asm.block(run2, 0, 1)["text_offset"] == [4]
    b2 = asm.block(run2, 1, 3)
    assert b2["text_offset"] == [6, 7, 9] and b2["token_texts"] == [" ", "!", " ok"]
    assert b2["signals"][2] is None and "guidance" not in b2


def test_otter_block_of_a_token_reward_head_and_the_trace():
    from otter_gguf.runtime.completion import CompletionRun
    from otter_gguf.runtime.guidance import Guidance
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(8, 4, token_head=True)
    vocab_rows = {1: _row(0.1, 0.2, 0.3, 0.4), 2: _row(1.1, 1.2, 1.3, 1.4), 3: _row(2.1, 2.2, 2.3, 2.4)}
    st.put(1, vocab_rows[1])  # the last prompt position (prompt_len = 2)
    for p, tok in [(2, 3), (3, 0)]:  # generated tokens 3 then 0, fed at 2 and 3
        st.note_token(p, tok)
        st.put(p, vocab_rows[p])
    global PIECES
    pieces = PIECES
    PIECES = {0: b"a", 3: b"bc"}
    try:
        g = Guidance(mode="dexperts", trace=True).resolve(head_kind="token_reward", n_out=4, signal_names=[],
                                                          n_vocab=4)
        trace = [{"candidates": [3], "chosen": 3}, {"candidates": [0], "chosen": 0}]
        run = CompletionRun(guidance=g, prompt_len=2, generated=[3, 0], trace=trace)
        asm = _assembler(st, "token_reward", [])
        block = asm.block(run, 0, 2)
        assert block["token_rewards"] == pytest.approx([0.4, 1.1])  # row[p - 1][token at p]
        assert block["signals"] is None and "rewards" not in block  # full rows only on request
        assert block["signal_names"] == [] and block["head_kind"] == "token_reward"
        assert block["guidance"] == trace and block["text_offset"] == [0, 2]
        run.full_signals = True
        full = asm.block(run, 1, 1)
        # the full row of the token at p is the head's output after consuming it: row p
        assert full["signals"] == [pytest.approx([2.1, 2.2, 2.3, 2.4])] and full["guidance"] == trace[1:]
    finally:
        PIECES = pieces


def test_record_passes_tokens_through_and_notes_them():
    from otter_gguf.runtime.completion import CompletionRun, record

    run = CompletionRun(guidance=None, trace=[{"candidates": [5, 6]}, {"candidates": [7], "chosen": 9}])
    assert list(record((t for t in [6, 7, 8]), run)) == [6, 7, 8]
    assert run.generated == [6, 7, 8]
    assert run.trace == [{"candidates": [5, 6], "chosen": 6}, {"candidates": [7], "chosen": 9}]
    bad = CompletionRun(guidance=None)
    gen = record((t for t in [1, 2]), bad)
    assert next(gen) == 1
    bad.error = RuntimeError("no Otter signal row for position 4 while guiding")
    with pytest.raises(RuntimeError, match="position 4"):
        next(gen)


class _FakeModel:
    """Streams chunks the way Llama._create_completion does: the chunk of token i is
    yielded when i is sampled, before it is fed (n_tokens = prompt_len + i)."""

    def __init__(self, run, prompt_len, tokens, texts, rows):
        self.run, self.prompt_len, self.n = run, prompt_len, prompt_len
        self.tokens, self.texts, self.rows = tokens, texts, rows
        self.store = _reward_store(prompt_len, [])

    def feed(self, upto):  # eval of the generated tokens before `upto`: their signals
        for i in range(self.n - self.prompt_len, upto):
            self.store.put(self.prompt_len + i, _row(*self.rows[i]))
        self.n = self.prompt_len + upto

    def chunks(self):
        self.run.prompt_len = self.prompt_len
        for i, (tok, text) in enumerate(zip(self.tokens, self.texts)):
            self.feed(i)
            self.run.generated.append(tok)
            if text is not None:
                yield {"choices": [{"text": text, "finish_reason": None, "logprobs": None}]}
        yield {"choices": [{"text": "", "finish_reason": "stop", "logprobs": None}]}

    def result(self):  # not streamed: one result after the whole generation
        for _ in self.chunks():
            pass
        yield {"choices": [{"text": "".join(t for t in self.texts if t), "finish_reason": "stop"}]}

    def finish(self):  # the extra decode of the last completion token
        self.feed(len([t for t in self.tokens if t != EOG]))


@pytest.mark.parametrize("eog", [False, True])
def test_stream_blocks_are_held_until_their_signals_exist_and_add_up(eog):
    from otter_gguf.runtime.completion import CompletionRun

    tokens, texts = [10, 11, 12, 14], ["Hi", None, " é!", " ok"]  # token 11 alone is no text yet
    rows = [(0.1, 0.2), (1.1, 1.2), (2.1, 2.2), (3.1, 3.2)]
    if eog:
        tokens, texts = tokens + [EOG], texts + [None]
    run = CompletionRun(guidance=None, prompt="P")
    model = _FakeModel(run, 5, tokens, texts, rows)
    asm = _assembler(model.store)
    inner = model.chunks()
    seen = []
    for chunk in asm.stream(run, inner, lambda: next(inner), model.finish, lambda: model.n):
        block = chunk["choices"][0]["otter"]
        seen.append((chunk["choices"][0]["text"], block["tokens"], model.n))
        assert asm.last_chunk_block is block
        assert all(s is not None for s in block["signals"])  # never attached before the signals exist
    assert [s[:2] for s in seen] == [("Hi", [10]), (" é!", [11, 12]), (" ok", [14]), ("", [])]
    assert seen[0][2] >= 5 + 1 and seen[1][2] >= 5 + 3  # "Hi" waited for token 10 to be fed
    # the concatenation over the chunks equals the non-streamed block
    run_single = CompletionRun(guidance=None, prompt="P")
    model_single = _FakeModel(run_single, 5, tokens, texts, rows)
    asm_single = _assembler(model_single.store)
    inner_single = model_single.result()
    (result,) = asm_single.single(run_single, inner_single, lambda: next(inner_single), model_single.finish)
    whole = result["choices"][0]["otter"]
    assert asm_single.last_block is whole and whole["tokens"] == [10, 11, 12, 14]
    assert whole["text_offset"] == [0, 2, 3, 5]
    assert whole["rewards"][3] == {"alpha": pytest.approx(3.1), "beta": pytest.approx(3.2)}


def test_stream_assigns_tokens_by_logprobs_and_keeps_unassigned_for_the_final_chunk():
    from otter_gguf.runtime.completion import CompletionRun

    run = CompletionRun(guidance=None, prompt_len=0, generated=[10, 11, 12, 14])
    asm = _assembler(_reward_store(0, [(0, 0)] * 4))
    chunks = iter([{"choices": [{"text": "Hi é", "finish_reason": None, "logprobs": {"tokens": ["Hi", " ", "é"]}}]},
                   {"choices": [{"text": "", "finish_reason": "stop", "logprobs": None}]}])
    got = [c["choices"][0]["otter"]["tokens"] for c in asm.stream(run, (c for c in ()), lambda: next(chunks), lambda: None,
                                                                     lambda: 4)]
    assert got == [[10, 11, 12], [14]]  # the stop-cut token 14 comes with the final chunk


def test_chat_stream_attaches_the_completion_chunk_blocks():
    asm = _assembler(_reward_store(0, []))
    role = {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}
    c1 = {"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}
    c2 = {"choices": [{"delta": {}, "finish_reason": "stop"}]}

    def chunks():
        yield role
        asm.last_chunk_block = {"tokens": [10]}
        yield c1
        yield c2

    out = list(asm.chat_stream(chunks()))
    assert [c["choices"][0]["otter"] for c in out] == [None, {"tokens": [10]}, None]
    assert asm.last_chunk_block is None


# ---------------------------------------------------------------------------
# token_reward guidance as a logits processor (otter_gguf.runtime.guided)
# ---------------------------------------------------------------------------
def test_token_processor_uses_the_row_of_the_last_fed_position():
    from otter_gguf.runtime.completion import CompletionRun
    from otter_gguf.runtime.guidance import Guidance
    from otter_gguf.runtime.guided import token_processor
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(8, 5, token_head=True)
    st.put(2, _row(0.0, 1.0, -1.0, 2.0, 0.5))
    logits = np.array([1.0, 0.5, 3.0, 2.5, -np.inf], dtype=np.float32)
    pos = {"p": 2}
    args = Guidance(weight=2.0, top_k=3, trace=True).resolve(head_kind="token_reward", n_out=5, signal_names=[],
                                                             n_vocab=5)
    run = CompletionRun(guidance=args)
    proc = token_processor(args, run, st, lambda: pos["p"])
    out = proc(np.zeros(3, dtype=np.intc), logits.copy())
    # top 3 by logit: 2 (3.0), 3 (2.5), 0 (1.0) -> 3.0 - 2, 2.5 + 4, 1.0 + 0; the rest -inf
    np.testing.assert_allclose(out[[0, 2, 3]], [1.0, 1.0, 6.5])
    assert np.isneginf(out[[1, 4]]).all()
    assert run.trace == [{"candidates": [2, 3, 0], "logits": [3.0, 2.5, 1.0], "rewards": [-1.0, 2.0, 0.0],
                          "scores": [1.0, 6.5, 1.0]}]
    dex = Guidance(weight=0.5, mode="dexperts").resolve(head_kind="token_reward", n_out=5, signal_names=[],
                                                         n_vocab=5)
    run2 = CompletionRun(guidance=dex)
    out2 = token_processor(dex, run2, st, lambda: pos["p"])(None, logits.copy())
    np.testing.assert_allclose(out2[:4], [1.0, 1.0, 2.5, 3.5])
    assert np.isneginf(out2[4]) and run2.trace == []  # dexperts keeps every token, records no trace
    pos["p"] = 3  # no row there: the logits pass unchanged and the run carries the error
    same = proc(None, logits.copy())
    np.testing.assert_array_equal(same, logits)
    assert isinstance(run.error, RuntimeError) and "position 3" in str(run.error)


# ---------------------------------------------------------------------------
# score() input checks and OtterScore (otter_gguf.runtime.score)
# ---------------------------------------------------------------------------
def test_score_input_checks():
    from otter_gguf.runtime.score import check_tokens, token_ids

    assert token_ids([1, np.int64(7), np.uint16(3)]) == [1, 7, 3]
    for bad in ([1, True], [1, 2.0], ["5"]):
        with pytest.raises(ValueError, match="token ids must be integers"):
            token_ids(bad)
    check_tokens([0, 511], 512, 2)
    with pytest.raises(ValueError, match="nothing to score"):
        check_tokens([], 512, 8)
    with pytest.raises(ValueError, match=r"token id 512 is outside the vocabulary \(valid ids: 0\.\.511\)"):
        check_tokens([3, 512, -1], 512, 8)
    with pytest.raises(ValueError, match="3 tokens exceed the context window n_ctx=2"):
        check_tokens([1, 2, 3], 512, 2)


def test_otter_score_views():
    from otter_gguf.runtime.score import OtterScore

    sig = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -3.0], [7.0, 8.0, 9.0]], dtype=np.float32)
    s = OtterScore(tokens=[2, 0, 1], signals=sig, signal_names=["a", "b", "c"], head_kind="reward")
    np.testing.assert_array_equal(s.rewards["b"], [-1.0, 0.25, 8.0])
    # token_reward view: signals[j - 1][tokens[j]]
    np.testing.assert_array_equal(s.token_rewards[1:], [0.5, 0.25])
    assert np.isnan(s.token_rewards[0])
    assert s.to_dict() == {"tokens": [2, 0, 1], "signals": [[0.5, -1.0, 2.0], [1.5, 0.25, -3.0], [7.0, 8.0, 9.0]],
                           "signal_names": ["a", "b", "c"]}
