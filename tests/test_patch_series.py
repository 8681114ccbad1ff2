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
    # upstream's subject style: the component, then what the change does
    assert all(re.match(r"(llama|ggml(-[a-z]+)?) : ", s) for s in subjects), subjects


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


# the Otter source files and the upstream owner whose members each one defines (docs/RUNTIME.md)
OTTER_FILES = {
    "src/llama-otter.cpp": None,                        # loading, validation, adapters, model getters
    "src/llama-context-otter.cpp": "llama_context::",   # the heads of a context, signal outputs
    "src/llama-graph-otter.cpp": "llm_graph_context::",  # hooks and side layers
}


def test_otter_code_sits_with_its_owner():
    """Each Otter source file defines the members of one owner only: loading has no context or graph
    member, the context file no graph member, the graph file no context member; each is listed in
    src/CMakeLists.txt beside its owner's file."""
    added = _added_by_file(otter_only=True)
    assert set(OTTER_FILES) <= set(added), sorted(added)
    owners = [o for o in OTTER_FILES.values() if o]
    for path, owner in OTTER_FILES.items():
        defined = {m for ln in added[path] for m in re.findall(r"^\S.*?\b(\w+::)\w+\(", ln)}
        assert (defined & set(owners)) == ({owner} if owner else set()), (path, defined)
    cmake = added["src/CMakeLists.txt"]
    assert [ln.strip() for ln in cmake if "otter" in ln and ln.strip().endswith(".cpp")] == \
        ["llama-otter.cpp", "llama-context-otter.cpp", "llama-graph-otter.cpp"]
    # beside the owner: the context-otter line follows llama-context.cpp (the patch's context line)
    for p in PATCHES:
        text = p.read_text()
        for f, owner_file in (("llama-context-otter.cpp", "llama-context.cpp"), ("llama-graph-otter.cpp", "llama-graph.cpp")):
            if f"+    {f}\n" in text:
                assert f"     {owner_file}\n+    {f}\n" in text, (p.name, f)


def test_architecture_variants_are_parameters_of_the_builders():
    """Shared Otter code has no per-architecture branch: the loader's list of supported bases is its only
    LLM_ARCH_ name, Q/K and sandwich norms follow the base layer's tensors, and what the tensors do not
    show (gemma3's embedding scale and GELU) the gemma3 builder passes to build_otter_inp()."""
    added = _added_by_file(otter_only=True)
    for path in OTTER_FILES:
        arch_lines = [ln for ln in added[path] if "LLM_ARCH_" in ln]
        if path == "src/llama-otter.cpp":
            # the supported-base list (0003: llama, qwen2; 0005 adds qwen3, gemma3), nothing else
            assert arch_lines and all(re.fullmatch(r"\s*if \((model\.arch != LLM_ARCH_\w+( && )?)+\) \{", ln)
                                      for ln in arch_lines), arch_lines
            assert all(f"LLM_ARCH_{a.upper()}" in arch_lines[-1] for a in C.RUNTIME_ARCHITECTURES), arch_lines
        else:
            assert not arch_lines, (path, arch_lines)
    for f in ("src/llama-graph.cpp", "src/llama-context.cpp", "src/llama-kv-cache.cpp", "src/llama-kv-cache-iswa.cpp"):
        assert not [ln for ln in added.get(f, []) if "LLM_ARCH_" in ln], f
    inp = {a: [ln.strip() for ln in added[f"src/models/{a}.cpp"] if "build_otter_inp(" in ln] for a in C.RUNTIME_ARCHITECTURES}
    assert inp["gemma3"] == ["build_otter_inp(model, inp_pos, inp_attn, inp_out_ids, { sqrtf(float(n_embd)), LLM_FFN_GELU });"]
    for a in set(C.RUNTIME_ARCHITECTURES) - {"gemma3"}:
        assert inp[a] == ["build_otter_inp(model, inp_pos, inp_attn, inp_out_ids);"], (a, inp[a])
    graph_h = "\n".join(added["src/llama-graph.h"])
    assert re.search(r"struct llm_graph_otter_arch \{\s*float\s+embd_scale = 1\.0f;.*?llm_ffn_op_type ffn_op\s+= LLM_FFN_SILU;", graph_h, re.S)


def test_the_series_check_script_imports_and_names_existing_tests():
    """`.ci/check-series` (make series-check) loads (its imports resolve in this layout) and every test
    file it runs for a prefix exists, so a moved module or test file cannot silently break it."""
    import importlib.machinery
    import importlib.util

    path = Path(__file__).parents[1] / ".ci" / "check-series"
    loader = importlib.machinery.SourceFileLoader("check_series", str(path))
    spec = importlib.util.spec_from_loader("check_series", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    assert callable(mod.pinned_llama_cpp_source) and callable(mod.rb.apply_series)
    assert set(mod.TESTS) == {4, 5, 6, 7} and max(mod.TESTS) == len(PATCHES) - 1
    for k, args in mod.TESTS.items():
        files = [a for a in args if a.endswith(".py")]
        assert files, k
        for f in files:
            assert (Path(__file__).parents[1] / f).is_file(), (k, f)
