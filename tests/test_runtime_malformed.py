"""Malformed Otter GGUFs must fail llama_model_load_from_file with an error
log naming the problem (NULL model), and the process must survive; so must
malformed base hyperparameters / vocabularies of llama, qwen2, qwen3 and gemma3
(loaded in a subprocess: several aborted the pinned llama.cpp before patch 0002)."""

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


# ---------------------------------------------------------------------------
# base-model hyperparameters / vocabulary that reached a GGML_ASSERT / GGML_ABORT or a
# division by zero in the pinned llama.cpp (patches 0001, 0002 make them load errors), and
# their neighbours that already failed cleanly. Each file is
# loaded in a subprocess (model, then a context): it must exit normally with a NULL
# model or context and an error log, not die of a signal.
# ---------------------------------------------------------------------------
_LOAD_CHILD = r"""
import sys, llama_cpp as ll
ll.llama_backend_init()
m = ll.llama_model_load_from_file(sys.argv[1].encode(), ll.llama_model_default_params())
if not m:
    print("RESULT model_null"); sys.exit(0)
cp = ll.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 64, 64, 1, 1
c = ll.llama_init_from_model(m, cp)
print("RESULT ctx_null" if not c else "RESULT loaded")
"""


# name -> (architecture, rewrite() changes, needle in the error log or None)
BASE_CASES = {
    "block_count_0": ("llama", dict(kv={"llama.block_count": (0, U32)}), "llama.block_count = 0 is out of range [1, "),
    "block_count_1000": ("llama", dict(kv={"llama.block_count": (1000, U32)}),
                         "llama.block_count = 1000 is out of range [1, "),
    "nextn_gt_block_count": ("llama", dict(kv={"llama.nextn_predict_layers": (10, U32)}),
                             "llama.nextn_predict_layers = 10 exceeds llama.block_count"),
    "expert_count_huge": ("llama", dict(kv={"llama.expert_count": (100000, U32)}),
                          "invalid expert hyperparameters (too many experts)"),
    "expert_used_without_experts": ("llama", dict(kv={"llama.expert_used_count": (2, U32)}),
                                    "invalid expert hyperparameters (more experts used than there are)"),
    "expert_used_zero": ("llama", dict(kv={"llama.expert_count": (4, U32), "llama.expert_used_count": (0, U32)}),
                         "invalid expert hyperparameters (no expert used)"),
    "expert_groups_without_experts": ("llama", dict(kv={"llama.expert_group_count": (2, U32)}),
                                      "invalid expert hyperparameters (expert groups without experts)"),
    "rope_scaling_type_unknown": ("llama", dict(kv={"llama.rope.scaling.type": ("bogus", STR)}),
                                  "unknown llama.rope.scaling.type 'bogus'"),
    "gemma3_62_layers_head_count_0": ("gemma3", dict(kv={"gemma3.block_count": (62, U32),
                                                         "gemma3.attention.head_count": (0, U32)}),
                                      "gemma3.attention.head_count = 0: gemma3 needs attention heads"),
    "qwen2_rope_dim_not_head_dim": ("qwen2", dict(kv={"qwen2.rope.dimension_count": (32, U32)}),
                                    "invalid n_rot: 32, expected"),
    "qwen3_rope_dim_not_head_dim": ("qwen3", dict(kv={"qwen3.rope.dimension_count": (32, U32)}),
                                    "invalid n_rot: 32, expected"),
    # neighbours that failed cleanly before (regression guards)
    "head_count_array_length": ("llama", dict(kv={"llama.attention.head_count": ([4, 4], ARR, U32)}),
                                "key llama.attention.head_count has wrong array length; expected 4, got 2"),
    "llama_rope_dim_0": ("llama", dict(kv={"llama.rope.dimension_count": (0, U32)}), "invalid n_rot: 0, expected 64"),
    "head_count_0": ("llama", dict(kv={"llama.attention.head_count": (0, U32)}),
                     "tensor 'blk.0.attn_q.weight' has wrong shape"),
    "tokens_not_strings": ("llama", dict(kv={"tokenizer.ggml.tokens": ([1, 2, 3], ARR, I32)}),
                           "invalid gguf type for tokenizer.ggml.tokens"),
    "scores_short": ("llama", dict(kv={"tokenizer.ggml.scores": ([0.0] * 3, ARR, gguf.GGUFValueType.FLOAT32)}),
                     "Index out of array bounds for scores (3 < 512)"),
    "suppress_tokens_int64": ("llama", dict(kv={"tokenizer.ggml.suppress_tokens": ([1], ARR, gguf.GGUFValueType.INT64)}),
                              "invalid gguf type for tokenizer.ggml.suppress_tokens"),
    "gpt2_without_merges": ("llama", dict(kv={"tokenizer.ggml.model": ("gpt2", STR)},
                                          drop_kv={"tokenizer.ggml.merges"}), "cannot find tokenizer merges"),
    "alignment_not_power_of_2": ("llama", dict(kv={"general.alignment": (3, U32)}), "failed to load model from"),
}


@pytest.fixture(scope="module")
def arch_bases(hf_base_gguf, tiny_llama_dir, tiny_qwen2_dir, tiny_qwen3_dir, tiny_gemma3_dir):
    dirs = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "qwen3": tiny_qwen3_dir, "gemma3": tiny_gemma3_dir}
    return lambda arch: hf_base_gguf(dirs[arch], "f32")


@pytest.mark.parametrize("case", sorted(BASE_CASES))
def test_malformed_base_is_a_load_error_not_a_crash(arch_bases, tmp_path, case):
    import subprocess
    import sys

    arch, changes, needle = BASE_CASES[case]
    bad = rewrite(arch_bases(arch), tmp_path / f"{case}.gguf", **changes)
    res = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(bad)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"the load killed the process (status {res.returncode}): {res.stderr[-1500:]}"
    assert "RESULT model_null" in res.stdout or "RESULT ctx_null" in res.stdout, res.stdout
    assert "error" in res.stderr.lower(), res.stderr[-1500:]
    if needle is not None:
        assert needle in res.stderr, res.stderr[-1500:]
