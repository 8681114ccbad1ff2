"""The shape of the patch series: the side stream reads the base graph through explicit
hooks in the graph builders, never through cb() debug names or an environment variable, and the
series ends with its marker, which stands apart from the rest. Static checks of patches/*.patch
(that every prefix builds and passes its runtime tests is checked by `.ci/check-series`,
`make series-check`, docs/RUNTIME.md "Patch series")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from otter_gguf.format import constants as C

pytestmark = pytest.mark.unit

PATCHES = sorted((Path(__file__).parents[1] / "patches").glob("*.patch"))

# hook -> the architectures whose graph builder must call it (docs/RUNTIME.md "Patch series")
BUILDER_HOOKS = {
    "build_otter_inp(": set(C.RUNTIME_ARCHITECTURES),
    "otter_hook_attn_norm(": set(C.RUNTIME_ARCHITECTURES),
    "otter_hook_attn_out(": set(C.RUNTIME_ARCHITECTURES),
    "otter_hook_ffn_norm(": set(C.RUNTIME_ARCHITECTURES),
    "otter_hook_ffn_out(": {"gemma3"},
    "build_otter_layer(": set(C.RUNTIME_ARCHITECTURES),
    "build_otter_out(": set(C.RUNTIME_ARCHITECTURES),
}


def _added_by_file(otter_only: bool = False) -> dict[str, list[str]]:
    """The lines the series adds, per source file (all patches together, or the Otter patches only)."""
    out: dict[str, list[str]] = {}
    for p in PATCHES:
        if otter_only and "Otter" not in re.search(r"^Subject: .*$", p.read_text(), re.M).group(0):
            continue
        cur = None
        for ln in p.read_text().splitlines():
            m = re.match(r"diff --git a/(\S+) b/", ln)
            if m:
                cur = out.setdefault(m.group(1), [])
            elif cur is not None and ln.startswith("+") and not ln.startswith("+++"):
                cur.append(ln[1:])
    return out


def test_series_order_and_subjects():
    subjects = [re.search(r"^Subject: \[PATCH[^\]]*\] (.*)$", p.read_text(), re.M).group(1) for p in PATCHES]
    assert [int(p.name[:4]) for p in PATCHES] == list(range(1, len(PATCHES) + 1))
    assert len(set(subjects)) == len(subjects)
    assert "llama_otter_series" in subjects[-1]  # the marker is last
    assert all(s.startswith("llama : ") for s in subjects), subjects


def test_the_marker_stands_apart_from_the_reviewable_patches():
    """The downstream-only marker applies to the pristine source on its own: its context and removed
    lines are upstream code (no Otter line), so .ci/check-series can build every prefix + marker."""
    marker = PATCHES[-1].read_text()
    body = marker[marker.index("\ndiff --git"):]
    upstream = [ln[1:] for ln in body.splitlines()
                if ln[:1] in (" ", "-") and not ln.startswith("---")]
    assert upstream and not [ln for ln in upstream if "otter" in ln.lower()]
    for p in PATCHES[:-1]:
        assert "llama_otter_series" not in p.read_text(), p.name


def test_the_adapter_api_sits_beside_lora_in_llama_h():
    """llama.h: the Otter adapter functions in the Adapters section (after the aLoRA getters), their
    activation beside llama_set_adapters_lora / llama_set_adapter_cvec, the signal getters after the
    embeddings getters; only the marker after llama_print_system_info."""
    added = "\n".join(_added_by_file(otter_only=True)["include/llama.h"])
    for fn in ("llama_adapter_otter_init", "llama_model_get_adapter_otter", "llama_set_adapters_otter",
               "llama_get_otter_signals_ith"):
        assert f" {fn}(" in added, fn
    hunks = {}
    for p in PATCHES[:-1]:
        text = p.read_text()
        for m in re.finditer(r"^@@ [^@]*@@ [^\n]*\n((?:[ +\-\\][^\n]*\n?)*)", text, re.M):
            for fn in re.findall(r"^\+.*LLAMA_API [^(]* \*?(llama_\w*otter\w*)\(", m.group(1), re.M):
                before = [ln for ln in m.group(1).splitlines() if ln.startswith(" ")]
                hunks[fn] = "\n".join(before)
    assert "llama_adapter_get_alora_invocation_tokens" in hunks["llama_adapter_otter_init"]
    assert "llama_set_adapter_cvec" in hunks["llama_set_adapters_otter"] or \
        "il_end" in hunks["llama_set_adapters_otter"]
    assert "llama_get_embeddings_seq" in hunks["llama_get_otter_signals_ith"]
    assert all("llama_print_system_info" not in h for h in hunks.values())


def test_graph_builders_call_every_hook():
    added = _added_by_file()
    for hook, archs in BUILDER_HOOKS.items():
        for arch in C.RUNTIME_ARCHITECTURES:
            calls = [ln for ln in added.get(f"src/models/{arch}.cpp", []) if hook in ln]
            if arch in archs:
                assert len(calls) == 1, (arch, hook, calls)
            else:
                assert not calls, (arch, hook, calls)
    # build_attn() and build_ffn() hand over the attention output and the FFN activation
    graph = added["src/llama-graph.cpp"]
    assert sum("otter_hook_kqv(cur, il);" in ln for ln in graph) == 2  # KV and interleaved-SWA attention
    assert sum("otter_hook_ffn_act(cur, il);" in ln for ln in graph) == 1
    # every Otter edit of a graph builder is a one-line hook: the builders get nothing else
    otter = _added_by_file(otter_only=True)
    for arch in C.RUNTIME_ARCHITECTURES:
        other = [ln for ln in otter[f"src/models/{arch}.cpp"] if ln.strip() and not any(h in ln for h in BUILDER_HOOKS)]
        assert not other, (arch, other)


def test_no_callback_names_and_no_environment_variable():
    lines = [ln for ls in _added_by_file().values() for ln in ls]
    # cb() names are debug labels: the series must not read them
    assert not [ln for ln in lines if re.search(r"strcmp\(\s*name\b|name\s*==\s*\"(attn_norm|kqv_out|ffn_norm|ffn_swiglu)\"", ln)]
    graph_cb = re.search(r"void llm_graph_context::cb\(.*?\n}\n", "\n".join(_added_by_file()["src/llama-graph.cpp"]), re.S)
    assert graph_cb is None  # cb() itself is not patched
    assert not [ln for ln in lines if "getenv" in ln]
    assert not [ln for ln in lines if re.search(r"\bLLAMA_OTTER\b", ln)]
