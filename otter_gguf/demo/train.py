"""Train the embedded demo model: a small llama base LM plus an Otter sentiment head.

    python -m otter_gguf.demo.train [OUT_DIR]   (default: this package's directory)

Seeded and CPU-only. Steps: generate the synthetic review corpus
(`corpus.py`), train a SentencePiece tokenizer on it, train a `llama` base LM
(d=256, 4 layers, 4/2 heads, f=768) with transformers, insert Otter with the
base frozen (copy initialisation, d2=256, h2=4, h2_kv=1, f2=256) and fit the
head to the per-token sentiment label (MSE). Writes `base/` (HF checkpoint,
bf16 safetensors), `adapter/` (Otter adapter, bf16) and `metrics.json`
(held-out correlation of the reward with the true label).

The committed `adapter/` and `metrics.json` (0.9727) were trained by an earlier version of this
script that fitted the head in 8 runs of 60 steps, each with a fresh Adam state; the eval
baselines (tests/baselines/) are measured on them, so they stay. The head is now fitted in one
run of the training loop: `python -m otter_gguf.demo.train /tmp/demo_out --reuse-base` (the
committed base copied to /tmp/demo_out/base) gave a held-out correlation of 0.9841 in 43 s on the
2-core AMD EPYC machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from otter_gguf.demo import corpus

SEED = 1234
BASE_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=768)
OTTER_SHAPE = dict(d2=256, h2=4, h2_kv=1, f2=256)
SIGNAL_NAMES = ["sentiment"]
VOCAB = 512
N_TRAIN_DOCS = 12000
N_HELDOUT_DOCS = 300
OTTER_LR = 1e-3


def train_tokenizer(texts: list[str], out: Path) -> None:
    from otter_gguf.reference.tokenizer import train_sentencepiece

    model = train_sentencepiece(VOCAB, texts=texts, seed_sentencepiece_size=100000, hard_vocab_limit=False)
    (out / "tokenizer.model").write_bytes(model)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer",
        "legacy": True, "clean_up_tokenization_spaces": False,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def encode(sp, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """BOS + ids, and each token's (start, end) character offsets in text."""
    proto = sp.encode(text, return_type="proto")
    ids = [sp.bos_id()] + [p.id for p in proto.pieces]
    offsets = [(0, 0)] + [(p.begin, p.end) for p in proto.pieces]
    return ids, offsets


def train_base(out: Path, docs: list[list[int]], steps: int, log) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    V = sp.get_piece_size()
    cfg = LlamaConfig(vocab_size=V, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, **BASE_SHAPE)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    model.train()
    T, B = 64, 16
    stream = [t for d in docs for t in d + [2]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(SEED)
    data = torch.tensor(stream)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        x = torch.stack([data[i:i + T] for i in idx])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"base step {step:4d}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    model.config.torch_dtype = torch.bfloat16
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)


def train_otter(base_dir: Path, adapter_dir: Path, data, steps: int, log) -> dict:
    from otter_gguf.format.adapter import save_adapter
    from otter_gguf.reference.model import OtterModel, insert_otter, load_base
    from otter_gguf.reference.training import train_head

    base = load_base(base_dir)
    config, tensors = insert_otter(base, **OTTER_SHAPE, n_out=1, head_kind="reward",
                                   signal_names=SIGNAL_NAMES, init="copy", seed=SEED,
                                   base_model="otter-gguf demo base (synthetic reviews)")
    model = OtterModel(base, config, tensors)
    seqs = [ids for ids, _ in data]
    labels = [lab for _, lab in data]
    t0 = time.time()
    hist = train_head(model, seqs, labels, loss="mse", steps=steps, lr=OTTER_LR, seed=SEED, batch_size=8)
    for k in range(0, steps, max(1, steps // 8)):
        log(f"otter step {k + 1:4d}/{steps} loss {np.mean(hist[k:k + 10]):.4f}")
    log(f"otter trained in {time.time() - t0:.0f}s")
    save_adapter(adapter_dir, config, model.tensors, dtype="bfloat16")
    return {}


def heldout_correlation(base_dir: Path, adapter_dir: Path, data) -> float:
    from otter_gguf.reference.model import load_otter

    model = load_otter(base_dir, adapter_dir)
    pred, true = [], []
    with torch.no_grad():
        for ids, lab in data:
            pred.extend(model(torch.tensor(ids)).signals[:, 0].tolist())
            true.extend(lab)
    return float(np.corrcoef(pred, true)[0, 1])


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m otter_gguf.demo.train")
    ap.add_argument("out", nargs="?", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--reuse-base", action="store_true",
                    help="keep an already trained base/ and only (re)train the Otter adapter")
    args = ap.parse_args(argv)
    out = args.out
    base_dir, adapter_dir = out / "base", out / "adapter"
    base_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    train_docs = corpus.corpus(N_TRAIN_DOCS, SEED)
    held_docs = corpus.corpus(N_HELDOUT_DOCS, SEED + 1)
    reuse = args.reuse_base and (base_dir / "model.safetensors").is_file()
    if not reuse:
        train_tokenizer(train_docs, base_dir)

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(base_dir / "tokenizer.model"))

    def labelled(docs):
        out_ = []
        for d in docs:
            ids, offs = encode(sp, d)
            out_.append((ids, corpus.token_labels(d, offs)))
        return out_

    if not reuse:
        train_base(base_dir, [encode(sp, d)[0] for d in train_docs], steps=400, log=log)
    train_otter(base_dir, adapter_dir, labelled(train_docs[:3000]), steps=480, log=log)
    corr = heldout_correlation(base_dir, adapter_dir, labelled(held_docs))
    metrics = {"heldout_token_correlation": round(corr, 4), "heldout_docs": N_HELDOUT_DOCS,
               "seed": SEED, "train_seconds": round(time.time() - t0, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(json.dumps(metrics))
    return 0 if corr >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
