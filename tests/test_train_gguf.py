"""Training on the GGUF you serve: the base read back from a GGUF, its tokenizer, and
the head it gives, checked against the runtime; the real SmolLM2 model in the slow tier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from otter_gguf.reference.model import load_base

STRIDE_TEXT = "the food was great but the staff was rude. we found the room lovely!"


def _kld(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    def lsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = lsm(ref.astype(np.float64)), lsm(other.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(-1)


@pytest.mark.runtime
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_f32_gguf_gives_back_the_hf_weights(request, hf_base_gguf, fixture):
    """llama.cpp's converter permutes llama's Q/K rows; load_base_gguf undoes it exactly."""
    from otter_gguf.reference.gguf_base import load_base_gguf

    hf_dir = request.getfixturevalue(fixture)
    hf = load_base(hf_dir)
    gg = load_base_gguf(hf_base_gguf(hf_dir, "f32"))
    assert gg.config.otter_hparams() == hf.config.otter_hparams()
    assert gg.config.rope_theta == hf.config.rope_theta and gg.config.rms_norm_eps == pytest.approx(
        hf.config.rms_norm_eps)
    assert gg.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert sorted(gg.weights) == sorted(hf.weights)
    for k, v in hf.weights.items():
        torch.testing.assert_close(gg.weights[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.runtime
def test_otter_gguf_gives_back_the_adapter(tmp_path, hf_base_gguf, tiny_llama_dir, adapter_reward3_dir):
    """load_otter_gguf reads an f32 Otter GGUF's side tensors back exactly (side Q/K un-permuted)."""
    from otter_gguf.format.adapter import load_adapter
    from otter_gguf.reference.gguf_base import load_otter_gguf
    from otter_gguf_converter import convert

    out = convert(adapter_reward3_dir, hf_base_gguf(tiny_llama_dir, "f32"), tmp_path / "o.gguf", outtype="f32",
                  progress=False)
    cfg, tensors = load_adapter(adapter_reward3_dir)
    m = load_otter_gguf(out, cfg)
    assert sorted(m.tensors) == sorted(tensors)
    for k, v in tensors.items():
        torch.testing.assert_close(m.tensors[k], v.float(), rtol=0, atol=0, msg=k)


@pytest.mark.runtime
def test_gguf_tokenizer_matches_the_runtime_and_maps_offsets(hf_base_gguf, tiny_llama_dir):
    from llama_cpp import Llama

    from otter_gguf.tools.train import GGUFTokenizer

    path = hf_base_gguf(tiny_llama_dir, "f32")
    tok = GGUFTokenizer(path)
    text = "the café was great. anna said the staff was rude"
    ids, offs = tok.encode(text)
    llm = Llama(str(path), vocab_only=True, verbose=False)
    assert ids == llm.tokenize(text.encode(), add_bos=True, special=True)
    assert offs[0] == (0, 0)  # BOS is not in the text
    assert offs[-1][1] == len(text) and all(a <= b for a, b in offs)
    joined = "".join(text[a:b] for a, b in offs)
    assert joined.replace(" ", "") == text.replace(" ", "")


@pytest.mark.runtime
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen3_dir", "tiny_gemma3_dir"])
def test_train_from_gguf_gives_a_head_the_runtime_reproduces(request, tmp_path, hf_base_gguf, fixture, otter_runtime):
    """otter-gguf train BASE.gguf ... --gguf OUT: the runtime's signals on the written Otter GGUF
    equal the reference's (GGUF-loaded base + trained adapter) on the same tokens (llama, and the
    qwen3/gemma3 variants of docs/OTTER.md §7: per-head Q/K norms, sandwich norms, GELU, windows)."""
    from click.testing import CliRunner

    from otter_gguf import OtterLlama
    from otter_gguf.cli import main as cli
    from otter_gguf.format.adapter import load_adapter
    from otter_gguf.reference.gguf_base import load_base_gguf
    from otter_gguf.reference.model import OtterModel

    base = hf_base_gguf(request.getfixturevalue(fixture), "f32")
    recs = []
    for i, adj in enumerate(["great", "awful", "lovely", "rude"] * 4):
        text = f"the food was {adj} today"
        k = text.index(adj)
        recs.append({"text": text, "spans": [[k, len(text), 1.0 if i % 2 == 0 else -1.0]]})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out, gguf = tmp_path / "head", tmp_path / "head-f32.gguf"
    r = CliRunner().invoke(cli, ["train", str(base), str(data), "-o", str(out), "--steps", "20", "--lr", "1e-3",
                                 "--batch-size", "4", "--d2", "64", "--f2", "64", "--no-progress",
                                 "--gguf", str(gguf), "--outtype", "f32"])
    assert r.exit_code == 0, r.output
    cfg, tensors = load_adapter(out)
    ref = OtterModel(load_base_gguf(base), cfg, tensors)
    llm = OtterLlama(str(gguf), n_ctx=128, n_threads=1, verbose=False)
    for text in ("the food was great today", STRIDE_TEXT):
        s = llm.score(text)
        with torch.no_grad():
            want = ref(torch.tensor(s.tokens)).signals.numpy()
        np.testing.assert_allclose(s.signals, want, atol=2e-3 * max(1.0, np.abs(want).max()))
    # --sidecar: the same (seeded) head as an adapter GGUF beside the unchanged base
    head = tmp_path / "head-sidecar.gguf"
    r = CliRunner().invoke(cli, ["train", str(base), str(data), "-o", str(tmp_path / "head2"), "--steps", "20",
                                 "--lr", "1e-3", "--batch-size", "4", "--d2", "64", "--f2", "64", "--no-progress",
                                 "--gguf", str(head), "--outtype", "f32", "--sidecar"])
    assert r.exit_code == 0, r.output
    side = OtterLlama(str(base), otter_heads=[str(head)], n_ctx=128, n_threads=1, verbose=False)
    s1, s2 = llm.score(STRIDE_TEXT), side.score(STRIDE_TEXT)
    np.testing.assert_allclose(s2.signals, s1.signals, atol=1e-4)


# ---------------------------------------------------------------- the real model (slow)
@pytest.fixture(scope="module")
def smollm2():
    from otter_gguf.demo.smollm2 import model_path

    return model_path(quiet=True)


REVIEW = ("<|im_start|>user\nWrite a short review of a restaurant.<|im_end|>\n<|im_start|>assistant\n"
          "The food was delicious and the staff were friendly, but the room was noisy.")


@pytest.mark.slow
def test_smollm2_gguf_base_matches_the_runtime(smollm2, tmp_path):
    """The reference on SmolLM2's dequantized Q4_1 weights vs llama.cpp on the same file.

    Tolerance: llama.cpp's CPU matmul quantizes the activations to q8_1 before
    the Q4_1 dot products (and runs the Q8_0 embedding's tied LM head the same
    way), so the logits differ by that rounding only: measured mean KLD
    0.0034 nats/token, max 0.009, top-1 100% on this text. A wrong Q/K layout
    (the rows left in llama.cpp's order) gives a KLD two orders of magnitude larger."""
    from llama_cpp import Llama

    from otter_gguf.reference.gguf_base import load_base_gguf
    from otter_gguf_converter import rope_permute

    torch.set_num_threads(2)
    base = load_base_gguf(smollm2)
    assert base.config.num_hidden_layers == 30 and base.config.hidden_size == 576
    assert base.config.tie_word_embeddings and base.config.rope_theta == 100000.0
    llm = Llama(str(smollm2), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    ids = llm.tokenize(REVIEW.encode(), add_bos=True, special=True)
    llm.eval(ids)
    rt = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ref = base(torch.tensor(ids)).numpy()
    kld = _kld(ref, rt)
    assert kld.mean() < 0.01 and kld.max() < 0.05, (kld.mean(), kld.max())
    assert (ref.argmax(-1) == rt.argmax(-1)).mean() >= 0.95
    # the same weights as an F32 GGUF (dequantize_gguf): no activation rounding left, the
    # runtime and the reference agree to float32 accumulation order (measured KLD 5e-7)
    from otter_gguf.reference.gguf_base import dequantize_gguf

    f32 = Llama(str(dequantize_gguf(smollm2, tmp_path / "f32.gguf")), n_ctx=256, logits_all=True,
                verbose=False, n_threads=2)
    f32.eval(ids)
    assert _kld(ref, np.array(f32.scores[: len(ids)])).mean() < 1e-5
    # the oracle can fail: Q/K rows in the GGUF's layout instead of HF's
    for i in range(base.config.num_hidden_layers):
        for name, n in (("q_proj", 9), ("k_proj", 3)):
            k = f"model.layers.{i}.self_attn.{name}.weight"
            base.weights[k] = torch.from_numpy(rope_permute(base.weights[k].numpy(), n))
    with torch.no_grad():
        wrong = base(torch.tensor(ids)).numpy()
    assert _kld(wrong, rt).mean() > 30 * max(kld.mean(), 1e-3)


@pytest.mark.slow
def test_committed_demo_head_reproduces_its_metrics(smollm2, tmp_path):
    """The committed SmolLM2 head: held-out Pearson/Spearman of metrics.json recomputed from
    the committed (bf16) adapter on the regenerated data, and the sign of its reward on a
    positive vs a negative reply."""
    from otter_gguf.demo import smollm2 as demo
    from otter_gguf.demo.smollm2 import data as gen
    from otter_gguf.format.adapter import load_adapter
    from otter_gguf.reference.data import load_jsonl, split_heldout
    from otter_gguf.reference.gguf_base import load_base_gguf
    from otter_gguf.reference.model import OtterModel
    from otter_gguf.reference.training import evaluate
    from otter_gguf.tools.train import GGUFTokenizer

    torch.set_num_threads(2)
    metrics = json.loads(demo.METRICS.read_text())
    tmp = gen.write(tmp_path / "data.jsonl", **metrics["data"])
    tok = GGUFTokenizer(smollm2)
    ds = load_jsonl(tmp, tok)
    _, held = split_heldout(ds, metrics["heldout_fraction"], metrics["seed"])
    cfg, tensors = load_adapter(demo.ADAPTER_DIR)
    model = OtterModel(load_base_gguf(smollm2), cfg, tensors)
    m = evaluate(model, ds.objective, held.examples[:100])
    assert m["pearson"] == pytest.approx(metrics["heldout_first100"]["pearson"], abs=0.01)
    assert m["pearson"] > 0.8
    sig = {}
    for mood, reply in (("pos", "The food was delicious and the staff were friendly."),
                        ("neg", "The food was bland and the staff were rude.")):
        text = tok.render_chat([{"role": "user", "content": "Write a short review of a restaurant."},
                                {"role": "assistant", "content": reply}])
        ids, _ = tok.encode(text)
        with torch.no_grad():
            sig[mood] = float(model(torch.tensor(ids)).signals[-3, 0])  # on the final '.'
    assert sig["pos"] > 0.5 > -0.5 > sig["neg"], sig


@pytest.mark.runtime
@pytest.mark.parametrize("fixture,adapter", [("tiny_llama_dir", "adapter_reward1_dir"),
                                             ("tiny_qwen3_dir", "qwen3_adapter_dir"),
                                             ("tiny_gemma3_dir", "gemma3_adapter_dir")])
def test_eval_separates_weight_rounding_from_the_runtime(request, tmp_path, hf_base_gguf, fixture, adapter):
    """`otter-gguf eval` with a GGUF as --base, and its intrinsic rows: the PyTorch reference on
    each type's own dequantized weights. At f32 there is no rounding: the intrinsic error is 0."""
    from otter_gguf.tools import eval as ev

    adapter_reward1_dir = request.getfixturevalue(adapter)
    base = hf_base_gguf(request.getfixturevalue(fixture), "f32")
    prompts = ["the food was great and the staff was friendly", "the room was dirty but the view was lovely",
               "anna said the coffee was cold", "we found the museum boring"]
    rep = ev.evaluate(base, adapter_reward1_dir, base, types=["f32", "q8_0"], prompts=prompts, threads=1,
                      progress=False)
    assert rep["reference"]["vs_torch_logits"]["kld_mean"] < 1e-6
    f32, q8 = rep["types"]["f32"], rep["types"]["q8_0"]
    assert f32["intrinsic"]["worst"]["max_abs_rel"] == 0.0 and f32["intrinsic"]["logits"]["kld_mean"] < 1e-9
    assert 0 < q8["intrinsic"]["worst"]["mean_abs_rel"] < 0.05
    # the runtime's error contains the weight rounding; runtime_added is their ratio - 1
    assert q8["worst"]["mean_abs_rel"] > 0.5 * q8["intrinsic"]["worst"]["mean_abs_rel"]
    assert q8["runtime_added"] == pytest.approx(q8["worst"]["mean_abs_rel"] / q8["intrinsic"]["worst"]["mean_abs_rel"] - 1)
    assert "q8_0 intrinsic" in ev.format_table(rep)
