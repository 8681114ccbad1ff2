"""Adapter checkpoint: config validation, header validation, I/O round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from otter_gguf.format.adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterError,
    OtterConfig,
    check_against_base,
    load_adapter,
    open_adapter,
    save_adapter,
)
from otter_gguf.format import config as config_mod
from otter_gguf.format.constants import BIAS, HeadKind, hf_name
from otter_gguf.format.constants import OtterTensor as T

pytestmark = pytest.mark.unit


def small_dict(**over):
    d = {
        "otter_version": 1,
        "base_model": "unit-test",
        "base_architecture": "llama",
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "intermediate_size": 32,
        "vocab_size": 40,
        "otter_hidden_size": 8,
        "otter_num_attention_heads": 2,
        "otter_num_key_value_heads": 1,
        "otter_intermediate_size": 16,
        "head_output_size": 1,
        "head_kind": HeadKind.REWARD.value,
        "signal_names": ["reward"],
    }
    d.update(over)
    return d


def small_tensors(cfg: OtterConfig, *, biases=False, seed=0):
    rng = np.random.default_rng(seed)
    shapes = dict(cfg.required_tensor_shapes())
    if biases:
        shapes.update(cfg.optional_tensor_shapes())
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def write_raw(dirpath, cfg_dict, tensors):
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg_dict))
    save_file(tensors, str(dirpath / ADAPTER_WEIGHTS_NAME))
    return dirpath


@pytest.fixture
def good(tmp_path):
    cfg = OtterConfig.from_dict(small_dict())
    t = small_tensors(cfg)
    return write_raw(tmp_path / "ad", small_dict(), t), cfg, t


# ---------------------------------------------------------------- config
def test_config_fields_are_exactly_the_spec_json():
    assert set(OtterConfig.field_names()) == set(small_dict())
    cfg = OtterConfig.from_dict(small_dict())
    assert cfg.to_dict() == small_dict()
    assert list(cfg.to_dict())[0] == "otter_version"


def test_config_save_load_round_trip(tmp_path):
    cfg = OtterConfig.from_dict(small_dict(head_output_size=3, signal_names=["a", "b", "c"]))
    cfg.save(tmp_path)
    assert OtterConfig.load(tmp_path) == cfg
    assert OtterConfig.load(tmp_path / ADAPTER_CONFIG_NAME) == cfg


def test_required_and_optional_shapes_follow_spec():
    cfg = OtterConfig.from_dict(small_dict())
    req = cfg.required_tensor_shapes()
    assert len(req) == 1 + 9 * 2 + 2
    assert req[hf_name(T.TOKEN_EMBD)] == (40, 8)
    assert req[hf_name(T.ATTN_NORM, 1)] == (8,)
    assert req[hf_name(T.ATTN_Q, 0)] == (2 * 8, 16 + 8)
    assert req[hf_name(T.ATTN_K, 0)] == (1 * 8, 24)
    assert req[hf_name(T.ATTN_V, 0)] == (8, 24)
    assert req[hf_name(T.ATTN_OUT, 0)] == (8, (2 + 2) * 8)
    assert req[hf_name(T.FFN_NORM, 1)] == (8,)
    assert req[hf_name(T.FFN_GATE, 1)] == (16, 24)
    assert req[hf_name(T.FFN_UP, 1)] == (16, 24)
    assert req[hf_name(T.FFN_DOWN, 1)] == (8, 32 + 16)
    assert req[hf_name(T.OUTPUT_NORM)] == (8,)
    assert req[hf_name(T.HEAD)] == (1, 24)
    opt = cfg.optional_tensor_shapes()
    assert opt == {
        hf_name(T.ATTN_Q, 0, BIAS): (16,),
        hf_name(T.ATTN_K, 0, BIAS): (8,),
        hf_name(T.ATTN_V, 0, BIAS): (8,),
        hf_name(T.ATTN_Q, 1, BIAS): (16,),
        hf_name(T.ATTN_K, 1, BIAS): (8,),
        hf_name(T.ATTN_V, 1, BIAS): (8,),
        hf_name(T.HEAD, suffix=BIAS): (1,),
    }


def test_adapter_error_is_value_error_and_reexported():
    assert issubclass(AdapterError, ValueError)
    assert AdapterError is config_mod.AdapterError


@pytest.mark.parametrize(
    "over, drop, needles",
    [
        ({}, "head_dim", ["missing", "head_dim"]),
        ({}, "otter_version", ["missing", "otter_version"]),
        ({"lora_rank": 8}, None, ["unknown", "lora_rank"]),
        ({"head_kind": "logits"}, None, ["head_kind", "reward", "token_reward", "'logits'"]),
        ({"signal_names": ["a", "b"]}, None, ["signal_names", "2", "head_output_size", "1"]),
        ({"head_output_size": 2, "signal_names": ["a", "a"]}, None, ["unique", "a"]),
        ({"signal_names": [""]}, None, ["signal_names[0]", "non-empty"]),
        ({"signal_names": [3]}, None, ["signal_names[0]", "3"]),
        ({"otter_num_attention_heads": 6, "otter_num_key_value_heads": 4}, None,
         ["otter_num_attention_heads (6) must be a multiple of otter_num_key_value_heads (4)"]),
        ({"otter_intermediate_size": 0}, None, ["otter_intermediate_size", "positive", "0"]),
        ({"hidden_size": -16}, None, ["hidden_size", "positive", "-16"]),
        ({"otter_hidden_size": "8"}, None, ["otter_hidden_size", "integer", "'8'"]),
        ({"vocab_size": 40.0}, None, ["vocab_size", "integer", "40.0"]),
        ({"num_hidden_layers": True}, None, ["num_hidden_layers", "integer", "True"]),
        ({"otter_version": 2}, None, ["otter_version", "1", "2"]),
        ({"base_architecture": "gpt2"}, None, ["base_architecture", "llama", "qwen2", "'gpt2'"]),
        ({"base_model": None}, None, ["base_model", "string"]),
        ({"head_kind": HeadKind.TOKEN_REWARD.value, "signal_names": [], "head_output_size": 39}, None,
         ["head_output_size (39)", "vocab_size (40)", "token_reward"]),
        ({"head_kind": HeadKind.TOKEN_REWARD.value, "signal_names": ["x"], "head_output_size": 40}, None,
         ["signal_names", "empty", "token_reward"]),
        ({"num_attention_heads": 3, "num_key_value_heads": 2}, None,
         ["num_attention_heads (3)", "num_key_value_heads (2)"]),
    ],
)
def test_config_errors_name_the_problem(tmp_path, over, drop, needles):
    d = small_dict(**over)
    if drop:
        del d[drop]
    with pytest.raises(AdapterError) as ei:
        OtterConfig.from_dict(d)
    msg = str(ei.value)
    assert msg.startswith("otter_config.json: ")
    for n in needles:
        assert n in msg, (n, msg)
    # the same error comes out of open_adapter, prefixed with the file path
    cfg_ok = OtterConfig.from_dict(small_dict())
    ad = write_raw(tmp_path / "ad", d, small_tensors(cfg_ok))
    with pytest.raises(AdapterError) as ei2:
        open_adapter(ad)
    assert str(ad / ADAPTER_CONFIG_NAME) in str(ei2.value)
    assert needles[0] in str(ei2.value)


def test_config_not_json(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / ADAPTER_CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        open_adapter(d)


def test_config_not_an_object():
    with pytest.raises(AdapterError, match="expected a JSON object, found list"):
        OtterConfig.from_dict([1, 2])


def test_token_reward_config_ok():
    cfg = OtterConfig.from_dict(small_dict(head_kind=HeadKind.TOKEN_REWARD.value, head_output_size=40, signal_names=[]))
    assert cfg.required_tensor_shapes()[hf_name(T.HEAD)] == (40, 24)


# ------------------------------------------------------- header validation
def test_open_good_adapter_reads_header_and_values(good):
    path, cfg, t = good
    ad = open_adapter(path)
    assert ad.config == cfg
    assert ad.path == path
    assert set(ad.tensor_names) == set(t)
    # layer order: embedding first, layer 0 before layer 1, head last
    assert ad.tensor_names[0] == hf_name(T.TOKEN_EMBD)
    assert ad.tensor_names[-1] == hf_name(T.HEAD)
    assert ad.tensor_names.index(hf_name(T.FFN_DOWN, 0)) < \
        ad.tensor_names.index(hf_name(T.ATTN_NORM, 1))
    assert ad.shape(hf_name(T.ATTN_OUT, 0)) == (8, 32)
    assert ad.dtype(hf_name(T.OUTPUT_NORM)) == "F32"
    names = []
    for name, arr in ad.iter_numpy():
        names.append(name)
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, t[name])
    assert names == ad.tensor_names
    tt = ad.get_torch(hf_name(T.HEAD), torch.float64)
    assert tt.dtype == torch.float64
    np.testing.assert_array_equal(tt.numpy(), t[hf_name(T.HEAD)].astype(np.float64))
    cfg2, allt = load_adapter(path)
    assert cfg2 == cfg and set(allt) == set(t)
    assert all(v.dtype == torch.float32 for v in allt.values())


def test_missing_tensor(tmp_path):
    cfg = OtterConfig.from_dict(small_dict())
    t = small_tensors(cfg)
    del t[hf_name(T.FFN_UP, 1)]
    ad = write_raw(tmp_path / "ad", small_dict(), t)
    with pytest.raises(AdapterError) as ei:
        open_adapter(ad)
    assert "missing required tensor" in str(ei.value)
    assert hf_name(T.FFN_UP, 1) in str(ei.value)
    assert ADAPTER_WEIGHTS_NAME in str(ei.value)


def test_unexpected_tensor(tmp_path):
    cfg = OtterConfig.from_dict(small_dict())
    t = small_tensors(cfg)
    t["otter.layers.0.self_attn.o_proj.bias"] = np.zeros(8, np.float32)
    t["model.layers.0.input_layernorm.weight"] = np.zeros(16, np.float32)
    ad = write_raw(tmp_path / "ad", small_dict(), t)
    with pytest.raises(AdapterError) as ei:
        open_adapter(ad)
    assert "unexpected tensor" in str(ei.value)
    assert "otter.layers.0.self_attn.o_proj.bias" in str(ei.value)
    assert "model.layers.0.input_layernorm.weight" in str(ei.value)


def test_optional_biases_accepted_and_listed(tmp_path):
    cfg = OtterConfig.from_dict(small_dict())
    t = small_tensors(cfg, biases=True)
    ad = open_adapter(write_raw(tmp_path / "ad", small_dict(), t))
    assert hf_name(T.HEAD, suffix=BIAS) in ad.tensor_names
    i = ad.tensor_names.index
    assert i(hf_name(T.ATTN_Q, 0, BIAS)) < i(hf_name(T.ATTN_OUT, 0))


@pytest.mark.parametrize("name, bad_shape, want", [
    (hf_name(T.ATTN_Q, 0), (16, 16), "[16, 24]"),
    (hf_name(T.HEAD), (24, 1), "[1, 24]"),  # transposed
    (hf_name(T.OUTPUT_NORM), (8, 1), "[8]"),
])
def test_wrong_shape(tmp_path, name, bad_shape, want):
    cfg = OtterConfig.from_dict(small_dict())
    t = small_tensors(cfg)
    t[name] = np.zeros(bad_shape, np.float32)
    ad = write_raw(tmp_path / "ad", small_dict(), t)
    with pytest.raises(AdapterError) as ei:
        open_adapter(ad)
    msg = str(ei.value)
    assert name in msg and f"expected {want}" in msg
    assert "[" + ", ".join(map(str, bad_shape)) + "]" in msg


def test_wrong_bias_shape(tmp_path):
    cfg = OtterConfig.from_dict(small_dict())
    t = small_tensors(cfg, biases=True)
    t[hf_name(T.ATTN_K, 1, BIAS)] = np.zeros(16, np.float32)
    with pytest.raises(AdapterError, match=r"k_proj.bias.*\[16\], expected \[8\]"):
        open_adapter(write_raw(tmp_path / "ad", small_dict(), t))


@pytest.mark.parametrize("np_dtype, st_name", [(np.int32, "I32"), (np.float64, "F64"), (np.int8, "I8")])
def test_wrong_dtype(tmp_path, np_dtype, st_name):
    cfg = OtterConfig.from_dict(small_dict())
    t = small_tensors(cfg)
    t[hf_name(T.FFN_GATE, 0)] = np.ones((16, 24), np_dtype)
    with pytest.raises(AdapterError) as ei:
        open_adapter(write_raw(tmp_path / "ad", small_dict(), t))
    msg = str(ei.value)
    assert hf_name(T.FFN_GATE, 0) in msg
    assert st_name in msg and "F32, F16, BF16" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path, bad):
    cfg = OtterConfig.from_dict(small_dict())
    t = small_tensors(cfg)
    t[hf_name(T.ATTN_V, 1)][3, 5] = bad
    ad = open_adapter(write_raw(tmp_path / "ad", small_dict(), t))  # header is fine
    ad.get_numpy(hf_name(T.ATTN_V, 0))  # other tensors read fine
    with pytest.raises(AdapterError) as ei:
        ad.get_numpy(hf_name(T.ATTN_V, 1))
    msg = str(ei.value)
    assert hf_name(T.ATTN_V, 1) in msg and "non-finite" in msg
    assert ("1 NaN" if np.isnan(bad) else "1 Inf") in msg
    with pytest.raises(AdapterError, match="v_proj.weight"):
        load_adapter(ad.path)
    with pytest.raises(AdapterError, match="v_proj.weight"):
        list(ad.iter_numpy())


def test_non_finite_bf16_raw_path(tmp_path):
    cfg = OtterConfig.from_dict(small_dict())
    t = {n: torch.from_numpy(a) for n, a in small_tensors(cfg).items()}
    t[hf_name(T.OUTPUT_NORM)][2] = float("nan")
    out = tmp_path / "ad"
    out.mkdir()
    cfg.save(out)
    from safetensors.torch import save_file as save_pt
    save_pt({n: v.to(torch.bfloat16) for n, v in t.items()}, str(out / ADAPTER_WEIGHTS_NAME))
    ad = open_adapter(out)
    for use_torch in (True, False):
        with pytest.raises(AdapterError, match="otter.norm.weight.*1 NaN"):
            ad.get_numpy(hf_name(T.OUTPUT_NORM), _use_torch=use_torch)


@pytest.mark.parametrize("keep", [0, 5, 100, -7])
def test_truncated_safetensors(good, keep):
    path, _, _ = good
    w = path / ADAPTER_WEIGHTS_NAME
    data = w.read_bytes()
    w.write_bytes(data[:keep])  # keep < 0: only the tail of the data is cut
    with pytest.raises(AdapterError) as ei:
        open_adapter(path)
    assert str(w) in str(ei.value)
    assert "corrupt or truncated" in str(ei.value)


def test_garbage_safetensors(good):
    path, _, _ = good
    (path / ADAPTER_WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}")
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        open_adapter(path)


def test_missing_directory(tmp_path):
    p = tmp_path / "nope"
    with pytest.raises(AdapterError, match="does not exist") as ei:
        open_adapter(p)
    assert str(p) in str(ei.value)


def test_path_is_a_file(good):
    path, _, _ = good
    with pytest.raises(AdapterError, match="not a directory"):
        open_adapter(path / ADAPTER_WEIGHTS_NAME)


def test_missing_config_file(good):
    path, _, _ = good
    (path / ADAPTER_CONFIG_NAME).unlink()
    with pytest.raises(AdapterError) as ei:
        open_adapter(path)
    assert str(path / ADAPTER_CONFIG_NAME) in str(ei.value)


def test_missing_weights_file(good):
    path, _, _ = good
    (path / ADAPTER_WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError) as ei:
        open_adapter(path)
    assert str(path / ADAPTER_WEIGHTS_NAME) in str(ei.value)


def test_get_unknown_tensor(good):
    ad = open_adapter(good[0])
    with pytest.raises(AdapterError, match="no tensor named 'otter.head.bias'"):
        ad.get_numpy(hf_name(T.HEAD, suffix=BIAS))


# ------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype, st, tol", [
    ("float32", "F32", 0.0),
    ("float16", "F16", 2.0 ** -11),
    ("bfloat16", "BF16", 2.0 ** -8),
])
def test_save_open_round_trip(tmp_path, dtype, st, tol):
    cfg = OtterConfig.from_dict(small_dict(head_output_size=2, signal_names=["x", "y"]))
    t = small_tensors(cfg, biases=True, seed=3)
    torch_t = {n: torch.from_numpy(a) for n, a in t.items()}
    out = save_adapter(tmp_path / "ad", cfg, torch_t, dtype=dtype)
    ad = open_adapter(out)
    assert ad.config == cfg
    assert set(ad.tensor_names) == set(t)
    for n in ad.tensor_names:
        assert ad.dtype(n) == st
        got = ad.get_numpy(n)
        assert got.dtype == np.float32 and got.shape == t[n].shape
        rel = np.abs(got - t[n]) / np.maximum(np.abs(t[n]), 1e-3)
        assert rel.max() <= tol, (n, rel.max())
        if dtype == "float32":
            np.testing.assert_array_equal(got, t[n])
        else:
            assert not np.array_equal(got, t[n])  # really stored narrower
    if dtype == "bfloat16":  # the torch-free widening gives the same bits
        for n in ad.tensor_names:
            np.testing.assert_array_equal(ad.get_numpy(n, _use_torch=False), ad.get_numpy(n))
        # and equals torch's own bf16 rounding
        n = hf_name(T.ATTN_Q, 0)
        np.testing.assert_array_equal(
            ad.get_numpy(n), torch.from_numpy(t[n]).to(torch.bfloat16).float().numpy())


def test_save_numpy_input_and_torch_free_bf16_writer(tmp_path, monkeypatch):
    from otter_gguf.format import adapter as adapter_mod
    cfg = OtterConfig.from_dict(small_dict())
    t = small_tensors(cfg, seed=5)
    monkeypatch.setattr(adapter_mod, "_torch", lambda: None)
    save_adapter(tmp_path / "ad", cfg, t, dtype="bfloat16")
    ad = open_adapter(tmp_path / "ad")
    for n in ad.tensor_names:
        assert ad.dtype(n) == "BF16"
        np.testing.assert_array_equal(
            ad.get_numpy(n), torch.from_numpy(t[n]).to(torch.bfloat16).float().numpy())


def test_save_rejects_bad_input(tmp_path):
    cfg = OtterConfig.from_dict(small_dict())
    t = small_tensors(cfg)
    bad = dict(t)
    bad[hf_name(T.HEAD)] = np.zeros((2, 24), np.float32)
    with pytest.raises(AdapterError, match=r"otter.head.weight.*\[2, 24\], expected \[1, 24\]"):
        save_adapter(tmp_path / "a", cfg, bad)
    bad = dict(t)
    del bad[hf_name(T.OUTPUT_NORM)]
    with pytest.raises(AdapterError, match="missing required tensor.*otter.norm.weight"):
        save_adapter(tmp_path / "b", cfg, bad)
    bad = dict(t)
    bad[hf_name(T.OUTPUT_NORM)] = np.full(8, np.inf, np.float32)
    with pytest.raises(AdapterError, match="otter.norm.weight.*non-finite"):
        save_adapter(tmp_path / "c", cfg, bad)
    bad = dict(t)
    bad[hf_name(T.OUTPUT_NORM)] = np.ones(8, np.int32)
    with pytest.raises(AdapterError, match="otter.norm.weight.*floating"):
        save_adapter(tmp_path / "d", cfg, bad)
    with pytest.raises(AdapterError, match="float64"):
        save_adapter(tmp_path / "e", cfg, t, dtype="float64")
    cfg_bad = OtterConfig.from_dict(small_dict())
    cfg_bad.head_kind = "nope"
    with pytest.raises(AdapterError, match="head_kind"):
        save_adapter(tmp_path / "f", cfg_bad, t)
    assert not any((tmp_path / x).exists() for x in "abcdef")


# ----------------------------------------------------- base fingerprint
def test_check_against_base_lists_every_mismatch():
    cfg = OtterConfig.from_dict(small_dict())
    base = cfg.base_hparams()
    check_against_base(cfg, base)  # equal: fine
    base.update(hidden_size=32, vocab_size=41, base_architecture="qwen2")
    del base["head_dim"]
    with pytest.raises(AdapterError) as ei:
        check_against_base(cfg, base)
    msg = str(ei.value)
    assert "hidden_size: adapter 16, base 32" in msg
    assert "vocab_size: adapter 40, base 41" in msg
    assert "base_architecture: adapter 'llama', base 'qwen2'" in msg
    assert "head_dim: adapter 8, base <missing>" in msg
    assert "num_hidden_layers" not in msg


def test_fixture_adapters_open(adapter_reward1_dir, adapter_reward3_dir, adapter_token_reward_dir,
                               qwen2_adapter_dir):
    a1 = open_adapter(adapter_reward1_dir)
    assert a1.config.signal_names == ["reward"] and hf_name(T.HEAD, suffix=BIAS) not in a1
    a3 = open_adapter(adapter_reward3_dir)
    assert a3.config.signal_names == ["helpfulness", "harmlessness", "honesty"]
    assert set(a3.config.optional_tensor_shapes()) <= set(a3.tensor_names)
    at = open_adapter(adapter_token_reward_dir)
    assert at.config.head_kind == HeadKind.TOKEN_REWARD and at.shape(hf_name(T.HEAD)) == (512, 512)
    aq = open_adapter(qwen2_adapter_dir)
    assert aq.config.base_architecture == "qwen2"
    for a in (a1, a3, at, aq):
        c = a.config
        assert (c.hidden_size + c.otter_hidden_size) % 256 == 0
        assert (c.num_attention_heads + c.otter_num_attention_heads) * c.head_dim % 256 == 0
        assert (c.intermediate_size + c.otter_intermediate_size) % 256 == 0
