"""Training throughput of `otter-gguf train` on a base GGUF (default: the demo's SmolLM2-135M).

    .venv/bin/python benchmarks/bench_train.py [--gguf PATH] [--threads 2] [--batch-size 8]
        [--d2 32 --f2 32] [--steps 6] [--json OUT]

Per configuration, on the demo's chat-formatted review data (``otter_gguf.demo.smollm2.data``),
batches as ``fit`` draws them:

* ``step``: one full training step (Otter forward + backward + Adam), tokens/s over ``--steps`` steps
  after one warm-up step;
* ``base``: the frozen base's forward alone on the same batches (``torch.no_grad``, no LM head,
  as in training): the share of a step spent in the frozen base is ``base / step``, the rest is
  the side stream (its forward, the backward through it, the optimiser);
* peak RSS of the process (``ru_maxrss``: base weights dequantized to f32 + activations).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_train.py")
    ap.add_argument("--gguf", type=Path, default=None, help="base GGUF (default: the demo's SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--d2", type=int, default=32)
    ap.add_argument("--f2", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from otter_gguf.demo.smollm2 import data as gen
    from otter_gguf.demo.smollm2 import model_path
    from otter_gguf.reference.data import load_jsonl
    from otter_gguf.reference.model import OtterModel, insert_otter
    from otter_gguf.reference.training import _batch_loss, _without_lm_head, pad_batch
    from otter_gguf.tools.train import load_training_base

    gguf = args.gguf or model_path()
    t0 = time.perf_counter()
    base, tok, name = load_training_base(gguf)
    t_load = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ds = load_jsonl(gen.write(Path(tmp) / "d.jsonl", n=(args.steps + 1) * args.batch_size, seed=7), tok)
    cfg, tensors = insert_otter(base, d2=args.d2, h2=1, h2_kv=1, f2=args.f2, signal_names=["sentiment"])
    model = OtterModel(base, cfg, tensors)
    params = model.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-4)
    ex = ds.examples[:]
    random.Random(0).shuffle(ex)
    batches = [ex[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.steps + 1)]

    def step(batch):
        opt.zero_grad(set_to_none=True)
        with _without_lm_head(model):
            loss, ntok, _ = _batch_loss(model, ds.objective, batch, 0, torch.device("cpu"))
            loss.backward()
        opt.step()
        return ntok

    def base_only(batch):
        toks, _ = pad_batch([e.tokens for e in batch])
        with torch.no_grad(), _without_lm_head(model):
            base(toks)

    step(batches[0])
    base_only(batches[0])
    t_step = t_base = 0.0
    tokens = padded = 0
    for b in batches[1:]:
        t = time.perf_counter()
        tokens += step(b)
        t_step += time.perf_counter() - t
        t = time.perf_counter()
        base_only(b)
        t_base += time.perf_counter() - t
        padded += len(b) * max(len(e.tokens) for e in b)
    res = {
        "base": name, "threads": args.threads, "batch_size": args.batch_size, "d2": args.d2, "f2": args.f2,
        "steps": args.steps, "tokens": tokens, "padded_tokens": padded,
        "tokens_per_s": round(tokens / t_step, 1), "s_per_step": round(t_step / args.steps, 3),
        "base_share": round(t_base / t_step, 3), "side_share": round(1 - t_base / t_step, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_s": round(t_load, 1), "torch": torch.__version__, "machine": platform.machine(),
        "loadavg": [round(x, 2) for x in __import__("os").getloadavg()],
    }
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
