"""Otter adapter GGUFs ("sidecars") for qwen3 and gemma3 bases (docs/OTTER.md §7, docs/FORMAT.md "Adapter GGUF"):
convert --sidecar writes the head of the one-file model (the new tensor kinds, gemma3's 1 + w norms and its own
fingerprint keys); split and merge round-trip byte for byte; the reader checks the architecture's own keys and
tensors and merge refuses a head made for a base with another sliding window."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader, GGUFValueType
from safetensors.numpy import load_file

from helpers import rewrite
from otter_gguf.cli import main as cli_main
from otter_gguf.format.constants import (
    ARCH_FINGERPRINT_KEYS, ARCH_TENSORS, NORM_TENSORS, Keys, SidecarKeys, arch_keys, gguf_name, gguf_tensor_name,
    is_otter_tensor, parse_gguf_name,
)
from otter_gguf.format.constants import OtterTensor as T
from otter_gguf.io.otter_read import read_sidecar
from otter_gguf_converter import ConvertError, convert
from otter_gguf_converter.sidecar import merge

pytestmark = pytest.mark.unit

ARCHS = ("qwen3", "gemma3")
V = GGUFValueType


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def cli(*args):
    return CliRunner().invoke(cli_main, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(tmp_path_factory, hf_base_gguf, tiny_qwen3_dir, tiny_gemma3_dir, qwen3_adapter_dir, gemma3_adapter_dir):
    """(arch, outtype) -> (base GGUF, adapter dir, one-file GGUF, sidecar named 'judge' written by the CLI)."""
    d = tmp_path_factory.mktemp("sidecar-q3g3")
    src = {"qwen3": (tiny_qwen3_dir, qwen3_adapter_dir), "gemma3": (tiny_gemma3_dir, gemma3_adapter_dir)}
    cache = {}

    def make(arch: str, outtype: str = "f32"):
        if (arch, outtype) not in cache:
            hf, ad = src[arch]
            base = hf_base_gguf(hf, "f32")
            one = convert(ad, base, d / f"{arch}-one-{outtype}.gguf", outtype=outtype, progress=False)
            head = d / f"{arch}-judge-{outtype}.gguf"
            r = cli("convert", ad, "--base", base, "-o", head, "--outtype", outtype, "--sidecar", "--name", "judge",
                    "--no-progress")
            assert r.exit_code == 0, r.output
            cache[arch, outtype] = (base, Path(ad), one, head)
        return cache[arch, outtype]

    return make


def _tensors(path):
    return {t.name: (t.tensor_type, [int(x) for x in t.shape], bytes(t.data.tobytes()))
            for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("arch", ARCHS)
def test_sidecar_has_the_architectures_tensors_and_keys(made, arch):
    base, ad, one, head = made(arch)
    before = sha(base)
    r, one_r = GGUFReader(head), GGUFReader(one)
    assert r.fields[SidecarKeys.ARCHITECTURE].contents() == arch
    assert r.fields[SidecarKeys.NAME].contents() == "judge"
    # every otter.* key of this architecture, in the one-file model's order, with its values and types
    otter_keys = [k for k in r.fields if k.startswith("otter.")]
    assert otter_keys == list(arch_keys(arch)) == [k for k in one_r.fields if k.startswith("otter.")]
    for k in otter_keys:
        assert r.fields[k].types == one_r.fields[k].types and r.fields[k].contents() == one_r.fields[k].contents(), k
    assert not [k for k in r.fields if k.startswith((f"{arch}.", "tokenizer."))]
    # the tensors: the one-file model's Otter tensors, byte for byte, in its order, with the §5 kinds
    mine, full = _tensors(head), _tensors(one)
    assert list(mine) == [n for n in full if is_otter_tensor(n)]
    assert all(mine[n] == full[n] for n in mine)
    kinds = {parse_gguf_name(n)[0] for n in mine}
    assert kinds == set(ARCH_TENSORS[arch])
    n_layer = r.fields[Keys.Base.BLOCK_COUNT].contents()
    new = [gguf_name(k, i) for i in range(n_layer) for k in (T.ATTN_Q_NORM, T.ATTN_K_NORM)]
    if arch == "gemma3":
        new += [gguf_name(k, i) for i in range(n_layer) for k in (T.ATTN_POST_NORM, T.FFN_POST_NORM)]
    assert all(mine[n][1] == ([128] if "_q_norm" in n or "_k_norm" in n else [256]) for n in new)
    # the values: the adapter's, gemma3's norms shifted to 1 + w as convert does (and llama.cpp for the base)
    w = load_file(str(ad / "otter_model.safetensors"))
    rr = {t.name: t for t in r.tensors}
    for hf, arr in w.items():
        name = gguf_tensor_name(hf, arch)
        shift = 1.0 if arch == "gemma3" and parse_gguf_name(name)[0] in NORM_TENSORS else 0.0
        np.testing.assert_array_equal(np.asarray(rr[name].data).reshape(arr.shape), arr + np.float32(shift),
                                      err_msg=name)
    sc = read_sidecar(head)
    assert sc.architecture == arch and sc.name == "judge" and sc.config.base_architecture == arch
    assert sc.config.head_output_size == (3 if arch == "gemma3" else 1)
    want_arch_fp = {} if arch == "qwen3" else {
        Keys.Base.SLIDING_WINDOW: 8, Keys.Base.SLIDING_WINDOW_PATTERN: [True] * 5 + [False],
        Keys.Base.ROPE_FREQ_BASE: 1e6, Keys.Base.ROPE_FREQ_BASE_SWA: 1e4}
    assert sc.arch_fingerprint == want_arch_fp
    assert sha(base) == before


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("outtype", [pytest.param("f32", marks=pytest.mark.unit),
                                     pytest.param("q4_k_m", marks=pytest.mark.runtime)])  # ggml's quantizer
def test_split_and_merge_round_trip(made, tmp_path, arch, outtype):
    """split(one-file) = (the base's bytes, convert --sidecar's bytes); merge(base, sidecar) = convert's bytes."""
    base, _, one, head = made(arch, outtype)
    hashes = (sha(base), sha(one), sha(head))
    r = cli("split", one, "--base-out", tmp_path / "b.gguf", "--head-out", tmp_path / "h.gguf", "--name", "judge",
            "--no-progress")
    assert r.exit_code == 0, r.output
    assert sha(tmp_path / "b.gguf") == hashes[0]
    assert sha(tmp_path / "h.gguf") == hashes[2]
    r = cli("merge", tmp_path / "b.gguf", tmp_path / "h.gguf", "-o", tmp_path / "m.gguf", "--no-progress")
    assert r.exit_code == 0, r.output
    assert sha(tmp_path / "m.gguf") == hashes[1]
    assert (sha(base), sha(one), sha(head)) == hashes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf", "h.gguf", "m.gguf"]


def test_inspect_shows_a_gemma3_sidecar(made):
    _, _, _, head = made("gemma3")
    r = cli("inspect", head)
    assert r.exit_code == 0, r.output
    assert "Otter adapter GGUF (head 'judge')" in r.stdout
    assert "for base: gemma3  d=256 L=6 h=4 h_kv=1 hd=128 f=768 V=512" in r.stdout
    assert gguf_name(T.FFN_POST_NORM, 5) in r.stdout


# ------------------------------------------------------------------ another base
def _base_with(base: Path, out: Path, **kv) -> Path:
    return rewrite(base, out, kv=kv)


@pytest.mark.parametrize("change, needle", [
    ({"gemma3.attention.sliding_window": (16, V.UINT32)},
     f"{Keys.Base.SLIDING_WINDOW} = 8, base has 16"),
    ({"gemma3.attention.sliding_window_pattern": (2, V.UINT32)},
     f"{Keys.Base.SLIDING_WINDOW_PATTERN} = [True, True, True, True, True, False], "
     f"base has [True, False, True, False, True, False]"),
    ({"gemma3.rope.freq_base_swa": (5e4, V.FLOAT32)}, f"{Keys.Base.ROPE_FREQ_BASE_SWA} = 10000.0, base has 50000.0"),
    ({"gemma3.rope.freq_base": (1e4, V.FLOAT32)}, f"{Keys.Base.ROPE_FREQ_BASE} = 1000000.0, base has 10000.0"),
])
def test_merge_refuses_a_gemma3_head_for_another_window_or_rope(made, tmp_path, change, needle):
    base, _, _, head = made("gemma3")
    other = _base_with(base, tmp_path / "other.gguf", **change)
    with pytest.raises(ConvertError, match="fingerprint mismatch") as e:
        merge(other, [head], tmp_path / "m.gguf", progress=False)
    assert needle in str(e.value)
    r = cli("merge", other, head, "-o", tmp_path / "m.gguf")
    assert r.exit_code == 2 and needle in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf"]


def test_merge_refuses_a_head_for_the_other_architecture(made, tmp_path):
    q_base, _, _, q_head = made("qwen3")
    g_base, _, _, g_head = made("gemma3")
    for base, head, want in ((g_base, q_head, "'qwen3', base has 'gemma3'"), (q_base, g_head, "'gemma3', base has 'qwen3'")):
        with pytest.raises(ConvertError, match="fingerprint mismatch") as e:
            merge(base, [head], tmp_path / "m.gguf", progress=False)
        assert f"{Keys.Base.ARCHITECTURE} = {want}" in str(e.value)


# ------------------------------------------------------------------ malformed
def _q_norm(head, bid):
    t = next(t for t in GGUFReader(head).tensors if t.name == gguf_name(T.ATTN_Q_NORM, bid))
    return np.array(t.data, dtype=np.float32)


MALFORMED = {
    "gemma3": {
        "missing_window": (lambda h: dict(drop_kv={Keys.Base.SLIDING_WINDOW}),
                           f"metadata key {Keys.Base.SLIDING_WINDOW} is missing"),
        "window_type": (lambda h: dict(kv={Keys.Base.SLIDING_WINDOW: (8, V.INT32)}),
                        f"{Keys.Base.SLIDING_WINDOW} has GGUF type int32, expected uint32"),
        "pattern_type": (lambda h: dict(kv={Keys.Base.SLIDING_WINDOW_PATTERN: ([1] * 6, V.ARRAY, V.UINT32)}),
                         f"{Keys.Base.SLIDING_WINDOW_PATTERN} has GGUF type array/uint32, expected array of bool"),
        "pattern_length": (lambda h: dict(kv={Keys.Base.SLIDING_WINDOW_PATTERN: ([True] * 5, V.ARRAY, V.BOOL)}),
                           f"{Keys.Base.SLIDING_WINDOW_PATTERN} has 5 entries, {Keys.Base.BLOCK_COUNT} is 6"),
        "rope_type": (lambda h: dict(kv={Keys.Base.ROPE_FREQ_BASE: (1e6, V.FLOAT64)}),
                      f"{Keys.Base.ROPE_FREQ_BASE} has GGUF type float64, expected float32"),
        "q_norm_shape": (lambda h: dict(tensors={gguf_name(T.ATTN_Q_NORM, 1): _q_norm(h, 1)[:64]}),
                         f"tensor {gguf_name(T.ATTN_Q_NORM, 1)} has shape [64] (ggml order), expected [128]"),
        "q_norm_f16": (lambda h: dict(tensors={gguf_name(T.ATTN_K_NORM, 2): np.ones(128, dtype=np.float16)}),
                       f"{gguf_name(T.ATTN_K_NORM, 2)} has type f16, expected f32"),
        "missing_post_norm": (lambda h: dict(drop_tensors={gguf_name(T.FFN_POST_NORM, 3)}),
                              f"Otter tensor(s) missing: {gguf_name(T.FFN_POST_NORM, 3)}"),
        "post_norm_shape": (lambda h: dict(tensors={gguf_name(T.ATTN_POST_NORM, 0): np.ones(255, np.float32)}),
                            f"tensor {gguf_name(T.ATTN_POST_NORM, 0)} has shape [255] (ggml order), expected [256]"),
        "base_arch": (lambda h: dict(kv={Keys.Base.ARCHITECTURE: ("qwen3", V.STRING)}),
                      f"{Keys.Base.ARCHITECTURE} = 'qwen3' but general.architecture = 'gemma3'"),
    },
    "qwen3": {
        "gemma3_key": (lambda h: dict(kv={Keys.Base.SLIDING_WINDOW: (8, V.UINT32)}),
                       f"unknown Otter metadata key(s): {Keys.Base.SLIDING_WINDOW} ({Keys.Base.SLIDING_WINDOW}: "
                       f"not a key of an Otter GGUF on a qwen3 base)"),
        "missing_k_norm": (lambda h: dict(drop_tensors={gguf_name(T.ATTN_K_NORM, 0)}),
                           f"Otter tensor(s) missing: {gguf_name(T.ATTN_K_NORM, 0)}"),
        "sandwich_norm": (lambda h: dict(tensors={gguf_name(T.ATTN_POST_NORM, 0): np.ones(256, np.float32)}),
                          f"unexpected Otter tensor {gguf_name(T.ATTN_POST_NORM, 0)}"),
        "q_norm_shape": (lambda h: dict(tensors={gguf_name(T.ATTN_Q_NORM, 3): np.ones(129, np.float32)}),
                         f"tensor {gguf_name(T.ATTN_Q_NORM, 3)} has shape [129] (ggml order), expected [128]"),
    },
}


@pytest.mark.parametrize("arch, case", [(a, c) for a in MALFORMED for c in sorted(MALFORMED[a])])
def test_malformed_sidecar_refused(made, tmp_path, arch, case):
    _, _, _, head = made(arch)
    mutate, needle = MALFORMED[arch][case]
    bad = rewrite(head, tmp_path / f"{case}.gguf", **mutate(head))
    with pytest.raises(ConvertError) as e:
        read_sidecar(bad)
    assert needle in str(e.value)
    r = cli("inspect", bad)
    assert r.exit_code == 2 and needle in r.output, r.output


def test_rewritten_gemma3_sidecar_still_reads(made, tmp_path):
    """The malformed cases differ from a good file only in what they change (bool arrays survive rewrite)."""
    _, _, _, head = made("gemma3")
    sc = read_sidecar(rewrite(head, tmp_path / "same.gguf"))
    assert sc.arch_fingerprint == read_sidecar(head).arch_fingerprint
    assert list(sc.arch_fingerprint) == list(ARCH_FINGERPRINT_KEYS["gemma3"])
