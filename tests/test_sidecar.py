"""Otter adapter GGUFs ("sidecars"): convert --sidecar, split, merge, inspect, the Python reader.

A sidecar holds the Otter tensors and otter.* metadata of one head (docs/FORMAT.md
"Adapter GGUF"); split and merge turn a one-file Otter GGUF into base + sidecar and
back, byte for byte; no command ever changes its inputs.

On the tiny llama and, where a test applies to every architecture, on qwen3 and gemma3 (docs/OTTER.md §7);
what only those have (the new tensor kinds, gemma3's 1 + w norms and its own fingerprint keys, the reader's
checks of the architecture's keys and tensors, merge refusing a head for another sliding window) in its own
section.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType
from safetensors.numpy import load_file

from helpers import rewrite, sidecar_mutations
from otter_gguf.cli import main as cli_main
from otter_gguf.format.constants import (
    ADAPTER_TYPE_OTTER, ALL_KEYS, ARCH_FINGERPRINT_KEYS, ARCH_TENSORS, GENERAL_TYPE_ADAPTER, NORM_TENSORS, Keys,
    SidecarKeys, arch_keys, gguf_name, gguf_tensor_name, is_otter_tensor, parse_gguf_name,
)
from otter_gguf.format.constants import OtterTensor as T
from otter_gguf.io.otter_read import read_sidecar
from otter_gguf_converter import ConvertError, convert
from otter_gguf_converter.sidecar import merge

pytestmark = pytest.mark.unit

ARCHS = ("qwen3", "gemma3")
V = GGUFValueType
HEAD_NAME = {"llama": "helpful", "qwen3": "judge", "gemma3": "judge"}  # the sidecars' names (--name)


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def cli(*args):
    return CliRunner().invoke(cli_main, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(hf_base_gguf, tiny_llama_dir) -> Path:
    return hf_base_gguf(tiny_llama_dir, "f32")


@pytest.fixture(scope="module")
def made(tmp_path_factory, base, adapter_reward3_dir):
    """outtype -> (one-file GGUF, sidecar named 'helpful'), both from convert."""
    d = tmp_path_factory.mktemp("sidecar")
    cache = {}

    def make(outtype: str):
        if outtype not in cache:
            one = convert(adapter_reward3_dir, base, d / f"one-{outtype}.gguf", outtype=outtype, progress=False)
            r = cli("convert", adapter_reward3_dir, "--base", base, "-o", d / f"helpful-{outtype}.gguf",
                    "--outtype", outtype, "--sidecar", "--name", "helpful", "--no-progress")
            assert r.exit_code == 0, r.output
            cache[outtype] = (one, d / f"helpful-{outtype}.gguf")
        return cache[outtype]

    return make


@pytest.fixture(scope="module")
def made_arch(tmp_path_factory, made, base, adapter_reward3_dir, hf_base_gguf, tiny_qwen3_dir, tiny_gemma3_dir,
              qwen3_adapter_dir, gemma3_adapter_dir):
    """(arch, outtype) -> (base GGUF, adapter dir, one-file GGUF, sidecar written by the CLI): qwen3 and gemma3
    (the sidecar named 'judge'); llama: ``made``'s (reward3, 'helpful')."""
    d = tmp_path_factory.mktemp("sidecar-q3g3")
    src = {"qwen3": (tiny_qwen3_dir, qwen3_adapter_dir), "gemma3": (tiny_gemma3_dir, gemma3_adapter_dir)}
    cache, llama_base = {}, base

    def make(arch: str, outtype: str = "f32"):
        if arch == "llama":
            return (llama_base, Path(adapter_reward3_dir), *made(outtype))
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
    r = GGUFReader(path)
    return {t.name: (t.tensor_type, [int(x) for x in t.shape], bytes(t.data.tobytes())) for t in r.tensors}


def test_sidecar_holds_the_head_only(made, base):
    before = sha(base)
    one, head = made("f32")
    r = GGUFReader(head)
    assert r.fields[SidecarKeys.GENERAL_TYPE].contents() == GENERAL_TYPE_ADAPTER == "adapter"
    assert r.fields[SidecarKeys.ADAPTER_TYPE].contents() == ADAPTER_TYPE_OTTER == "otter"
    assert r.fields[SidecarKeys.ARCHITECTURE].contents() == "llama"
    assert r.fields[SidecarKeys.NAME].contents() == "helpful"
    one_r = GGUFReader(one)
    for k in ALL_KEYS:  # the otter.* metadata of the one-file model, fingerprint included
        assert r.fields[k].contents() == one_r.fields[k].contents(), k
    assert not [k for k in r.fields if k.startswith("tokenizer.") or k.startswith("llama.")]
    mine, full = _tensors(head), _tensors(one)
    assert list(mine) == [n for n in full if is_otter_tensor(n)]
    assert all(mine[n] == full[n] for n in mine)
    otter_bytes = sum(int(t.n_bytes) for t in r.tensors)
    assert otter_bytes < Path(head).stat().st_size < otter_bytes + 8192  # + metadata and alignment only
    assert sha(base) == before


@pytest.mark.parametrize("arch", ["llama", *ARCHS])
@pytest.mark.parametrize("outtype", [pytest.param("f32", marks=pytest.mark.unit),
                                     pytest.param("q4_k_m", marks=pytest.mark.runtime)])  # ggml's quantizer
def test_split_and_merge_round_trip(made_arch, tmp_path, arch, outtype):
    """split(one-file) = (the base's bytes, convert --sidecar's bytes); merge(base, sidecar) = convert's bytes,
    from the inputs and from split's outputs."""
    base, _, one, head = made_arch(arch, outtype)
    h_base, h_one, h_head = sha(base), sha(one), sha(head)
    r = cli("split", one, "--base-out", tmp_path / "b.gguf", "--head-out", tmp_path / "h.gguf",
            "--name", HEAD_NAME[arch], "--no-progress")
    assert r.exit_code == 0, r.output
    assert sha(tmp_path / "b.gguf") == h_base
    assert sha(tmp_path / "h.gguf") == h_head
    r = cli("merge", base, head, "-o", tmp_path / "m.gguf", "--no-progress")
    assert r.exit_code == 0, r.output
    assert sha(tmp_path / "m.gguf") == h_one
    (tmp_path / "m.gguf").unlink()
    r = cli("merge", tmp_path / "b.gguf", tmp_path / "h.gguf", "-o", tmp_path / "m.gguf", "--no-progress")
    assert r.exit_code == 0, r.output
    assert sha(tmp_path / "m.gguf") == h_one
    assert (sha(base), sha(one), sha(head)) == (h_base, h_one, h_head)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf", "h.gguf", "m.gguf"]  # no temp files left


def test_split_names_the_head_after_the_file(made, tmp_path):
    one, _ = made("f32")
    r = cli("split", one, "--base-out", tmp_path / "b.gguf", "--head-out", tmp_path / "harmless.gguf",
            "--no-progress")
    assert r.exit_code == 0, r.output
    assert read_sidecar(tmp_path / "harmless.gguf").name == "harmless"


@pytest.mark.parametrize("arch, for_base, tensor", [
    ("llama", "for base: llama  d=256 L=4 h=4 h_kv=2 hd=64 f=768 V=512", gguf_name(T.HEAD)),
    ("gemma3", "for base: gemma3  d=256 L=6 h=4 h_kv=1 hd=128 f=768 V=512", gguf_name(T.FFN_POST_NORM, 5)),
], ids=["llama", "gemma3"])
def test_inspect_shows_a_sidecar(made_arch, arch, for_base, tensor):
    _, _, _, head = made_arch(arch)
    r = cli("inspect", head)
    assert r.exit_code == 0, r.output
    assert f"Otter adapter GGUF (head '{HEAD_NAME[arch]}')" in r.stdout
    assert for_base in r.stdout
    assert "head kind reward, n_out 3" in r.stdout
    assert gguf_name(T.HEAD) in r.stdout and tensor in r.stdout
    d = json.loads(cli("inspect", head, "--json").stdout)
    assert d["kind"] == "otter_adapter" and d["base"] is None and d["otter"]["name"] == HEAD_NAME[arch]
    assert d["otter"]["for_base"]["vocab_size"] == 512
    assert d["otter"]["bytes"] == sum(int(t.n_bytes) for t in GGUFReader(head).tensors)


def test_bad_uses_exit_2_and_write_nothing(made, base, tmp_path, tiny_qwen2_dir, hf_base_gguf):
    one, head = made("f32")
    hashes = {p: sha(p) for p in (base, one, head)}
    other = hf_base_gguf(tiny_qwen2_dir, "f32")
    cases = [
        (["merge", other, head, "-o", tmp_path / "x.gguf"], "fingerprint mismatch: otter.base.architecture"),
        (["merge", base, head, head, "-o", tmp_path / "x.gguf"], "merge takes one head, got 2"),
        (["merge", head, base, "-o", tmp_path / "x.gguf"], "is an Otter adapter GGUF; pass the base model first"),
        (["merge", one, head, "-o", tmp_path / "x.gguf"], "already contains an Otter head"),
        (["merge", base, one, "-o", tmp_path / "x.gguf"], "it is a one-file Otter GGUF"),
        (["merge", base, head, "-o", base], "is also an input"),
        (["split", base, "--base-out", tmp_path / "b", "--head-out", tmp_path / "h"], "has no Otter head"),
        (["split", head, "--base-out", tmp_path / "b", "--head-out", tmp_path / "h"], "already an Otter adapter"),
        (["split", one, "--base-out", tmp_path / "b", "--head-out", tmp_path / "b"], "are the same file"),
        (["split", one, "--base-out", one, "--head-out", tmp_path / "h", "--force"], "is also an input"),
        (["split", one, "--base-out", base, "--head-out", tmp_path / "h"], "already exists"),
        (["convert", "x", "--base", base, "-o", tmp_path / "x.gguf", "--name", "n"], "--name applies to --sidecar"),
    ]
    for args, needle in cases:
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output, (args, r.output)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    r = cli("merge", base, head, "-o", tmp_path / "exists.gguf")
    assert r.exit_code == 2 and "already exists" in r.output
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"
    assert {p: sha(p) for p in hashes} == hashes


# what the Python reader says about each of helpers.sidecar_mutations()
MALFORMED = {
    "general_type": "is not an Otter adapter GGUF (expected general.type = 'adapter'",
    "lora": "an adapter GGUF with adapter.type = 'lora'",
    "missing_key": f"{Keys.FEED_FORWARD_LENGTH} is missing",
    "no_version": f"{Keys.VERSION} is missing",
    "key_type": f"{Keys.EMBEDDING_LENGTH} has GGUF type int32, expected uint32",
    "hash_type": "expected uint64",
    "n_out_absurd": f"{Keys.Head.OUTPUT_SIZE} = 1073741824 is out of range",
    "d2_zero": "is out of range [1, 1048576]",
    "n_out_mismatch": "signal_names has 3 entries",
    "gqa": "must be a multiple of",
    "head_kind": "head_kind must be one of",
    "version": "otter_version must be 1",
    "arch_mismatch": f"{Keys.Base.ARCHITECTURE} = 'qwen2' but general.architecture = 'llama'",
    "shape": f"tensor {gguf_name(T.ATTN_Q, 1)} has shape [512, 255]",
    "missing_tensor": gguf_name(T.FFN_UP, 2),
    "norm_f16": f"{gguf_name(T.ATTN_NORM, 0)} has type f16, expected f32",
    "matrix_int": f"{gguf_name(T.ATTN_OUT, 2)} has type i32",
    "unknown_key": "unknown Otter metadata key(s): otter.extra",
}


def _q_norm(head, bid):
    t = next(t for t in GGUFReader(head).tensors if t.name == gguf_name(T.ATTN_Q_NORM, bid))
    return np.array(t.data, dtype=np.float32)


# what the Python reader says about each malformed variant of a qwen3 or gemma3 sidecar: arch -> case ->
# (sidecar path -> ``rewrite`` kwargs, message)
ARCH_MALFORMED = {
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

# llama's cases first (their ids: "llama-<case>"), then the architectures' own
MALFORMED_CASES = [("llama", c) for c in sorted(MALFORMED)] + \
    [(a, c) for a in ARCH_MALFORMED for c in sorted(ARCH_MALFORMED[a])]


@pytest.mark.parametrize("arch, case", MALFORMED_CASES)
def test_malformed_sidecar_refused(made_arch, tmp_path, arch, case):
    _, _, _, head = made_arch(arch)
    if arch == "llama":
        mutate, needle = sidecar_mutations()[case], MALFORMED[case]
    else:
        mutate, needle = ARCH_MALFORMED[arch][case]
    bad = rewrite(head, tmp_path / f"{case}.gguf", **mutate(head))
    with pytest.raises(ConvertError) as e:
        read_sidecar(bad)
    assert needle in str(e.value)
    if case != "general_type":  # not marked as an adapter: inspect shows it as a (broken) Otter model file
        r = cli("inspect", bad)
        assert r.exit_code == 2 and needle in r.output, r.output


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.9999])
def test_truncated_sidecar_refused(made, tmp_path, keep):
    _, head = made("f32")
    data = Path(head).read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConvertError, match="truncated|not a GGUF|not a readable GGUF"):
        read_sidecar(bad)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rewritten_sidecar_still_reads(made_arch, tmp_path, arch):
    """The malformed cases differ from a good file only in what they change (gemma3: bool arrays survive
    rewrite)."""
    _, _, _, head = made_arch(arch)
    sc = read_sidecar(rewrite(head, tmp_path / "same.gguf"))
    assert sc.name == HEAD_NAME[arch] and sc.config.head_output_size == 3 and sc.architecture == arch
    assert sc.arch_fingerprint == read_sidecar(head).arch_fingerprint
    assert list(sc.arch_fingerprint) == list(ARCH_FINGERPRINT_KEYS.get(arch, {}))


@pytest.mark.runtime
def test_split_of_a_llama_quantized_model(base, adapter_reward1_dir, tmp_path):
    """llama-quantize writes a one-output head ({d+d2, 1}) as a 1-D tensor; split and merge take it."""
    from otter_gguf.io.llama_quantize import quantize

    f16 = convert(adapter_reward1_dir, base, tmp_path / "one-f16.gguf", outtype="f16", progress=False)
    q = quantize(f16, tmp_path / "one-q4_k_m.gguf", "q4_k_m")
    head = next(t for t in GGUFReader(q).tensors if t.name == gguf_name(T.HEAD))
    assert [int(x) for x in head.shape] == [512] and head.tensor_type == QT.Q8_0
    r = cli("split", q, "--base-out", tmp_path / "b.gguf", "--head-out", tmp_path / "h.gguf", "--no-progress")
    assert r.exit_code == 0, r.output
    r = cli("merge", tmp_path / "b.gguf", tmp_path / "h.gguf", "-o", tmp_path / "m.gguf", "--no-progress")
    assert r.exit_code == 0, r.output
    # the same tensors (names, types, bytes) and metadata; llama-quantize orders the tensors by layer and
    # writes general.file_type after the otter.* keys, merge puts the base's tensors and keys first
    assert _tensors(tmp_path / "m.gguf") == _tensors(q)
    kv = lambda p: {k: f.contents() for k, f in GGUFReader(p).fields.items() if not k.startswith("GGUF.")}  # noqa: E731
    assert kv(tmp_path / "m.gguf") == kv(q)


# ================================================================== qwen3 and gemma3 (docs/OTTER.md §7)
# What only these architectures' sidecars have: the new tensor kinds, gemma3's 1 + w norms and its own
# fingerprint keys; merge refuses a head made for a base with another sliding window (their malformed
# variants: test_malformed_sidecar_refused above).
@pytest.mark.parametrize("arch", ARCHS)
def test_sidecar_has_the_architectures_tensors_and_keys(made_arch, arch):
    base, ad, one, head = made_arch(arch)
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


# --- merge onto another base
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
def test_merge_refuses_a_gemma3_head_for_another_window_or_rope(made_arch, tmp_path, change, needle):
    base, _, _, head = made_arch("gemma3")
    other = _base_with(base, tmp_path / "other.gguf", **change)
    with pytest.raises(ConvertError, match="fingerprint mismatch") as e:
        merge(other, [head], tmp_path / "m.gguf", progress=False)
    assert needle in str(e.value)
    r = cli("merge", other, head, "-o", tmp_path / "m.gguf")
    assert r.exit_code == 2 and needle in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf"]


def test_merge_refuses_a_head_for_the_other_architecture(made_arch, tmp_path):
    q_base, _, _, q_head = made_arch("qwen3")
    g_base, _, _, g_head = made_arch("gemma3")
    for base, head, want in ((g_base, q_head, "'qwen3', base has 'gemma3'"), (q_base, g_head, "'gemma3', base has 'qwen3'")):
        with pytest.raises(ConvertError, match="fingerprint mismatch") as e:
            merge(base, [head], tmp_path / "m.gguf", progress=False)
        assert f"{Keys.Base.ARCHITECTURE} = {want}" in str(e.value)
