"""otter-gguf inspect: Otter GGUF, plain GGUF, --json, bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from otter_gguf.cli import main as cli_main
from otter_gguf.format.constants import Keys, gguf_name
from otter_gguf.format.constants import OtterTensor as T
from otter_gguf_converter import ConvertError, convert, inspect_gguf, vocab_hash_tokens

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
    assert gguf_name(T.HEAD) in r.stdout and "q8_0" in r.stdout
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
    assert by_name[gguf_name(T.ATTN_V, 2)] == {"name": gguf_name(T.ATTN_V, 2), "shape": [512, 64],
                                               "type": "q6_k", "bytes": 64 * 2 * 210}
    assert d["otter"]["bytes"] == sum(int(t.n_bytes) for t in otter_t)
    assert d["base"]["bytes"] == sum(int(t.n_bytes) for t in base_t)
    assert d["otter"]["ratio_to_base"] == pytest.approx(d["otter"]["bytes"] / d["base"]["bytes"])
    assert sum(d["base"]["quant_mix"].values()) == len(base_t)
    assert d["otter"]["metadata"][Keys.Head.SIGNAL_NAMES] == rd.fields[Keys.Head.SIGNAL_NAMES].contents()
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


def _corrupt(src: Path, dst: Path, key: str, *, part: int = -1, what: str = "value") -> bytes:
    """Copy ``src`` to ``dst`` with the first two bytes of one string of metadata ``key`` set to 0xff 0xfe:
    of its name (``what="key"``) or of its value's part ``part`` (the last: a scalar string; an array
    element's part index otherwise). Returns the corrupted string's new bytes."""
    f = GGUFReader(src).fields[key]
    i = 1 if what == "key" else (part % len(f.parts))
    off = f.offset + sum(int(p.nbytes) for p in f.parts[:i])
    old = bytes(f.parts[i])
    assert len(old) >= 2
    data = bytearray(src.read_bytes())
    assert data[off:off + len(old)] == old
    data[off:off + 2] = b"\xff\xfe"
    dst.write_bytes(bytes(data))
    return bytes(data[off:off + len(old)])


def _first_signal_part(path: Path) -> int:
    return int(GGUFReader(path).fields[Keys.Head.SIGNAL_NAMES].data[0])


@pytest.mark.parametrize("which, key", [("plain", "general.name"), ("otter", Keys.BASE_MODEL),
                                        ("otter", Keys.Head.SIGNAL_NAMES)])
def test_non_utf8_string_exits_2(which, key, plain_gguf, otter_gguf, tmp_path):
    src = plain_gguf if which == "plain" else otter_gguf
    part = _first_signal_part(src) if key == Keys.Head.SIGNAL_NAMES else -1
    p = tmp_path / "bad-utf8.gguf"
    bad = _corrupt(src, p, key, part=part)
    r = inspect(p)
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "internal error" not in r.output and "Traceback" not in r.output
    assert f"Error: file {p}: the value of metadata key {key} is not valid UTF-8 (expected a UTF-8 string; " \
           f"found {bad!r}, bad byte at offset 0)" in r.output
    with pytest.raises(ConvertError, match=f"metadata key {key} is not valid UTF-8"):
        inspect_gguf(p)


def test_non_utf8_key_name_exits_2(plain_gguf, tmp_path):
    p = tmp_path / "bad-key.gguf"
    bad = _corrupt(plain_gguf, p, "general.name", what="key")
    assert bad == b"\xff\xfeneral.name"
    r = inspect(p)
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert f"file {p}: a metadata key or tensor name is not valid UTF-8 (expected a UTF-8 string; found {bad!r}" \
        in r.output


def test_convert_refuses_a_non_utf8_base(plain_gguf, adapter_reward3_dir, tmp_path):
    base = tmp_path / "base.gguf"
    _corrupt(plain_gguf, base, "general.name")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    msg = f"base {base}: the value of metadata key general.name is not valid UTF-8 (expected a UTF-8 string; "
    with pytest.raises(ConvertError, match="^" + re.escape(msg)):
        convert(adapter_reward3_dir, base, out_dir / "o.gguf", progress=False)
    assert list(out_dir.iterdir()) == []  # nothing written, no temporary file left


def test_non_utf8_token_text_is_hashed_as_bytes(plain_gguf, tmp_path):
    """Token texts are bytes to Otter (the vocab hash is over bytes, docs/FORMAT.md): inspect reads them."""
    f = GGUFReader(plain_gguf).fields["tokenizer.ggml.tokens"]
    toks = [bytes(f.parts[i]) for i in f.data]
    k = next(j for j, t in enumerate(toks) if len(t) >= 2)
    p = tmp_path / "bad-token.gguf"
    toks[k] = _corrupt(plain_gguf, p, "tokenizer.ggml.tokens", part=int(f.data[k]))
    r = inspect(p, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base"]["vocab_hash"] == vocab_hash_tokens(toks) != vocab_hash_tokens(
        [bytes(f.parts[i]) for i in f.data])
