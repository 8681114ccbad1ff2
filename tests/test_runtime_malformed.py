"""Malformed Otter GGUFs must fail llama_model_load_from_file with an error
log naming the problem (NULL model), and the process must survive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from otter_gguf.format.constants import Keys, gguf_name
from otter_gguf.format.constants import OtterTensor as T
from helpers import Model, rewrite

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_llama_dir, adapter_reward3_dir):
    from otter_gguf_converter.convert import convert
    from otter_gguf_converter.hf_base import convert_hf_base

    d = tmp_path_factory.mktemp("malformed")
    base = convert_hf_base(tiny_llama_dir, d / "base.gguf", outtype="f32")
    return convert(adapter_reward3_dir, base, d / "good.gguf", outtype="f32", progress=False)


U32 = gguf.GGUFValueType.UINT32
I32 = gguf.GGUFValueType.INT32
U64 = gguf.GGUFValueType.UINT64
STR = gguf.GGUFValueType.STRING
ARR = gguf.GGUFValueType.ARRAY


def _q_shape(good):
    r = gguf.GGUFReader(good)
    t = next(t for t in r.tensors if t.name == gguf_name(T.ATTN_Q, 1))
    return np.array(t.data, dtype=np.float32)


CASES = {
    "shape_mismatch": (lambda g: dict(tensors={gguf_name(T.ATTN_Q, 1): _q_shape(g)[:-1]}),
                       f"{gguf_name(T.ATTN_Q, 1)}' has wrong shape"),
    "missing_tensor": (lambda g: dict(drop_tensors={gguf_name(T.FFN_UP, 2)}),
                       gguf_name(T.FFN_UP, 2)),
    "n_out_zero": (lambda g: dict(kv={Keys.Head.OUTPUT_SIZE: (0, U32)}), f"{Keys.Head.OUTPUT_SIZE} = 0"),
    "n_out_absurd": (lambda g: dict(kv={Keys.Head.OUTPUT_SIZE: (1 << 30, U32)}), Keys.Head.OUTPUT_SIZE),
    "n_out_mismatch": (lambda g: dict(kv={Keys.Head.OUTPUT_SIZE: (4, U32)}), "signal_names has 3 entries"),
    "vocab_hash": (lambda g: dict(kv={Keys.Base.VOCAB_HASH: (12345, U64)}), Keys.Base.VOCAB_HASH),
    "fingerprint_d": (lambda g: dict(kv={Keys.Base.EMBEDDING_LENGTH: (512, U32)}), Keys.Base.EMBEDDING_LENGTH),
    "fingerprint_arch": (lambda g: dict(kv={Keys.Base.ARCHITECTURE: ("qwen2", STR)}), Keys.Base.ARCHITECTURE),
    "gqa": (lambda g: dict(kv={Keys.Attention.HEAD_COUNT_KV: (3, U32)}), "head_count_kv = 3"),
    "head_kind": (lambda g: dict(kv={Keys.Head.KIND: ("policy", STR)}), f"{Keys.Head.KIND} = 'policy'"),
    "key_type": (lambda g: dict(kv={Keys.EMBEDDING_LENGTH: (256, I32)}),
                 f"key {Keys.EMBEDDING_LENGTH} has wrong type i32 but expected type u32"),
    "missing_key": (lambda g: dict(drop_kv={Keys.FEED_FORWARD_LENGTH}),
                    f"key not found in model: {Keys.FEED_FORWARD_LENGTH}"),
    "version": (lambda g: dict(kv={Keys.VERSION: (99, U32)}), f"{Keys.VERSION} 99"),
    "no_version": (lambda g: dict(drop_kv={Keys.VERSION}), f"'{Keys.VERSION}' is missing"),
    "matrix_int": (lambda g: dict(tensors={gguf_name(T.ATTN_OUT, 2): np.zeros((256, 512), dtype=np.int32)}),
                   f"{gguf_name(T.ATTN_OUT, 2)}' has type i32"),
    "norm_not_f32": (lambda g: dict(tensors={gguf_name(T.ATTN_NORM, 0): np.ones(256, dtype=np.float16)}),
                     f"{gguf_name(T.ATTN_NORM, 0)}' has type f16, expected f32"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_fails_cleanly(rt, good, tmp_path, case):
    ll, lib, logs = rt
    make, needle = CASES[case]
    bad = rewrite(good, tmp_path / f"{case}.gguf", **make(good))
    del logs[:]
    with pytest.raises(ValueError):
        Model(ll, lib, bad)
    text = "".join(logs)
    assert "error loading model" in text, text[-2000:]
    assert needle in text, f"expected {needle!r} in the error log:\n" + "\n".join(
        line for line in logs if "error" in line.lower())


def test_rewrite_roundtrip_loads(rt, good, tmp_path):
    ll, lib, _ = rt
    m = Model(ll, lib, rewrite(good, tmp_path / "same.gguf"))
    assert m.has_otter and m.n_out == 3
    m.close()


@pytest.mark.parametrize("keep", [0.5, 0.97, 0.9999])
def test_truncated_file(rt, good, tmp_path, keep):
    ll, lib, logs = rt
    data = Path(good).read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    del logs[:]
    size = bad.stat().st_size
    # llama.cpp names the first tensor (file order) whose data runs past the end
    first_cut = next(t.name for t in gguf.GGUFReader(good).tensors if int(t.data_offset) + int(t.n_bytes) > size)
    with pytest.raises(ValueError):
        Model(ll, lib, bad)
    assert f"error loading model: tensor '{first_cut}' data is not within the file bounds, " \
           "model is corrupted or incomplete" in "".join(logs), logs
    assert any(line.startswith("llama_model_load_from_file_impl: failed to load model") for line in logs), logs


def test_base_gguf_still_loads(rt, good):
    ll, lib, _ = rt
    base = Path(good).parent / "base.gguf"
    m = Model(ll, lib, base)
    assert not m.has_otter and m.n_out == 0
    assert lib.llama_model_otter_head_kind(m.ptr) is None
    c = m.context()
    c.decode([5, 6, 7])
    assert c.signals_ith(0) is None  # no side stream: error log, NULL
    c.close()
    m.close()
