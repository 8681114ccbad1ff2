"""otter-gguf convert: round trips, byte-identical base, HF base, bad inputs; the qwen3 and gemma3
adapters (docs/OTTER.md §7, docs/FORMAT.md) in their own section.

The tiny llama base is converted to GGUF once per session (shared with
tests/test_inspect.py through a fixed path under the session's basetemp).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref
from operator import itemgetter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants
from safetensors.numpy import load_file

from otter_gguf.cli import main as cli_main
from otter_gguf.format.adapter import AdapterError, open_adapter
from otter_gguf.format.constants import (
    ARCH_FINGERPRINT_KEYS, BIAS, NORM_TENSORS, HeadKind, Keys, gguf_name, hf_name, parse_gguf_name,
)
from otter_gguf.format.constants import OtterTensor as T
from otter_gguf.io.llama_quantize import quantize
from otter_gguf.io.llama_source import pinned_llama_cpp_source
from otter_gguf_converter import OUTTYPES, convert, gguf_tensor_name, qtypes

# quantized outtypes use ggml's quantizer from the runtime's libggml-base
pytestmark = pytest.mark.runtime

# Relative RMS error (RMS of the difference / std of the tensor) allowed per
# type after dequantization. f32 must be exact. The bounds are ~1.3-2x what
# ggml's quantizers give on Gaussian data (measured: f16 2e-4, bf16 1.7e-3,
# q8_0 5.4e-3, q6_k 1.8e-2, q5_* 3.6-4.3e-2, q4_* 7.1-8.6e-2, q3_k 0.15,
# q2_k 0.30), so a wrong layout (rows swapped, RoPE permutation off) fails.
TOLERANCE = {
    QT.F32: 0.0, QT.F16: 5e-4, QT.BF16: 4e-3, QT.Q8_0: 1e-2, QT.Q6_K: 3e-2,
    QT.Q5_0: 6e-2, QT.Q5_1: 6e-2, QT.Q5_K: 6e-2,
    QT.Q4_0: 0.12, QT.Q4_1: 0.12, QT.Q4_K: 0.12, QT.Q3_K: 0.2, QT.Q2_K: 0.4,
}


@pytest.fixture(scope="session")
def base_gguf(hf_base_gguf, tiny_llama_dir) -> Path:
    return hf_base_gguf(tiny_llama_dir, "f32")


@pytest.fixture(scope="session")
def base_q4_gguf(tmp_path_factory, base_gguf) -> Path:
    """A q4_k_m base GGUF made by llama.cpp's quantizer (llama-quantize's code; needs the runtime)."""
    return quantize(base_gguf, tmp_path_factory.mktemp("q4km") / "base-q4_k_m.gguf", "q4_k_m")


# ---------------------------------------------------------------- helpers


def hf_rows_from_ggml(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation with explicit index arithmetic.

    Within each head of ``hd`` rows, GGML row 2i holds HF row i and row 2i+1
    holds HF row i + hd/2 (rotate-half -> interleaved pairs).
    """
    hd = w.shape[0] // n_head
    src = np.empty(w.shape[0], dtype=np.int64)  # src[hf_row] = ggml_row
    for hh in range(n_head):
        for i in range(hd // 2):
            src[hh * hd + i] = hh * hd + 2 * i
            src[hh * hd + hd // 2 + i] = hh * hd + 2 * i + 1
    return w[src]


def dequant(t) -> np.ndarray:
    shape = tuple(reversed([int(x) for x in t.shape]))
    return np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x.astype(np.float64) - ref) ** 2)) / (ref.std() or 1.0))


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def run_cli(args, **kw):
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False, **kw)


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_adapter_tensors(adapter: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    p = adapter / "otter_model.safetensors"
    t = load_file(str(p))
    edit(t)
    save_file(t, str(p))


def field_bytes(f) -> bytes:
    """Value bytes of a reader field (type tag + payload, key excluded)."""
    return b"".join(bytes(part.tobytes()) for part in f.parts[2:])


def metadata_only_gguf(src: Path, dst: Path, *, set_kv=None, drop=(), rename_arch=None) -> Path:
    """A tensor-less GGUF carrying ``src``'s metadata, with edits (for mismatch tests)."""
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    new_arch = rename_arch or arch
    w = GGUFWriter(dst, new_arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in drop:
            continue
        key = k.replace(f"{arch}.", f"{new_arch}.", 1) if rename_arch and k.startswith(f"{arch}.") else k
        vt = f.types[0]
        sub = f.types[-1] if vt == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vt, sub_type=sub)
    for k, (v, vt) in (set_kv or {}).items():
        w.add_key_value(k, v, vt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ------------------------------------------------------------ round trips


def check_roundtrip(out: Path, adapter_dir: Path, permuted: bool, outtype_tol: QT | None = None):
    ad = open_adapter(adapter_dir)
    cfg = ad.config
    r = GGUFReader(out)
    tensors = {t.name: t for t in r.tensors}
    errors = {}
    for hf in ad.tensor_names:
        name = gguf_tensor_name(hf)
        t = tensors[name]
        ref = ad.get_numpy(hf)
        if ref.ndim == 1:
            assert t.tensor_type == QT.F32, f"{name}: 1-D tensors must stay f32"
        x = dequant(t)
        assert x.shape == ref.shape, name
        if permuted and (".otter_attn_q." in name or ".otter_attn_k." in name):
            n = cfg.otter_num_attention_heads if ".otter_attn_q." in name else cfg.otter_num_key_value_heads
            x = hf_rows_from_ggml(x, n)
        tol = TOLERANCE[t.tensor_type]
        e = rel_err(x, ref)
        if tol == 0.0:
            assert np.array_equal(x, ref), f"{name}: f32 must be exact"
        else:
            assert e <= tol, f"{name} ({t.tensor_type.name}): rel err {e:.4g} > {tol}"
        errors[name] = (t.tensor_type, e)
    return errors


def tensor_types(path: Path) -> dict:
    return {t.name: t.tensor_type for t in GGUFReader(path).tensors}


def otter_tensor_types(path: Path, adapter_dir: Path) -> dict:
    """GGUF name -> type of the adapter's tensors in the Otter GGUF ``path``."""
    names = {gguf_tensor_name(hf) for hf in open_adapter(adapter_dir).tensor_names}
    return {n: t for n, t in tensor_types(path).items() if n in names}


@pytest.fixture(scope="module")
def reward3_converted(tmp_path_factory, base_gguf, adapter_reward3_dir):
    """``reward3_converted(outtype)``: the reward3 adapter converted at ``outtype``, once per module."""
    made: dict = {}

    def make(outtype: str) -> Path:
        if outtype not in made:
            out = tmp_path_factory.mktemp(f"reward3-{outtype}") / "o.gguf"
            made[outtype] = convert(adapter_reward3_dir, base_gguf, out, outtype=outtype, progress=False)
        return made[outtype]

    return make


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_roundtrip_every_outtype(outtype, reward3_converted, adapter_reward3_dir):
    check_roundtrip(reward3_converted(outtype), adapter_reward3_dir, permuted=True)


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_head_type_every_outtype(outtype, reward3_converted, adapter_reward3_dir):
    head = otter_tensor_types(reward3_converted(outtype), adapter_reward3_dir)[gguf_name(T.HEAD)]
    if outtype in ("f32", "f16", "bf16", "q8_0"):
        assert head == QT[outtype.upper()]
    else:
        assert head == QT.Q8_0, "the head defaults to at least q8_0"


PLAIN_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


@pytest.mark.parametrize("outtype", PLAIN_OUTTYPES)
def test_plain_outtype_is_every_matrix_type(outtype, reward3_converted, adapter_reward3_dir):
    types = otter_tensor_types(reward3_converted(outtype), adapter_reward3_dir)
    mats = {t for n, t in types.items() if n != gguf_name(T.HEAD) and not n.endswith("norm.weight")
            and not n.endswith(".bias")}
    assert mats == {QT[outtype.upper()]}


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_adapter_biases_are_written_every_outtype(outtype, reward3_converted, adapter_reward3_dir):
    types = otter_tensor_types(reward3_converted(outtype), adapter_reward3_dir)
    # the adapter biases (reward3 has q/k/v and head biases) made it through
    assert gguf_name(T.ATTN_Q, 0, BIAS) in types and gguf_name(T.HEAD, suffix=BIAS) in types


# L=4: use_more_bits is true for layers 2 and 3; see docs/FORMAT.md
MIX_TYPES = {
    "q4_k_m": {
        **{gguf_name(T.ATTN_V, i): q for i, q in enumerate([QT.Q4_K, QT.Q4_K, QT.Q6_K, QT.Q6_K])},
        **{gguf_name(T.FFN_DOWN, i): q for i, q in enumerate([QT.Q4_K, QT.Q4_K, QT.Q6_K, QT.Q6_K])},
        gguf_name(T.ATTN_Q, 0): QT.Q4_K, gguf_name(T.TOKEN_EMBD): QT.Q4_K,
    },
    "q3_k_m": {
        **{gguf_name(T.ATTN_V, i): q for i, q in enumerate([QT.Q5_K, QT.Q5_K, QT.Q4_K, QT.Q4_K])},
        gguf_name(T.FFN_DOWN, 3): QT.Q4_K, gguf_name(T.ATTN_OUT, 1): QT.Q4_K, gguf_name(T.FFN_UP, 1): QT.Q3_K,
    },
}


@pytest.mark.parametrize("outtype", MIX_TYPES)
def test_mix_types_follow_llama_quantize(outtype, base_gguf, adapter_reward1_dir, tmp_path):
    """L=4: use_more_bits is true for layers 2 and 3; see docs/FORMAT.md."""
    out = convert(adapter_reward1_dir, base_gguf, tmp_path / f"{outtype}.gguf", outtype=outtype, progress=False)
    t, want = tensor_types(out), MIX_TYPES[outtype]
    assert {n: t[n] for n in want} == want


def test_head_type_option(base_gguf, adapter_reward1_dir, tmp_path):
    out = tmp_path / "o.gguf"
    r = run_cli(["convert", adapter_reward1_dir, "--base", base_gguf, "-o", out, "--outtype", "q4_0",
                 "--head-type", "q4_0", "--no-progress"])
    assert r.exit_code == 0, r.output
    t = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert t[gguf_name(T.HEAD)] == QT.Q4_0 and t[gguf_name(T.ATTN_Q, 0)] == QT.Q4_0


@pytest.fixture(scope="module")
def token_reward_f16(tmp_path_factory, base_gguf, adapter_token_reward_dir) -> Path:
    out = tmp_path_factory.mktemp("token-reward-f16") / "o.gguf"
    return convert(adapter_token_reward_dir, base_gguf, out, outtype="f16", progress=False)


def test_token_reward_roundtrip(token_reward_f16, adapter_token_reward_dir):
    check_roundtrip(token_reward_f16, adapter_token_reward_dir, permuted=True)


def test_token_reward_metadata(token_reward_f16):
    f = GGUFReader(token_reward_f16).fields
    assert f[Keys.Head.KIND].contents() == HeadKind.TOKEN_REWARD
    assert f[Keys.Head.OUTPUT_SIZE].contents() == 512
    assert f[Keys.Head.SIGNAL_NAMES].contents() == []
    assert f[Keys.Head.SIGNAL_NAMES].parts[3][0] == GGUFValueType.STRING  # element type of the empty array


U32, STR = GGUFValueType.UINT32, GGUFValueType.STRING
# (key, GGUF type, value: a literal or a function of the adapter's otter_config.json)
OTTER_METADATA = [
    (Keys.VERSION, U32, 1),
    (Keys.BASE_MODEL, STR, itemgetter("base_model")),
    (Keys.EMBEDDING_LENGTH, U32, itemgetter("otter_hidden_size")),
    (Keys.Attention.HEAD_COUNT, U32, itemgetter("otter_num_attention_heads")),
    (Keys.Attention.HEAD_COUNT_KV, U32, itemgetter("otter_num_key_value_heads")),
    (Keys.FEED_FORWARD_LENGTH, U32, itemgetter("otter_intermediate_size")),
    (Keys.Head.OUTPUT_SIZE, U32, itemgetter("head_output_size")),
    (Keys.Head.KIND, STR, HeadKind.REWARD),
    (Keys.Head.SIGNAL_NAMES, GGUFValueType.ARRAY, itemgetter("signal_names")),
    (Keys.Base.ARCHITECTURE, STR, "llama"),
    (Keys.Base.EMBEDDING_LENGTH, U32, 256),
    (Keys.Base.BLOCK_COUNT, U32, 4),
    (Keys.Base.ATTENTION_HEAD_COUNT, U32, 4),
    (Keys.Base.ATTENTION_HEAD_COUNT_KV, U32, 2),
    (Keys.Base.ATTENTION_KEY_LENGTH, U32, 64),
    (Keys.Base.FEED_FORWARD_LENGTH, U32, 768),
    (Keys.Base.VOCAB_SIZE, U32, 512),
]


@pytest.fixture(scope="module")
def reward3_q8_fields(reward3_converted):
    return GGUFReader(reward3_converted("q8_0")).fields


@pytest.mark.parametrize("key,vtype,want", OTTER_METADATA, ids=[m[0] for m in OTTER_METADATA])
def test_otter_metadata(key, vtype, want, reward3_q8_fields, adapter_reward3_dir):
    cfg = json.loads((adapter_reward3_dir / "otter_config.json").read_text())
    f = reward3_q8_fields[key]
    assert f.types[0] == vtype, key
    assert f.contents() == (want(cfg) if callable(want) else want)


def test_otter_vocab_fingerprint(reward3_q8_fields):
    # FNV-1a 64 recomputed here from the definition in docs/FORMAT.md
    toks = reward3_q8_fields["tokenizer.ggml.tokens"]
    h = 0xCBF29CE484222325
    for i in toks.data:
        for b in bytes(toks.parts[i]) + b"\x00":
            h = ((h ^ b) * 0x100000001B3) % (1 << 64)
    f = reward3_q8_fields[Keys.Base.VOCAB_HASH]
    assert f.types[0] == GGUFValueType.UINT64
    assert f.contents() == h


def test_qwen2_is_not_permuted(hf_base_gguf, tiny_qwen2_dir, qwen2_adapter_dir, tmp_path):
    base = hf_base_gguf(tiny_qwen2_dir, "f32")
    out = convert(qwen2_adapter_dir, base, tmp_path / "o.gguf", outtype="f32", progress=False)
    check_roundtrip(out, qwen2_adapter_dir, permuted=False)


@pytest.fixture(scope="module")
def odd_width_adapter(tmp_path_factory) -> Path:
    """d2=100: rows of d+d2=356 fit no quant block (-> f16); f+f2=896 fits 32 but not 256 (q4_k -> q5_0)."""
    from otter_gguf.format.adapter import save_adapter
    from otter_gguf.format.config import OtterConfig

    cfg = OtterConfig(
        base_model="tiny", base_architecture="llama", hidden_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=768, vocab_size=512,
        otter_hidden_size=100, otter_num_attention_heads=4, otter_num_key_value_heads=1,
        otter_intermediate_size=128, head_output_size=1, head_kind=HeadKind.REWARD.value, signal_names=["r"])
    g = np.random.default_rng(0)
    return save_adapter(tmp_path_factory.mktemp("odd-width") / "ad", cfg,
                        {n: g.standard_normal(s).astype(np.float32) for n, s in cfg.required_tensor_shapes().items()})


@pytest.fixture(scope="module")
def odd_width_q4_k(tmp_path_factory, base_gguf, odd_width_adapter) -> Path:
    out = tmp_path_factory.mktemp("odd-width-q4_k") / "o.gguf"
    return convert(odd_width_adapter, base_gguf, out, outtype="q4_k", progress=False)


def test_block_size_fallback_one_warning(base_gguf, odd_width_adapter, tmp_path, capfd):
    capfd.readouterr()
    convert(odd_width_adapter, base_gguf, tmp_path / "o.gguf", outtype="q4_k", progress=False)
    err = capfd.readouterr().err
    warn = [ln for ln in err.splitlines() if "fall back" in ln]
    assert len(warn) == 1, err
    assert gguf_name(T.ATTN_Q, 0) in warn[0] and gguf_name(T.FFN_DOWN, 3) in warn[0]


def test_block_size_fallback_types(odd_width_q4_k):
    t = tensor_types(odd_width_q4_k)
    assert t[gguf_name(T.ATTN_Q, 0)] == QT.F16          # ne0 356
    assert t[gguf_name(T.FFN_DOWN, 0)] == QT.Q5_0       # ne0 896
    assert t[gguf_name(T.ATTN_OUT, 0)] == QT.Q4_K    # ne0 (4+4)*64 = 512 fits


def test_block_size_fallback_roundtrip(odd_width_q4_k, odd_width_adapter):
    check_roundtrip(odd_width_q4_k, odd_width_adapter, permuted=True)


def test_streams_one_adapter_tensor_at_a_time(base_gguf, adapter_reward1_dir, tmp_path, monkeypatch):
    from otter_gguf.format import adapter as adapter_mod

    live: list[weakref.ref] = []
    peak = [0]
    orig = adapter_mod.OtterAdapter.get_numpy

    def spy(self, name, **kw):
        arr = orig(self, name, **kw)
        alive = sum(1 for r in live if r() is not None)
        peak[0] = max(peak[0], alive + 1)
        live.append(weakref.ref(arr))
        return arr

    monkeypatch.setattr(adapter_mod.OtterAdapter, "get_numpy", spy)
    convert(adapter_reward1_dir, base_gguf, tmp_path / "o.gguf", outtype="q4_k", progress=False)
    assert len(live) == len(open_adapter(adapter_reward1_dir).tensor_names)
    assert peak[0] == 1, f"{peak[0]} adapter tensors were alive at once"


# ------------------------------------------------------------ base identity


def assert_base_identical(out: Path, base: Path) -> None:
    ro, rb = GGUFReader(out), GGUFReader(base)
    assert ro.alignment == rb.alignment
    bkeys = [k for k in rb.fields if not k.startswith("GGUF.")]
    okeys = [k for k in ro.fields if not k.startswith("GGUF.")]
    assert okeys[: len(bkeys)] == bkeys, "base metadata keys must come first, in the base's order"
    assert all(k.startswith("otter.") for k in okeys[len(bkeys):])
    for k in bkeys:
        assert ro.fields[k].types == rb.fields[k].types, k
        assert field_bytes(ro.fields[k]) == field_bytes(rb.fields[k]), k
    bt, ot = rb.tensors, ro.tensors
    assert [t.name for t in ot[: len(bt)]] == [t.name for t in bt], "base tensors first, in order"
    assert all("otter_" in t.name for t in ot[len(bt):])
    for a, b in zip(ot, bt):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert a.n_bytes == b.n_bytes
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name


def test_base_tensors_and_metadata_byte_identical(base_gguf, adapter_reward1_dir, tmp_path):
    out = convert(adapter_reward1_dir, base_gguf, tmp_path / "o.gguf", outtype="q4_k_m", progress=False)
    assert_base_identical(out, base_gguf)


@pytest.fixture(scope="module")
def on_q4_base(tmp_path_factory, base_q4_gguf, adapter_reward1_dir) -> Path:
    """reward1 converted at q8_0 onto the q4_k_m base."""
    rb = GGUFReader(base_q4_gguf)
    assert {t.tensor_type for t in rb.tensors} >= {QT.Q4_K, QT.Q6_K}, "a q4_k_m base"
    out = tmp_path_factory.mktemp("on-q4-base") / "o.gguf"
    return convert(adapter_reward1_dir, base_q4_gguf, out, outtype="q8_0", progress=False)


def test_quantized_base_byte_identical(on_q4_base, base_q4_gguf):
    assert_base_identical(on_q4_base, base_q4_gguf)


def test_quantized_base_fingerprint_from_its_metadata(on_q4_base):
    # the fingerprint comes from the (quantized) base's own metadata
    assert GGUFReader(on_q4_base).fields[Keys.Base.VOCAB_SIZE].contents() == 512


@pytest.fixture(scope="module")
def aligned_64(tmp_path_factory, base_gguf, adapter_reward1_dir) -> Path:
    """reward1 converted at q4_0 onto a base with general.alignment = 64."""
    d = tmp_path_factory.mktemp("aligned-64")
    base = metadata_only_gguf(base_gguf, d / "base.gguf",
                              set_kv={"general.alignment": (64, GGUFValueType.UINT32)})
    return convert(adapter_reward1_dir, base, d / "o.gguf", outtype="q4_0", progress=False)


def test_custom_alignment_is_kept(aligned_64):
    r = GGUFReader(aligned_64)
    assert r.alignment == 64 and r.fields["general.alignment"].contents() == 64
    assert r.data_offset % 64 == 0 and all((t.data_offset - r.data_offset) % 64 == 0 for t in r.tensors)


def test_custom_alignment_roundtrip(aligned_64, adapter_reward1_dir):
    check_roundtrip(aligned_64, adapter_reward1_dir, permuted=True)


def test_split_gguf_is_refused(base_gguf, adapter_reward1_dir, tmp_path):
    base = metadata_only_gguf(base_gguf, tmp_path / "base-00001-of-00002.gguf",
                              set_kv={"split.count": (2, GGUFValueType.UINT16)})
    _expect_user_error([adapter_reward1_dir, "--base", base], tmp_path, "split GGUF", "--merge")


def test_hf_base_mismatch_found_before_converting(tiny_llama_dir, adapter_reward1_dir, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 6
    (hf / "config.json").write_text(json.dumps(cfg))  # no weights: conversion would fail, the check comes first
    _expect_user_error([adapter_reward1_dir, "--base", hf], tmp_path, "config.json", "num_hidden_layers",
                       "adapter 4, base 6")


@pytest.fixture(scope="module")
def direct_base_gguf(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny llama converted by llama.cpp's convert_hf_to_gguf.py run by hand (f32)."""
    direct = tmp_path_factory.mktemp("direct") / "direct.gguf"
    script = pinned_llama_cpp_source() / "convert_hf_to_gguf.py"
    res = subprocess.run([sys.executable, str(script), str(tiny_llama_dir), "--outfile", str(direct),
                          "--outtype", "f32"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return direct


@pytest.fixture(scope="module")
def hf_base_cli(tmp_path_factory, tiny_llama_dir, adapter_reward1_dir):
    """(output dir, Otter GGUF, CLI result) of `convert --base HF_DIR --base-outtype q4_0`:
    an HF base through the CLI, quantized after conversion by llama_model_quantize."""
    d = tmp_path_factory.mktemp("hf-base-cli")
    out = d / "o.gguf"
    r = run_cli(["convert", adapter_reward1_dir, "--base", tiny_llama_dir, "--base-outtype", "q4_0",
                 "-o", out, "--outtype", "q8_0", "--no-progress"])
    return d, out, r


def test_hf_base_equals_convert_hf_to_gguf(base_gguf, direct_base_gguf):
    """convert_hf_base == llama.cpp's convert_hf_to_gguf.py run by hand, byte for byte."""
    assert direct_base_gguf.read_bytes() == base_gguf.read_bytes()


def test_hf_base_cli_succeeds_without_temporary_files(hf_base_cli):
    d, _, r = hf_base_cli
    assert r.exit_code == 0, r.output
    assert listing(d) == ["o.gguf"], "no temporary files left"


def test_hf_base_cli_carries_the_converted_base_tensors(hf_base_cli, direct_base_gguf):
    ro, rd = GGUFReader(hf_base_cli[1]), GGUFReader(direct_base_gguf)
    n = len(rd.tensors)
    assert sorted(t.name for t in ro.tensors[:n]) == sorted(t.name for t in rd.tensors)  # llama-quantize reorders


def test_hf_base_cli_base_quantized_by_llama_quantize(hf_base_cli, direct_base_gguf):
    ro, n = GGUFReader(hf_base_cli[1]), len(GGUFReader(direct_base_gguf).tensors)
    assert {t.tensor_type for t in ro.tensors[:n]} == {QT.Q4_0, QT.Q6_K, QT.F32}  # llama-quantize's Q4_0 mix
    assert ro.fields["general.file_type"].contents() == 2  # LLAMA_FTYPE_MOSTLY_Q4_0


def test_hf_base_cli_keeps_the_tokens(hf_base_cli, direct_base_gguf):
    ro, rd = GGUFReader(hf_base_cli[1]), GGUFReader(direct_base_gguf)
    assert ro.fields["tokenizer.ggml.tokens"].contents() == rd.fields["tokenizer.ggml.tokens"].contents()


def test_hf_base_cli_roundtrip(hf_base_cli, adapter_reward1_dir):
    check_roundtrip(hf_base_cli[1], adapter_reward1_dir, permuted=True)


@pytest.mark.parametrize("proj,n_head", [("q", 4), ("k", 2)])
def test_hf_base_rows_are_llama_permuted(proj, n_head, direct_base_gguf, tiny_llama_dir):
    """The base fixture's own Q/K rows are llama.cpp-permuted exactly like hf_rows_from_ggml undoes."""
    from safetensors.numpy import load_file

    hf = load_file(str(tiny_llama_dir / "model.safetensors"))
    t = {t.name: t for t in GGUFReader(direct_base_gguf).tensors}[f"blk.1.attn_{proj}.weight"]
    assert np.array_equal(hf_rows_from_ggml(dequant(t), n_head), hf[f"model.layers.1.self_attn.{proj}_proj.weight"])


# ------------------------------------------------------------ CLI, errors


@pytest.fixture(scope="module")
def cli_with_progress(tmp_path_factory, base_gguf, adapter_reward1_dir):
    """(output dir, Otter GGUF, CLI result) of a convert with the progress bar."""
    d = tmp_path_factory.mktemp("cli-progress")
    out = d / "o.gguf"
    r = CliRunner().invoke(cli_main, ["convert", str(adapter_reward1_dir), "--base", str(base_gguf), "-o", str(out),
                                      "--outtype", "q6_k"])
    return d, out, r


def test_cli_success_writes_only_the_output(cli_with_progress):
    d, _, r = cli_with_progress
    assert r.exit_code == 0, r.output
    assert listing(d) == ["o.gguf"]


def test_cli_progress_names_the_tensors(cli_with_progress):
    r = cli_with_progress[2]
    assert gguf_name(T.HEAD) in r.stderr  # the progress bar names tensors with their sizes


def test_cli_output_is_not_private(cli_with_progress):
    out = cli_with_progress[1]
    assert oct(out.stat().st_mode & 0o777) != oct(0o600), "not the temp file's private mode"


def _expect_user_error(args, tmp_path, *needles, out_dir=None):
    out_dir = out_dir or tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = listing(out_dir)
    r = run_cli(["convert", *args, "-o", out_dir / "o.gguf", "--no-progress"])
    assert r.exit_code == 2, (r.exit_code, r.output)
    msg = r.output
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert listing(out_dir) == before, "no output and no temp file may remain"
    return msg


@pytest.mark.parametrize("missing", ["otter_model.safetensors", "otter_config.json"])
def test_missing_adapter_file(missing, base_gguf, adapter_reward1_dir, tmp_path):
    ad = copy_adapter(adapter_reward1_dir, tmp_path / "ad")
    (ad / missing).unlink()
    _expect_user_error([ad, "--base", base_gguf], tmp_path, missing, "missing")


def test_unknown_outtype(base_gguf, adapter_reward1_dir, tmp_path):
    _expect_user_error([adapter_reward1_dir, "--base", base_gguf, "--outtype", "q7_k"], tmp_path, "q7_k", "q4_k_m")


def test_missing_adapter_dir(base_gguf, tmp_path):
    _expect_user_error([tmp_path / "nope", "--base", base_gguf], tmp_path, "does not exist")


def test_wrong_tensor_shape(base_gguf, adapter_reward1_dir, tmp_path):
    ad = copy_adapter(adapter_reward1_dir, tmp_path / "ad")

    def edit(t):
        t[hf_name(T.ATTN_Q, 1)] = np.zeros((256, 500), np.float32)

    rewrite_adapter_tensors(ad, edit)
    _expect_user_error([ad, "--base", base_gguf], tmp_path, hf_name(T.ATTN_Q, 1),
                       "[256, 500]", "[256, 512]")


def test_nan_weight_leaves_nothing(base_gguf, adapter_reward1_dir, tmp_path):
    ad = copy_adapter(adapter_reward1_dir, tmp_path / "ad")

    def edit(t):
        t[hf_name(T.HEAD)][0, 3] = np.nan  # the last tensor written: the temp file exists by then

    rewrite_adapter_tensors(ad, edit)
    _expect_user_error([ad, "--base", base_gguf, "--outtype", "q8_0"], tmp_path, hf_name(T.HEAD), "NaN")


def test_truncated_safetensors(base_gguf, adapter_reward1_dir, tmp_path):
    ad = copy_adapter(adapter_reward1_dir, tmp_path / "ad")
    p = ad / "otter_model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    _expect_user_error([ad, "--base", base_gguf], tmp_path, "otter_model.safetensors")


BASE_FIELDS = [
    # (OtterConfig field, edit of the base metadata, adapter value, base value)
    ("base_architecture", dict(rename_arch="qwen2"), "'llama'", "'qwen2'"),
    ("hidden_size", dict(set_kv={"llama.embedding_length": (320, GGUFValueType.UINT32)}), "256", "320"),
    ("num_hidden_layers", dict(set_kv={"llama.block_count": (5, GGUFValueType.UINT32)}), "4", "5"),
    ("num_attention_heads", dict(set_kv={"llama.attention.head_count": (8, GGUFValueType.UINT32),
                                         "llama.attention.key_length": (64, GGUFValueType.UINT32)}), "4", "8"),
    ("num_key_value_heads", dict(set_kv={"llama.attention.head_count_kv": (4, GGUFValueType.UINT32)}), "2", "4"),
    ("head_dim", dict(set_kv={"llama.attention.key_length": (32, GGUFValueType.UINT32)}), "64", "32"),
    ("intermediate_size", dict(set_kv={"llama.feed_forward_length": (1024, GGUFValueType.UINT32)}), "768", "1024"),
]


@pytest.mark.parametrize("field,edit,want,have", BASE_FIELDS, ids=[f[0] for f in BASE_FIELDS])
def test_base_mismatch_each_field(field, edit, want, have, base_gguf, adapter_reward1_dir, tmp_path):
    base = metadata_only_gguf(base_gguf, tmp_path / "base.gguf", **edit)
    msg = _expect_user_error([adapter_reward1_dir, "--base", base], tmp_path, field, want, have)
    assert msg.count("adapter ") >= 1


def test_base_mismatch_vocab(base_gguf, adapter_reward1_dir, tmp_path):
    r = GGUFReader(base_gguf)
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    base = metadata_only_gguf(base_gguf, tmp_path / "base.gguf", drop=("tokenizer.ggml.tokens",),
                              set_kv={"tokenizer.ggml.tokens": (toks[:500], GGUFValueType.ARRAY)})
    _expect_user_error([adapter_reward1_dir, "--base", base], tmp_path, "vocab_size", "512", "500")


def test_unsupported_architecture_gguf(base_gguf, adapter_reward1_dir, tmp_path):
    base = metadata_only_gguf(base_gguf, tmp_path / "base.gguf", rename_arch="gpt2")
    _expect_user_error([adapter_reward1_dir, "--base", base], tmp_path, "'gpt2'", "llama", "qwen2")


def test_unsupported_architecture_hf(tiny_llama_dir, adapter_reward1_dir, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (hf / "config.json").write_text(json.dumps(cfg))
    _expect_user_error([adapter_reward1_dir, "--base", hf], tmp_path, "GPT2LMHeadModel", "LlamaForCausalLM")


BAD_BASES = {
    # case: (make the bad base in tmp_path from the good one, message)
    "not-gguf": (lambda tmp, good: _write(tmp / "bad.gguf", b"not a gguf at all" * 10), "not a GGUF file"),
    "truncated": (lambda tmp, good: _write(tmp / "bad.gguf", good.read_bytes()[:300_000]), "truncated or corrupt"),
    "missing": (lambda tmp, good: tmp / "missing.gguf", "no such file"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", BAD_BASES)
def test_bad_base_file(case, base_gguf, adapter_reward1_dir, tmp_path):
    make, msg = BAD_BASES[case]
    _expect_user_error([adapter_reward1_dir, "--base", make(tmp_path, base_gguf)], tmp_path, msg)


def test_base_outtype_with_gguf_base_is_refused(base_gguf, adapter_reward1_dir, tmp_path):
    _expect_user_error([adapter_reward1_dir, "--base", base_gguf, "--base-outtype", "q4_0"], tmp_path,
                       "--base-outtype")


def _existing_out(tmp_path: Path) -> Path:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "o.gguf").write_bytes(b"precious")
    return out_dir


def test_out_exists_needs_force(base_gguf, adapter_reward1_dir, tmp_path):
    out_dir = _existing_out(tmp_path)
    _expect_user_error([adapter_reward1_dir, "--base", base_gguf], tmp_path, "already exists", "--force")
    assert (out_dir / "o.gguf").read_bytes() == b"precious"


def test_out_exists_force_overwrites(base_gguf, adapter_reward1_dir, tmp_path):
    out_dir = _existing_out(tmp_path)
    r = run_cli(["convert", adapter_reward1_dir, "--base", base_gguf, "-o", out_dir / "o.gguf", "--force",
                 "--no-progress"])
    assert r.exit_code == 0, r.output
    assert listing(out_dir) == ["o.gguf"] and GGUFReader(out_dir / "o.gguf").fields[Keys.VERSION]


def test_unwritable_directory(base_gguf, adapter_reward1_dir, tmp_path):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            _expect_user_error([adapter_reward1_dir, "--base", base_gguf], tmp_path, "cannot write", str(ro),
                               out_dir=ro)
        finally:
            ro.chmod(0o755)
        return
    # root ignores directory permissions: run the CLI in a forked child that
    # dropped to `nobody`, on world-readable copies of the inputs (the code is
    # already imported, so the child needs no access to the interpreter's files)
    work = Path(tempfile.mkdtemp(prefix="otter-ro-", dir="/tmp"))
    try:
        work.chmod(0o755)
        ad = copy_adapter(adapter_reward1_dir, work / "ad")
        base = work / "base.gguf"
        shutil.copy(base_gguf, base)
        for p in [ad, *ad.iterdir(), base]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        ro = work / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        run_cli(["convert", ad, "--base", base, "-o", work / "warmup.gguf", "--no-progress"])  # imports
        (work / "warmup.gguf").unlink()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 99
            try:
                os.close(rfd)
                os.setgid(65534)
                os.setuid(65534)
                r = CliRunner().invoke(cli_main, ["convert", str(ad), "--base", str(base), "-o", str(ro / "o.gguf"),
                                                  "--no-progress"])
                os.write(wfd, json.dumps([r.exit_code, r.output]).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as fh:
            data = fh.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0 and data, "child failed"
        exit_code, output = json.loads(data)
        assert exit_code == 2, output
        assert "cannot write" in output and str(ro) in output, output
        assert listing(ro) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError, "SIGTERM"])
def test_interrupt_or_internal_error_leaves_nothing(exc, base_gguf, adapter_reward1_dir, tmp_path, monkeypatch):
    import importlib

    convert_mod = importlib.import_module("otter_gguf_converter.convert")
    calls = [0]
    orig = convert_mod.encode

    def boom(arr, qtype, *a, **k):
        calls[0] += 1
        if calls[0] == 5:
            if exc == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)  # the CLI turns it into SystemExit(143)
            else:
                raise exc("boom")
        return orig(arr, qtype, *a, **k)

    monkeypatch.setattr(convert_mod, "encode", boom)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if exc is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            convert(adapter_reward1_dir, base_gguf, out_dir / "o.gguf", outtype="q8_0", progress=False)
    else:
        r = CliRunner().invoke(cli_main, ["convert", str(adapter_reward1_dir), "--base", str(base_gguf),
                                          "-o", str(out_dir / "o.gguf"), "--no-progress"])
        if exc == "SIGTERM":
            assert r.exit_code == 128 + signal.SIGTERM, r.output
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "handler restored"
        else:
            assert r.exit_code == 1, r.output
            assert "internal error" in r.output
    assert calls[0] == 5
    assert listing(out_dir) == []

# ------------------------------------------------------------ qwen3 and gemma3 (docs/OTTER.md §7)
# Tensor names, order, types and shapes, gemma3's norm-weight shift (1 + w) and no Q/K permutation, checked
# with gguf-py; the base fingerprint of these architectures; bases from HF (llama.cpp's own converter) or GGUF;
# malformed adapters refused. Unit tests but for the quantized outtypes (ggml's quantizer).


@pytest.fixture
def arch_case(qwen3_gemma3_case):
    """(arch, HF base dir, base GGUF (llama.cpp's converter, f32), adapter dir), per architecture (conftest)"""
    return qwen3_gemma3_case


def otter_tensors(path):
    r = GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors if "otter" in t.name}


@pytest.mark.unit
def test_convert_f32_names_types_shapes_values(arch_case, tmp_path):
    arch, _, base, ad = arch_case
    out = convert(ad, base, tmp_path / "o.gguf", outtype="f32", progress=False)
    r, ts = otter_tensors(out)
    cfg = open_adapter(ad).config
    order = [n for n in cfg.tensor_order() if n in open_adapter(ad)]
    assert list(ts) == [gguf_tensor_name(n, arch) for n in order]
    w = load_file(str(Path(ad) / "otter_model.safetensors"))
    shift = 1.0 if arch == "gemma3" else 0.0
    for hf in order:
        t = ts[gguf_tensor_name(hf, arch)]
        assert t.tensor_type == QT.F32
        assert [int(x) for x in t.shape] == list(reversed(w[hf].shape))
        got = np.asarray(t.data).reshape(w[hf].shape)
        kind = parse_gguf_name(t.name)[0]
        want = w[hf] + np.float32(shift) if kind in NORM_TENSORS else w[hf]  # Q/K rows unpermuted (NeoX RoPE)
        assert np.array_equal(got, want), hf
    # the new tensors are there, with the names of docs/FORMAT.md
    assert [int(x) for x in ts["blk.3.otter_attn_q_norm.weight"].shape] == [128]
    assert [int(x) for x in ts["blk.3.otter_attn_k_norm.weight"].shape] == [128]
    gemma_only = {"blk.3.otter_post_attention_norm.weight", "blk.3.otter_post_ffw_norm.weight"}
    assert gemma_only & set(ts) == (gemma_only if arch == "gemma3" else set())
    if arch == "gemma3":
        # the shift is the base's own: llama.cpp's converter stored the base norms as 1 + w too
        hfw = load_file(str(Path(arch_case[1]) / "model.safetensors"))
        base_t = {t.name: t for t in r.tensors}
        for name, hf in (("blk.2.post_attention_norm.weight", "model.layers.2.post_attention_layernorm.weight"),
                         ("blk.2.ffn_norm.weight", "model.layers.2.pre_feedforward_layernorm.weight"),
                         ("blk.2.attn_q_norm.weight", "model.layers.2.self_attn.q_norm.weight")):
            assert np.array_equal(np.asarray(base_t[name].data), hfw[hf] + np.float32(1)), name
        # gemma3's adapter name post_attention_layernorm is the sandwich norm, pre_feedforward_layernorm the FFN's
        np.testing.assert_array_equal(np.asarray(ts["blk.0.otter_ffn_norm.weight"].data),
                                      w["otter.layers.0.pre_feedforward_layernorm.weight"] + np.float32(1))


@pytest.mark.unit
def test_fingerprint(arch_case, tmp_path):
    arch, _, base, ad = arch_case
    out = convert(ad, base, tmp_path / "o.gguf", outtype="f16", progress=False)
    r = GGUFReader(str(out))
    keys = [k for k in r.fields if k.startswith("otter.")]
    assert r.fields[Keys.Base.ATTENTION_KEY_LENGTH].contents() == 128  # hd != d / h
    assert r.fields[Keys.Base.ARCHITECTURE].contents() == arch
    if arch == "qwen3":
        assert not set(keys) & {k for ks in ARCH_FINGERPRINT_KEYS.values() for k in ks}
        return
    assert keys[-4:] == list(ARCH_FINGERPRINT_KEYS["gemma3"])
    f = r.fields
    assert f[Keys.Base.SLIDING_WINDOW].contents() == 8 and f[Keys.Base.SLIDING_WINDOW].types == [GGUFValueType.UINT32]
    pat = f[Keys.Base.SLIDING_WINDOW_PATTERN]
    assert pat.types == [GGUFValueType.ARRAY, GGUFValueType.BOOL]
    assert pat.contents() == [True] * 5 + [False]  # llama.cpp's default period 6, as HF's layer_types
    assert json.loads((Path(arch_case[1]) / "config.json").read_text())["layer_types"] == \
        ["sliding_attention"] * 5 + ["full_attention"]
    assert f[Keys.Base.ROPE_FREQ_BASE].contents() == 1e6 and f[Keys.Base.ROPE_FREQ_BASE_SWA].contents() == 1e4
    assert f[Keys.Base.ROPE_FREQ_BASE].types == [GGUFValueType.FLOAT32]


@pytest.mark.unit
def test_swa_pattern_as_llama_cpp_resolves_it(tmp_path, hf_base_gguf, tiny_gemma3_dir):
    """An explicit period or per-layer array in the base GGUF wins over the default period 6; no window: none."""
    from helpers import rewrite
    from otter_gguf.io import gguf_read

    base = hf_base_gguf(tiny_gemma3_dir, "f32")
    P = Keys.Base.SLIDING_WINDOW_PATTERN
    for i, (kv, drop, want) in enumerate((
        ({"gemma3.attention.sliding_window_pattern": (2, GGUFValueType.UINT32)}, (), [True, False] * 3),
        ({"gemma3.attention.sliding_window_pattern": ([False, True] * 3, GGUFValueType.ARRAY, GGUFValueType.BOOL)},
         (), [False, True] * 3),
        ({}, ("gemma3.attention.sliding_window",), [False] * 6),
    )):
        p = tmp_path / f"b{i}.gguf"
        rewrite(base, p, kv=kv, drop_kv=drop)
        info = gguf_read.base_info(gguf_read.open_gguf(p))
        assert info.arch_fingerprint[P] == want, kv


@pytest.mark.unit
def test_hf_base_dir_converts_like_its_gguf(tmp_path, hf_base_gguf, tiny_qwen3_dir, qwen3_adapter_dir):
    """A base given as an HF directory goes through llama.cpp's convert_hf_to_gguf.py (Qwen3ForCausalLM)."""
    a = convert(qwen3_adapter_dir, tiny_qwen3_dir, tmp_path / "a.gguf", outtype="f32", base_outtype="f32",
                progress=False)
    b = convert(qwen3_adapter_dir, hf_base_gguf(tiny_qwen3_dir, "f32"), tmp_path / "b.gguf", outtype="f32",
                progress=False)
    ra, rb = GGUFReader(str(a)), GGUFReader(str(b))
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


@pytest.mark.unit
@pytest.mark.parametrize("outtype", ["q8_0", "q3_k_m", "q4_k_m"])
def test_quantization_policy_covers_the_new_tensors(arch_case, outtype):
    """The plan (no quantizer needed): 1-D tensors f32 (the shift planned for every gemma3 norm), the matrices
    of these architectures get the same types as llama's for the same role, layer and outtype."""
    from otter_gguf_converter.convert import plan_tensors

    arch, _, _, ad = arch_case
    adapter = open_adapter(ad)
    cfg = adapter.config
    plan, fallbacks = plan_tensors(adapter, cfg, arch, outtype, None)
    assert not fallbacks
    gqa = cfg.otter_num_attention_heads // cfg.otter_num_key_value_heads
    assert [p.name for p in plan] == [gguf_tensor_name(n, arch) for n in adapter.tensor_names]
    for p in plan:
        kind, bid, _ = parse_gguf_name(p.name)
        assert p.permute_heads is None
        if len(p.np_shape) == 1:
            assert p.qtype == QT.F32
            assert p.add == (1.0 if arch == "gemma3" and kind in NORM_TENSORS else 0.0), p.name
        elif p.name != "otter_head.weight":
            assert p.qtype == qtypes.tensor_type(outtype, p.name, cfg.num_hidden_layers, gqa), p.name
    types = {p.name: p.qtype for p in plan}
    if outtype == "q3_k_m":  # the mix's per-layer upgrades reach these architectures' tensors
        assert types["blk.0.otter_attn_v.weight"] == QT.Q5_K and types["blk.2.otter_attn_v.weight"] == QT.Q4_K
        assert types["blk.1.otter_attn_output.weight"] == QT.Q4_K and types["blk.1.otter_ffn_up.weight"] == QT.Q3_K


@pytest.mark.runtime
@pytest.mark.parametrize("outtype", ["q8_0", "q4_k_m"])
def test_quantized_types_follow_the_policy(arch_case, tmp_path, outtype):
    """Every 1-D tensor (the new Q/K and sandwich norms included) stays f32 with the shift; every matrix gets
    qtypes' type for its role, as for llama."""
    arch, _, base, ad = arch_case
    out = convert(ad, base, tmp_path / "o.gguf", outtype=outtype, progress=False)
    _, ts = otter_tensors(out)
    cfg = open_adapter(ad).config
    w = load_file(str(Path(ad) / "otter_model.safetensors"))
    n_new = 0
    for name, t in ts.items():
        kind, bid, _ = parse_gguf_name(name)
        if len(t.shape) == 1:
            assert t.tensor_type == QT.F32, name
            n_new += kind.name.endswith(("Q_NORM", "K_NORM", "POST_NORM"))
        elif name == "otter_head.weight":
            assert t.tensor_type == qtypes.head_type(outtype, None)
        else:
            want = qtypes.tensor_type(outtype, name, cfg.num_hidden_layers, cfg.otter_num_attention_heads
                                      // cfg.otter_num_key_value_heads)
            assert t.tensor_type == qtypes.fit_type(name, want, int(t.shape[0]))[0], name
    assert n_new == cfg.num_hidden_layers * (4 if arch == "gemma3" else 2)
    if arch == "gemma3":
        np.testing.assert_array_equal(np.asarray(ts["blk.4.otter_attn_k_norm.weight"].data),
                                      w["otter.layers.4.self_attn.k_norm.weight"] + np.float32(1))


# ------------------------------------------------------------ qwen3 and gemma3: refused
@pytest.mark.unit
def test_adapter_for_another_arch_refused(tmp_path, hf_base_gguf, tiny_gemma3_dir, qwen3_adapter_dir):
    with pytest.raises(AdapterError, match="base_architecture: adapter 'qwen3', base 'gemma3'"):
        convert(qwen3_adapter_dir, hf_base_gguf(tiny_gemma3_dir, "f32"), tmp_path / "o.gguf", progress=False)
    assert not (tmp_path / "o.gguf").exists()


def _bad_adapter(tmp_path, src, edit) -> Path:
    """A copy of the adapter ``src`` whose tensors (name -> numpy array) went through ``edit``, written with
    safetensors directly (save_adapter would refuse it)."""
    from safetensors.numpy import save_file
    t = load_file(str(Path(src) / "otter_model.safetensors"))
    edit(t)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "otter_config.json").write_bytes((Path(src) / "otter_config.json").read_bytes())
    save_file(t, str(d / "otter_model.safetensors"))
    return d


def _drop(name):
    return lambda t: t.pop(name)


def _rename(old, new):
    return lambda t: t.__setitem__(new, t.pop(old))


def _reshape(name, shape):
    return lambda t: t.__setitem__(name, t[name].reshape(shape))


@pytest.mark.unit
@pytest.mark.parametrize("arch, edit, match", [
    ("gemma3", _drop("otter.layers.2.post_feedforward_layernorm.weight"),
     r"missing required tensor\(s\): otter.layers.2.post_feedforward_layernorm.weight"),
    ("qwen3", _drop("otter.layers.0.self_attn.k_norm.weight"), "otter.layers.0.self_attn.k_norm.weight"),
    # a llama-family name in a gemma3 adapter: its FFN norm is pre_feedforward_layernorm
    ("gemma3", _rename("otter.layers.1.pre_feedforward_layernorm.weight", "otter.layers.1.ffn_norm.weight"),
     "missing required tensor"),
    ("gemma3", _reshape("otter.layers.1.self_attn.q_norm.weight", [64, 2]),
     r"otter.layers.1.self_attn.q_norm.weight' has shape \[64, 2\], expected \[128\]"),
    ("qwen3", _rename("otter.layers.3.self_attn.q_norm.weight", "otter.layers.3.self_attn.q_norm.bias"),
     "missing required tensor"),
])
def test_malformed_adapters_refused(tmp_path, hf_base_gguf, tiny_qwen3_dir, tiny_gemma3_dir, qwen3_adapter_dir,
                                    gemma3_adapter_dir, arch, edit, match):
    src, hf = (gemma3_adapter_dir, tiny_gemma3_dir) if arch == "gemma3" else (qwen3_adapter_dir, tiny_qwen3_dir)
    bad = _bad_adapter(tmp_path, src, edit)
    with pytest.raises(AdapterError, match=match):
        convert(bad, hf_base_gguf(hf, "f32"), tmp_path / "o.gguf", progress=False)
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.unit
def test_unexpected_norms_refused_for_qwen3(tmp_path, hf_base_gguf, tiny_qwen3_dir, qwen3_adapter_dir):
    """gemma3's sandwich norms are not tensors of a qwen3 adapter."""
    bad = _bad_adapter(tmp_path, qwen3_adapter_dir, lambda t: t.__setitem__(
        "otter.layers.0.post_feedforward_layernorm.weight", t["otter.layers.0.input_layernorm.weight"]))
    with pytest.raises(AdapterError, match="unexpected tensor.*otter.layers.0.post_feedforward_layernorm"):
        convert(bad, hf_base_gguf(tiny_qwen3_dir, "f32"), tmp_path / "o.gguf", progress=False)
