"""The reward-model baseline: the base fine-tuned as a separate reward model on the same data, objective and
loop as an Otter head (:class:`otter_gguf.reference.reward_model.RewardModel`), written as a reward-model GGUF
(:mod:`otter_gguf.reference.reward_model_gguf`) that llama.cpp runs.

    python -m otter_gguf.tools.quality.baseline BASE.gguf TRAIN.jsonl HELDOUT.jsonl -o RM.gguf
        [--layers N] [--steps S] [--batch-size B] [--lr LR] [--seed S] [-t THREADS] [--signal-name NAME]

prints one JSON line: the report (held-out metrics in PyTorch, train time, tokens/s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from otter_gguf.reference.reward_model_gguf import ScoreHead, write_reward_model_gguf
from otter_gguf.reference.data import load_jsonl
from otter_gguf.reference.reward_model import RewardModel, new_reward_model
from otter_gguf.reference.training import fit

__all__ = ["main", "save_gguf", "train_reward_model"]


def save_gguf(rm: RewardModel, base_gguf: Path, out: Path, matrix_type: str = "q8_0") -> Path:
    """``rm`` as a reward-model GGUF of ``base_gguf`` (its fine-tuned matrices as ``matrix_type``)."""
    t = {k: v.detach().float().numpy() for k, v in rm.tensors.items() if not k.startswith("score.")}
    head = ScoreHead(rm.tensors["score.weight"].detach().float().numpy(),
                     rm.tensors["score.bias"].detach().float().numpy(), rm.signal_names, rm.config.trainable_layers)
    return write_reward_model_gguf(base_gguf, out, tensors=t, head=head, matrix_type=matrix_type)


def train_reward_model(base_gguf: Path, train: Path, heldout: Path, out: Path, *, layers: int | None = None,
                       steps: int, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
                       signal_name: str = "reward", max_length: int = 1024, progress: bool = False) -> dict:
    """Train the baseline on ``train`` (held-out metrics on ``heldout``) and write ``out``; its report.
    ``layers``: the top layers fine-tuned (default: all)."""
    from otter_gguf.tools.train import load_training_base

    base, tok, name = load_training_base(base_gguf)
    tr = load_jsonl(train, tok, max_length=max_length)
    held = load_jsonl(heldout, tok, objective=tr.objective, max_length=max_length)
    n_layers = base.config.num_hidden_layers if layers is None else layers
    rm = new_reward_model(base, signal_names=[signal_name], trainable_layers=n_layers, seed=seed, base_model=name)
    res = fit(rm, tr.objective, tr.examples, held.examples, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
              progress=progress, device="cpu")
    save_gguf(rm, base_gguf, out)
    return {"base": name, "objective": tr.objective, "trainable_layers": n_layers,
            "trainable_params": int(sum(v.numel() for v in rm.tensors.values())),
            "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed},
            "heldout": res.metrics, "train_seconds": round(res.seconds, 1), "tokens_per_s": round(res.tokens_per_s, 1),
            "loss_first": res.history[0], "loss_last20": sum(res.history[-20:]) / len(res.history[-20:]),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m otter_gguf.tools.quality.baseline")
    ap.add_argument("base", type=Path)
    ap.add_argument("train", type=Path)
    ap.add_argument("heldout", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--signal-name", default="reward")
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rep = train_reward_model(a.base, a.train, a.heldout, a.out, layers=a.layers, steps=a.steps,
                             batch_size=a.batch_size, lr=a.lr, seed=a.seed, signal_name=a.signal_name)
    rep["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
