"""otter_gguf.io: llama.cpp's quantizer (llama_quantize), its log (llama_log), the random base GGUF (random_base)."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, quants

from otter_gguf.io.llama_log import llama_logs
from otter_gguf.io.llama_quantize import LLAMA_FTYPES, quantize
from otter_gguf.io.random_base import write_random_base
from otter_gguf_converter import ConvertError

pytestmark = pytest.mark.runtime

# every row length (256, 512) a multiple of 256: every type applies without fallbacks
SHAPE = dict(d=256, L=2, h=4, h_kv=2, f=512, V=320)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_random_base(tmp_path_factory.mktemp("rb") / "base-f16.gguf", SHAPE, seed=3)


def _numpy_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(x) for x in reversed(t.shape)) for t in GGUFReader(path).tensors}


def _log_callback_address(ll) -> int | None:
    cb, ud = ll.llama_log_callback(), ctypes.c_void_p()
    ll.llama_log_get(ctypes.byref(cb), ctypes.byref(ud))
    return ctypes.cast(cb, ctypes.c_void_p).value


# ---------------------------------------------------------------- write_random_base

@pytest.mark.unit
def test_random_base_has_the_requested_shape(tmp_path):
    shape = dict(SHAPE, L=3, h_kv=1, f=768, V=400, ctx_train=1024, model_name="shape-check")
    path = write_random_base(tmp_path / "b.gguf", shape, seed=0)
    d, hd = 256, 64
    want = {"token_embd.weight": (400, d), "output_norm.weight": (d,), "output.weight": (400, d)}
    for i in range(3):
        p = f"blk.{i}."
        want.update({p + "attn_norm.weight": (d,), p + "attn_q.weight": (4 * hd, d), p + "attn_k.weight": (hd, d),
                     p + "attn_v.weight": (hd, d), p + "attn_output.weight": (d, 4 * hd),
                     p + "ffn_norm.weight": (d,), p + "ffn_gate.weight": (768, d), p + "ffn_up.weight": (768, d),
                     p + "ffn_down.weight": (d, 768)})
    assert _numpy_shapes(path) == want
    r = GGUFReader(path)
    assert {t.tensor_type for t in r.tensors if len(t.shape) == 2} == {QT.F16}
    assert {t.tensor_type for t in r.tensors if len(t.shape) == 1} == {QT.F32}

    def field(key):
        return r.fields[key].contents()

    assert (field("llama.embedding_length"), field("llama.block_count"), field("llama.feed_forward_length"),
            field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
            field("llama.context_length"), field("general.name")) == (256, 3, 768, 4, 1, 1024, "shape-check")
    toks = field("tokenizer.ggml.tokens")
    assert len(toks) == 400 and toks[:3] == ["<unk>", "<s>", "</s>"] and toks[3] == "<0x00>"
    # the weights are N(0, 0.02)
    w = np.asarray(next(t for t in r.tensors if t.name == "blk.1.ffn_up.weight").data, dtype=np.float32)
    assert abs(float(w.std()) - 0.02) < 0.001 and abs(float(w.mean())) < 0.001
    # deterministic in the seed, and no temporary file left
    assert write_random_base(tmp_path / "same.gguf", shape, seed=0).read_bytes() == path.read_bytes()
    assert write_random_base(tmp_path / "other.gguf", shape, seed=1).read_bytes() != path.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["b.gguf", "other.gguf", "same.gguf"]


@pytest.mark.unit
def test_random_base_needs_the_byte_tokens(tmp_path):
    with pytest.raises(ValueError, match="V=100"):
        write_random_base(tmp_path / "b.gguf", dict(SHAPE, V=100))
    assert os.listdir(tmp_path) == []


def test_random_base_loads_in_llama_cpp(base):
    import llama_cpp

    llm = llama_cpp.Llama(str(base), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        assert (llm.n_embd(), llm.n_vocab(), llama_cpp.llama_model_n_layer(llm.model),
                llama_cpp.llama_model_n_params(llm.model)) == (
            256, 320, 2, sum(int(np.prod(s)) for s in _numpy_shapes(base).values()))
        assert llm.token_bos() == 1 and llm.token_eos() == 2
        llm.eval([1, 300, 301, 302])
        logits = np.asarray(llm.scores[:4])
        assert logits.shape == (4, 320) and np.isfinite(logits).all() and logits.std() > 0
    finally:
        llm.close()


# ---------------------------------------------------------------- quantize

def test_quantize_q8_0(base, tmp_path):
    out = quantize(base, tmp_path / "q8.gguf", "q8_0", threads=1)
    assert out == tmp_path / "q8.gguf" and os.listdir(tmp_path) == ["q8.gguf"]
    rq, rf = GGUFReader(out), GGUFReader(base)
    assert rq.fields["general.file_type"].contents() == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    types = {t.name: t.tensor_type for t in rq.tensors}
    assert types == {t.name: (QT.Q8_0 if len(t.shape) == 2 else QT.F32) for t in rf.tensors}
    # and the values are the f16 source's, to q8_0 precision (~0.5% RMS on Gaussian data)
    src = {t.name: t for t in rf.tensors}
    for t in rq.tensors:
        if t.tensor_type == QT.Q8_0:
            got = quants.dequantize(t.data, t.tensor_type).reshape(-1)
            want = np.asarray(src[t.name].data, dtype=np.float32).reshape(-1)
            rel = float(np.sqrt(np.mean((got - want) ** 2)) / want.std())
            assert 1e-4 < rel < 1e-2, (t.name, rel)


def test_quantize_k_mix_and_overwrite(base, tmp_path):
    dst = tmp_path / "q.gguf"
    dst.write_bytes(b"old")
    quantize(base, dst, "Q4_K_M", threads=1)  # names in any case; dst replaced
    types = {t.name: t.tensor_type for t in GGUFReader(dst).tensors}
    # llama-quantize's q4_k_m mix: Q4_K, with Q6_K for output, attn_v and ffn_down of some layers
    assert types["blk.0.attn_q.weight"] == QT.Q4_K and types["output.weight"] == QT.Q6_K
    assert {types[n] for n in types if n.endswith(("attn_v.weight", "ffn_down.weight"))} <= {QT.Q4_K, QT.Q6_K}
    assert os.listdir(tmp_path) == ["q.gguf"]


@pytest.mark.unit
def test_quantize_unknown_type_is_a_named_error(tmp_path):
    with pytest.raises(ConvertError, match=r"unknown llama.cpp output type 'q9_x'.*q4_k_m"):
        quantize(tmp_path / "any.gguf", tmp_path / "out.gguf", "q9_x")
    assert os.listdir(tmp_path) == []
    assert {"f32", "f16", "bf16", "q8_0", "q4_k_m", "q6_k"} <= set(LLAMA_FTYPES)


def test_failed_quantize_leaves_no_output(base, tmp_path):
    with pytest.raises(ConvertError, match=r"nope\.gguf to q8_0: no such file"):
        quantize(tmp_path / "nope.gguf", tmp_path / "out.gguf", "q8_0")
    with pytest.raises(ConvertError, match="output directory .*missing does not exist"):
        quantize(base, tmp_path / "missing" / "out.gguf", "q8_0")
    # llama.cpp itself fails: the message names the type and shows llama.cpp's error line
    with pytest.raises(ConvertError) as e:
        quantize(base, tmp_path / "out.gguf", 9999, log_level=None)
    msg = str(e.value)
    assert "ftype 9999" in msg and "failed with code" in msg and "invalid output file type 9999" in msg, msg
    # a corrupt source: same, and an existing dst is left as it was
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(base.read_bytes()[:5000])
    (tmp_path / "out.gguf").write_bytes(b"keep")
    with pytest.raises(ConvertError, match=r"bad\.gguf -> q8_0\) failed"):
        quantize(bad, tmp_path / "out.gguf", "q8_0", log_level=None)
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf", "out.gguf"]
    assert (tmp_path / "out.gguf").read_bytes() == b"keep"


# ---------------------------------------------------------------- llama_logs

def test_llama_logs_captures_a_model_load_and_restores(base, caplog):
    import llama_cpp as ll

    before = _log_callback_address(ll)
    assert before
    caplog.set_level(logging.DEBUG, logger="otter_gguf.llama_cpp")
    with llama_logs(log_level=logging.INFO) as lines:
        inside = _log_callback_address(ll)
        model = ll.llama_model_load_from_file(str(base).encode(), ll.llama_model_default_params())
        assert model
        ll.llama_model_free(model)
    assert inside != before and _log_callback_address(ll) == before
    text = "\n".join(lines)
    assert "llama_model_loader" in text and "general.name str" in text and "random-llama-base-f16" in text
    assert all(line and "\n" not in line for line in lines)
    # the same lines went to logging at INFO and above
    logged = [r.getMessage() for r in caplog.records if r.name == "otter_gguf.llama_cpp"]
    assert logged and set(logged) <= set(lines) and any("llama_model_loader" in m for m in logged)


def test_llama_logs_nested_and_filtered(base, tmp_path, caplog):
    import llama_cpp as ll

    before = _log_callback_address(ll)
    caplog.set_level(logging.DEBUG, logger="otter_gguf.llama_cpp")
    with llama_logs(log_level=None) as outer:
        outer_cb = _log_callback_address(ll)
        with llama_logs(level=logging.ERROR, log_level=None) as errors:
            with pytest.raises(ConvertError):
                quantize(base, tmp_path / "x.gguf", 9999, log_level=None)  # a third level inside
            model = ll.llama_model_load_from_file(str(base).encode(), ll.llama_model_default_params())
            ll.llama_model_free(model)
        assert _log_callback_address(ll) == outer_cb  # the inner block gave the outer one back
        model = ll.llama_model_load_from_file(str(base).encode(), ll.llama_model_default_params())
        ll.llama_model_free(model)
    assert _log_callback_address(ll) == before
    assert errors == []  # a clean load logs no error; the quantize error went to quantize's own block
    assert any("llama_model_loader" in line for line in outer)
    assert not [r for r in caplog.records if r.name == "otter_gguf.llama_cpp"]  # log_level=None: quiet
