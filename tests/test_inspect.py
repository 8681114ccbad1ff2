"""otter-gguf inspect: Otter GGUF, plain GGUF, --json, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from otter_gguf.cli import main as cli_main
from otter_gguf_converter import convert

# the Otter GGUF is quantized with ggml's quantizer from the runtime's libggml-base
pytestmark = pytest.mark.runtime


@pytest.fixture(scope="session")
def plain_gguf(hf_base_gguf, tiny_llama_dir) -> Path:
    return hf_base_gguf(tiny_llama_dir, "f32")


@pytest.fixture(scope="module")
def otter_gguf(tmp_path_factory, plain_gguf, adapter_reward3_dir) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "otter.gguf"
    return convert(adapter_reward3_dir, plain_gguf, out, outtype="q4_k_m", progress=False)


def inspect(*args):
    return CliRunner().invoke(cli_main, ["inspect", *[str(a) for a in args]])


def test_lists_every_otter_tensor(otter_gguf):
    r = inspect(otter_gguf)
    assert r.exit_code == 0, r.output
    names = [t.name for t in GGUFReader(otter_gguf).tensors if "otter_" in t.name]
    assert len(names) == 1 + 4 * 12 + 3  # embd, 4 layers x (9 + 3 biases), norm, head, head bias
    lines = r.stdout.splitlines()
    for n in names:
        assert any(ln.split() and ln.split()[0] == n for ln in lines), f"{n} not listed"
    assert "otter_head.weight" in r.stdout and "q8_0" in r.stdout
    assert "llama" in r.stdout and "d=256 L=4 h=4 h_kv=2 hd=64 f=768 V=512" in r.stdout
    assert "fingerprint: matches" in r.stdout
    assert "% of the base" in r.stdout


def test_json(otter_gguf):
    r = inspect(otter_gguf, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    rd = GGUFReader(otter_gguf)
    otter_t = [t for t in rd.tensors if "otter_" in t.name]
    base_t = [t for t in rd.tensors if "otter_" not in t.name]
    assert [t["name"] for t in d["otter"]["tensors"]] == [t.name for t in otter_t]
    by_name = {t["name"]: t for t in d["otter"]["tensors"]}
    assert by_name["blk.2.otter_attn_v.weight"] == {"name": "blk.2.otter_attn_v.weight", "shape": [512, 64],
                                                    "type": "q6_k", "bytes": 64 * 2 * 210}
    assert d["otter"]["bytes"] == sum(int(t.n_bytes) for t in otter_t)
    assert d["base"]["bytes"] == sum(int(t.n_bytes) for t in base_t)
    assert d["otter"]["ratio_to_base"] == pytest.approx(d["otter"]["bytes"] / d["base"]["bytes"])
    assert sum(d["base"]["quant_mix"].values()) == len(base_t)
    assert d["otter"]["metadata"]["otter.head.signal_names"] == rd.fields["otter.head.signal_names"].contents()
    assert d["otter"]["fingerprint_ok"] is True


def test_plain_gguf_has_no_otter_head(plain_gguf):
    r = inspect(plain_gguf)
    assert r.exit_code == 0, r.output
    assert "no Otter head" in r.stdout
    j = json.loads(inspect(plain_gguf, "--json").stdout)
    assert j["otter"] is None and j["base"]["architecture"] == "llama"
    assert j["base"]["quant_mix"] == {"f32": len(GGUFReader(plain_gguf).tensors)}


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing", "directory"])
def test_bad_file_exits_2(kind, plain_gguf, tmp_path):
    p = tmp_path / "bad.gguf"
    if kind == "garbage":
        p.write_bytes(b"\x00\x01 definitely not GGUF" * 100)
    elif kind == "truncated":
        p.write_bytes(plain_gguf.read_bytes()[:200_000])
    elif kind == "directory":
        p = tmp_path
    r = inspect(p)
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Error:" in r.output and str(p) in r.output
    expected = {"garbage": "not a GGUF file", "truncated": "truncated or corrupt", "missing": "no such file",
                "directory": "is a directory"}[kind]
    assert expected in r.output
