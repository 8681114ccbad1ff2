"""One quantization policy for the Otter tensors (docs/FORMAT.md, "Otter tensor types").

``otter-gguf convert --outtype X`` (converter/qtypes.py) and ``llama_model_quantize``
of the f16 Otter GGUF to X (patch 0006, ``llama_otter_tensor_type``) must give every
Otter tensor the same type, and the base tensors the types of quantizing the base
alone. Runtime tier: needs the patched runtime of the current patch series.
"""

from __future__ import annotations

import gguf
import pytest

pytestmark = pytest.mark.runtime

T = gguf.GGMLQuantizationType

# 16 layers, so that every layer bound of the table differs somewhere: i < L/16 = 1,
# i < L/8 = 2, i < 2, i < 4 and more(i) = {0, 1, 4, 7, 10, 13, 14, 15}
N_LAYER = 16

# the mixes llama_model_quantize makes without an imatrix (q2_k_s needs one)
MIXES = ("q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_m")

# the table of docs/FORMAT.md written out for L = 16 (h2 / h2_kv = 4), independently of both
# implementations: a rule that drifts on both sides together still fails here
EXPECTED = {
    "q3_k_m": {
        "blk.0.otter_attn_v.weight": T.Q5_K, "blk.1.otter_attn_v.weight": T.Q5_K,
        "blk.2.otter_attn_v.weight": T.Q4_K, "blk.15.otter_attn_v.weight": T.Q4_K,
        "blk.0.otter_ffn_down.weight": T.Q5_K, "blk.1.otter_ffn_down.weight": T.Q4_K,
        "blk.5.otter_attn_output.weight": T.Q4_K,
        "blk.0.otter_attn_q.weight": T.Q3_K, "blk.3.otter_ffn_up.weight": T.Q3_K,
        "otter_token_embd.weight": T.Q3_K,
    },
    "q3_k_l": {
        "blk.9.otter_attn_v.weight": T.Q5_K, "blk.9.otter_ffn_down.weight": T.Q5_K,
        "blk.9.otter_attn_output.weight": T.Q5_K, "blk.9.otter_ffn_gate.weight": T.Q3_K,
    },
    "q4_k_s": {
        "blk.3.otter_attn_v.weight": T.Q5_K, "blk.4.otter_attn_v.weight": T.Q4_K,
        "blk.1.otter_ffn_down.weight": T.Q5_K, "blk.2.otter_ffn_down.weight": T.Q4_K,
        "blk.0.otter_attn_output.weight": T.Q4_K,
    },
    "q4_k_m": {
        "blk.0.otter_attn_v.weight": T.Q6_K, "blk.2.otter_attn_v.weight": T.Q4_K,
        "blk.4.otter_attn_v.weight": T.Q6_K, "blk.15.otter_attn_v.weight": T.Q6_K,
        "blk.1.otter_ffn_down.weight": T.Q6_K, "blk.3.otter_ffn_down.weight": T.Q4_K,
        "blk.13.otter_ffn_down.weight": T.Q6_K, "blk.0.otter_attn_output.weight": T.Q4_K,
        "blk.0.otter_attn_k.weight": T.Q4_K, "otter_token_embd.weight": T.Q4_K,
    },
    "q5_k_m": {
        "blk.0.otter_attn_v.weight": T.Q6_K, "blk.3.otter_attn_v.weight": T.Q5_K,
        "blk.7.otter_attn_v.weight": T.Q6_K, "blk.10.otter_ffn_down.weight": T.Q6_K,
        "blk.12.otter_ffn_down.weight": T.Q5_K, "blk.0.otter_attn_output.weight": T.Q5_K,
    },
}


@pytest.fixture(scope="module")
def deep(tmp_path_factory, hf_base_gguf):
    """(adapter dir, f16 base GGUF, f16 Otter GGUF, work dir) of a 16-layer tiny llama."""
    from otter_gguf.reference import fixtures as fx
    from otter_gguf_converter.convert import convert

    d = tmp_path_factory.mktemp("quant-policy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fx.TINY, "L", N_LAYER)
        base_dir = fx.make_tiny_llama(d / "tiny-llama-16", seed=0)
    adapter = fx.make_adapter(d / "adapter", base_dir, "reward1", seed=0)
    base = hf_base_gguf(base_dir, "f16")
    otter = convert(adapter, base, d / "otter-f16.gguf", outtype="f16", progress=False)
    return adapter, base, otter, d


def _types(path) -> dict[str, T]:
    return {t.name: T(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("mix", MIXES)
def test_convert_and_llama_quantize_agree(deep, mix):
    from otter_gguf.format.constants import is_otter_tensor
    from otter_gguf.io.llama_quantize import quantize
    from otter_gguf_converter.convert import convert

    adapter, base, otter, d = deep
    converted = _types(convert(adapter, base, d / f"otter-{mix}.gguf", outtype=mix, progress=False))
    quantized = _types(quantize(otter, d / f"otter-f16-{mix}.gguf", mix, threads=2))
    base_alone = _types(quantize(base, d / f"base-f16-{mix}.gguf", mix, threads=2))

    otter_names = sorted(n for n in quantized if is_otter_tensor(n))
    assert otter_names == sorted(n for n in converted if is_otter_tensor(n))
    # otter_token_embd, otter_output_norm, otter_head and 9 per layer (reward1: no biases)
    assert len(otter_names) == 3 + 9 * N_LAYER
    diff = {n: (converted[n].name, quantized[n].name) for n in otter_names if converted[n] != quantized[n]}
    assert not diff, f"convert --outtype {mix} vs llama_model_quantize: {diff}"

    assert {n: t for n, t in quantized.items() if not is_otter_tensor(n)} == base_alone

    want = dict(EXPECTED[mix], **{"otter_head.weight": T.Q8_0, "otter_output_norm.weight": T.F32,
                                  "blk.0.otter_attn_norm.weight": T.F32})
    assert {n: quantized[n] for n in want} == want
    # the base comparison means something: the base mix upgrades some attn_v over attn_q
    assert len({base_alone[f"blk.{i}.attn_v.weight"] for i in range(N_LAYER)} | {base_alone["blk.0.attn_q.weight"]}) > 1


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_qwen3_gemma3_tensors_follow_the_policy(request, tmp_path, hf_base_gguf, arch):
    """The tensors of docs/OTTER.md §7 (side Q/K norms, gemma3's sandwich norms) under the same policy:
    1-D, so f32 after convert and after llama_model_quantize alike; every other Otter tensor of the same
    type both ways; the base tensors as the base quantized alone."""
    from otter_gguf.format.constants import is_otter_tensor
    from otter_gguf.io.llama_quantize import quantize
    from otter_gguf_converter.convert import convert

    base_dir, adapter = (request.getfixturevalue(f"tiny_{arch}_dir"), request.getfixturevalue(f"{arch}_adapter_dir"))
    base = hf_base_gguf(base_dir, "f16")
    otter = convert(adapter, base, tmp_path / "otter-f16.gguf", outtype="f16", progress=False)
    converted = _types(convert(adapter, base, tmp_path / "otter-q4_k_m.gguf", outtype="q4_k_m", progress=False))
    quantized = _types(quantize(otter, tmp_path / "otter-f16-q4_k_m.gguf", "q4_k_m", threads=2))
    base_alone = _types(quantize(base, tmp_path / "base-q4_k_m.gguf", "q4_k_m", threads=2))

    norms = [n for n in quantized if is_otter_tensor(n) and
             n.split(".")[-2] in ("otter_attn_q_norm", "otter_attn_k_norm", "otter_post_attention_norm", "otter_post_ffw_norm")]
    from otter_gguf.reference import fixtures as fx

    n_layer = {"qwen3": fx.TINY_QWEN3, "gemma3": fx.TINY_GEMMA3}[arch]["L"]
    assert len(norms) == (4 if arch == "gemma3" else 2) * n_layer
    assert all(quantized[n] == converted[n] == T.F32 for n in norms)
    otter_names = sorted(n for n in quantized if is_otter_tensor(n))
    assert otter_names == sorted(n for n in converted if is_otter_tensor(n))
    assert {n: converted[n] for n in otter_names} == {n: quantized[n] for n in otter_names}
    assert {n: t for n, t in quantized.items() if not is_otter_tensor(n)} == base_alone
