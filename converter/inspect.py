"""``otter-gguf inspect``: what is in a (possibly Otter) GGUF file."""

from __future__ import annotations

import os
from typing import Any

from otter_gguf.format.constants import FINGERPRINT_KEYS, GENERAL_TYPE_ADAPTER, KEY_PREFIX, Keys, SidecarKeys
from otter_gguf.io import gguf_read, otter_read
from otter_gguf_converter.errors import ConvertError


def _opt_int(reader, key):
    v = gguf_read.field_value(reader, key)
    if isinstance(v, list):
        v = v[0] if v and all(x == v[0] for x in v) else v
    return v


def inspect_gguf(path) -> dict[str, Any]:
    """Summarise a GGUF file; raises ConvertError if it is not a readable GGUF."""
    p = os.fspath(path)
    reader = gguf_read.open_gguf(p, "file")
    if gguf_read.field_value(reader, SidecarKeys.GENERAL_TYPE) == GENERAL_TYPE_ADAPTER:
        return _inspect_sidecar(p, reader)  # an Otter adapter, or refused with what it is
    arch = gguf_read.field_value(reader, "general.architecture")
    a = arch if isinstance(arch, str) else "?"
    toks = gguf_read.token_bytes(reader)
    d = _opt_int(reader, f"{a}.embedding_length")
    h = _opt_int(reader, f"{a}.attention.head_count")
    hd = _opt_int(reader, f"{a}.attention.key_length")
    if hd is None and isinstance(d, int) and isinstance(h, int) and h:
        hd = d // h
    base_tensors = [t for t in reader.tensors if not gguf_read.is_otter_tensor(t.name)]
    otter_tensors = [t for t in reader.tensors if gguf_read.is_otter_tensor(t.name)]
    mix: dict[str, int] = {}
    for t in base_tensors:
        k = gguf_read.qtype_name(t.tensor_type)
        mix[k] = mix.get(k, 0) + 1
    base_bytes = sum(int(t.n_bytes) for t in base_tensors)
    base = {
        "architecture": arch,
        "name": gguf_read.field_value(reader, "general.name"),
        "embedding_length": d,
        "block_count": _opt_int(reader, f"{a}.block_count"),
        "head_count": h,
        "head_count_kv": _opt_int(reader, f"{a}.attention.head_count_kv") or h,
        "key_length": hd,
        "feed_forward_length": _opt_int(reader, f"{a}.feed_forward_length"),
        "vocab_size": len(toks) if toks else None,
        "vocab_hash": gguf_read.vocab_hash_tokens(toks) if toks else None,
        "file_type": gguf_read.field_value(reader, "general.file_type"),
        "n_tensors": len(base_tensors),
        "bytes": base_bytes,
        "quant_mix": dict(sorted(mix.items(), key=lambda kv: -kv[1])),
    }
    otter_keys = [k for k in gguf_read.kv_keys(reader) if k.startswith(KEY_PREFIX)]
    result: dict[str, Any] = {
        "file": p,
        "kind": "model",
        "file_bytes": os.path.getsize(p),
        "gguf_version": int(reader.fields["GGUF.version"].contents()),
        "alignment": int(reader.alignment),
        "base": base,
        "otter": None,
    }
    if not otter_keys and not otter_tensors:
        return result
    meta = {k: gguf_read.field_value(reader, k) for k in otter_keys}
    tensors = _otter_tensors(reader)
    otter_bytes = sum(x["bytes"] for x in tensors)
    mismatches = []
    for key, bk in FINGERPRINT_KEYS.items():
        if key not in meta:
            mismatches.append(f"{key} missing")
        elif meta[key] != base[bk]:
            mismatches.append(f"{key} = {meta[key]!r}, file's base has {base[bk]!r}")
    result["otter"] = {
        "metadata": meta,
        "tensors": tensors,
        "n_tensors": len(tensors),
        "bytes": otter_bytes,
        "ratio_to_base": (otter_bytes / base_bytes) if base_bytes else None,
        "fingerprint_ok": not mismatches,
        "fingerprint_mismatches": mismatches,
    }
    return result


def _otter_tensors(reader) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "shape": [int(x) for x in t.shape],  # ggml order: ne0 first
            "type": gguf_read.qtype_name(t.tensor_type),
            "bytes": int(t.n_bytes),
        }
        for t in reader.tensors if gguf_read.is_otter_tensor(t.name)
    ]


def _inspect_sidecar(p: str, reader) -> dict[str, Any]:
    """An Otter adapter GGUF: its head, and the base it was made for (its fingerprint)."""
    sc = otter_read.read_sidecar(p, "file")
    tensors = _otter_tensors(reader)
    return {
        "file": p,
        "file_bytes": os.path.getsize(p),
        "gguf_version": int(reader.fields["GGUF.version"].contents()),
        "alignment": int(reader.alignment),
        "kind": "otter_adapter",
        "base": None,
        "otter": {
            "name": sc.name,
            "metadata": sc.metadata,
            "for_base": {FINGERPRINT_KEYS[k]: v for k, v in sc.fingerprint.items()},
            "tensors": tensors,
            "n_tensors": len(tensors),
            "bytes": sum(x["bytes"] for x in tensors),
        },
    }


def _head_lines(m: dict[str, Any]) -> list[str]:
    names = m.get(Keys.Head.SIGNAL_NAMES) or []
    return [
        f"otter: version {m.get(Keys.VERSION)}, head kind {m.get(Keys.Head.KIND)}, "
        f"n_out {m.get(Keys.Head.OUTPUT_SIZE)}" + (f" (signals: {', '.join(names)})" if names else ""),
        f"  d2={m.get(Keys.EMBEDDING_LENGTH)} h2={m.get(Keys.Attention.HEAD_COUNT)} "
        f"h2_kv={m.get(Keys.Attention.HEAD_COUNT_KV)} f2={m.get(Keys.FEED_FORWARD_LENGTH)}  "
        f"base_model: {m.get(Keys.BASE_MODEL)!r}",
    ]


def _tensor_lines(o: dict[str, Any]) -> list[str]:
    lines = ["  metadata:"]
    for k, v in o["metadata"].items():
        lines.append(f"    {k} = {v!r}")
    lines.append(f"  tensors ({o['n_tensors']}):")
    w = max([len(t["name"]) for t in o["tensors"]] + [4])
    lines.append(f"    {'name':<{w}}  {'shape (ne)':<16} {'type':<6} {'bytes':>12}")
    for t in o["tensors"]:
        shape = "{" + ", ".join(str(x) for x in t["shape"]) + "}"
        lines.append(f"    {t['name']:<{w}}  {shape:<16} {t['type']:<6} {t['bytes']:>12}")
    return lines


def _format_sidecar(r: dict[str, Any]) -> str:
    o = r["otter"]
    fb = o["for_base"]
    lines = [f"file: {r['file']} ({_h(r['file_bytes'])}, GGUF v{r['gguf_version']}): Otter adapter GGUF"
             + (f" (head {o['name']!r})" if o.get("name") else "")]
    lines.append(
        f"for base: {fb['architecture']}  d={fb['embedding_length']} L={fb['block_count']} h={fb['head_count']} "
        f"h_kv={fb['head_count_kv']} hd={fb['key_length']} f={fb['feed_forward_length']} V={fb['vocab_size']} "
        f"vocab hash {fb['vocab_hash']:#018x}"
    )
    lines += _head_lines(o["metadata"])
    lines += _tensor_lines(o)
    lines.append(f"size: otter {_h(o['bytes'])}")
    return "\n".join(lines)


def _h(n: int | None) -> str:
    if n is None:
        return "?"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{int(x)} B" if unit == "B" else f"{x:.2f} {unit}"
        x /= 1024
    return str(n)


def format_report(r: dict[str, Any]) -> str:
    if r.get("kind") == "otter_adapter":
        return _format_sidecar(r)
    b = r["base"]
    lines = [f"file: {r['file']} ({_h(r['file_bytes'])}, GGUF v{r['gguf_version']})"]
    lines.append(
        f"base: {b['architecture']}" + (f" ({b['name']})" if b.get("name") else "")
        + f"  d={b['embedding_length']} L={b['block_count']} h={b['head_count']} h_kv={b['head_count_kv']}"
        f" hd={b['key_length']} f={b['feed_forward_length']} V={b['vocab_size']}"
    )
    lines.append("  quant mix: " + (", ".join(f"{k} x{v}" for k, v in b["quant_mix"].items()) or "(no tensors)"))
    lines.append(f"  tensors: {b['n_tensors']}, {_h(b['bytes'])}")
    o = r["otter"]
    if o is None:
        lines.append("otter: no Otter head in this file (a plain GGUF)")
        return "\n".join(lines)
    m = o["metadata"]
    lines += _head_lines(m)
    if o["fingerprint_ok"]:
        lines.append(f"  fingerprint: matches this file's base (vocab hash {m[Keys.Base.VOCAB_HASH]:#018x})")
    else:
        lines.append("  fingerprint: MISMATCH: " + "; ".join(o["fingerprint_mismatches"]))
    lines += _tensor_lines(o)
    ratio = o["ratio_to_base"]
    lines.append(
        f"size: base {_h(b['bytes'])}, otter {_h(o['bytes'])}"
        + (f" ({100 * ratio:.2f}% of the base)" if ratio is not None else "")
    )
    return "\n".join(lines)


__all__ = ["inspect_gguf", "format_report", "ConvertError"]
