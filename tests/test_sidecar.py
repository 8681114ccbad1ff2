"""Otter adapter GGUFs ("sidecars"): convert --sidecar, split, merge, inspect, the Python reader.

A sidecar holds the Otter tensors and otter.* metadata of one head (docs/FORMAT.md
"Adapter GGUF"); split and merge turn a one-file Otter GGUF into base + sidecar and
back, byte for byte; no command ever changes its inputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from helpers import rewrite, sidecar_mutations
from otter_gguf.cli import main as cli_main
from otter_gguf.format.constants import (
    ADAPTER_TYPE_OTTER, ALL_KEYS, GENERAL_TYPE_ADAPTER, Keys, SidecarKeys, gguf_name, is_otter_tensor,
)
from otter_gguf.format.constants import OtterTensor as T
from otter_gguf.io.otter_read import read_sidecar
from otter_gguf_converter import ConvertError, convert

pytestmark = pytest.mark.unit


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


@pytest.mark.parametrize("outtype", [pytest.param("f32", marks=pytest.mark.unit),
                                     pytest.param("q4_k_m", marks=pytest.mark.runtime)])
def test_split_and_merge_round_trip(made, base, tmp_path, outtype):
    """split(one-file) = (the base's bytes, convert --sidecar's bytes); merge(base, sidecar) = convert's bytes."""
    one, head = made(outtype)
    h_base, h_one, h_head = sha(base), sha(one), sha(head)
    r = cli("split", one, "--base-out", tmp_path / "b.gguf", "--head-out", tmp_path / "h.gguf",
            "--name", "helpful", "--no-progress")
    assert r.exit_code == 0, r.output
    assert sha(tmp_path / "b.gguf") == h_base
    assert sha(tmp_path / "h.gguf") == h_head
    r = cli("merge", base, head, "-o", tmp_path / "m.gguf", "--no-progress")
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


def test_inspect_shows_a_sidecar(made):
    _, head = made("f32")
    r = cli("inspect", head)
    assert r.exit_code == 0, r.output
    assert "Otter adapter GGUF (head 'helpful')" in r.stdout
    assert "for base: llama  d=256 L=4 h=4 h_kv=2 hd=64 f=768 V=512" in r.stdout
    assert "head kind reward, n_out 3" in r.stdout
    assert gguf_name(T.HEAD) in r.stdout
    d = json.loads(cli("inspect", head, "--json").stdout)
    assert d["kind"] == "otter_adapter" and d["base"] is None and d["otter"]["name"] == "helpful"
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


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_sidecar_refused(made, tmp_path, case):
    _, head = made("f32")
    needle = MALFORMED[case]
    bad = rewrite(head, tmp_path / f"{case}.gguf", **sidecar_mutations()[case](head))
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


def test_rewritten_sidecar_still_reads(made, tmp_path):
    """The malformed cases differ from a good file only in what they change."""
    _, head = made("f32")
    sc = read_sidecar(rewrite(head, tmp_path / "same.gguf"))
    assert sc.name == "helpful" and sc.config.head_output_size == 3 and sc.architecture == "llama"


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
