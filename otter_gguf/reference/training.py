"""Fitting Otter side weights and head with the base frozen.

- :func:`fit` is the training loop of ``otter-gguf train`` (and of
  :func:`otter_gguf.tools.train.train`): the objectives of
  :mod:`otter_gguf.reference.data` (pairwise Bradley-Terry, per-token and
  sequence regression, next-token for ``token_reward`` heads), padded
  batches, a warm-up/cosine schedule, seeded data order, resumable
  checkpoints, a tqdm bar and the held-out metrics of :func:`evaluate`.
- :func:`train_head` is its front for token lists already in memory (the tests and
  the tiny demo): the same loop at a constant learning rate, on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from otter_gguf.reference.data import OBJECTIVES, Example
from otter_gguf.reference.model import OtterModel

__all__ = ["FitResult", "default_device", "evaluate", "fit", "pad_batch", "regression_metrics", "train_head"]


def _as_long(x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"each sequence must be a 1-D token list, found shape {list(t.shape)}")
    return t


def _draw(data: Sequence, batch_size: int, order: list[int], rng: random.Random) -> list:
    """The next ``batch_size`` examples of a seeded epoch order (``order`` is consumed in
    place and refilled with a new permutation when empty)."""
    batch = []
    for _ in range(min(batch_size, len(data))):
        if not order:
            order.extend(range(len(data)))
            rng.shuffle(order)
        batch.append(data[order.pop()])
    return batch


def train_head(
    model: OtterModel,
    sequences: Sequence,
    labels: Sequence | None = None,
    *,
    loss: str = "mse",
    steps: int = 50,
    lr: float = 1e-4,
    seed: int = 0,
    signal_index: int = 0,
    batch_size: int = 1,
) -> list[float]:
    """Fit ``model``'s Otter tensors (side weights + head) on token lists already in memory; the base
    stays frozen. A front of :func:`fit` (the one training loop) with a constant learning rate, no
    gradient clipping, on the CPU and without a progress bar.

    - ``loss="mse"``: ``sequences`` are token lists, ``labels`` per-token
      scalar targets of the same lengths (fit's ``token_regression``: the mean squared error of
      ``signals[:, signal_index]`` over every labelled token of the batch).
    - ``loss="bradley_terry"``: ``sequences`` are ``(chosen, rejected)``
      token-list pairs (``labels`` unused; fit's ``pairwise``): the reward is
      ``signals[-1, signal_index]`` (final token) and the loss is
      ``-log sigmoid(r_chosen - r_rejected)``.

    Each step averages the loss over ``batch_size`` examples drawn (seeded,
    without replacement within an epoch). Returns the loss of every step. ``model.tensors`` are
    updated in place.

    Keep ``lr`` small (~1e-4): the side stream is normalised by the *main*
    stream's RMS, so nothing bounds its own growth and large Adam steps on
    the side weights can make it diverge.
    """
    if loss not in ("mse", "bradley_terry"):
        raise ValueError(f"loss must be 'mse' or 'bradley_terry', found {loss!r}")
    if not 0 <= signal_index < model.n_out:
        raise ValueError(f"signal_index {signal_index} out of range [0, {model.n_out})")
    examples: list[Example] = []
    if loss == "mse":
        if labels is None or len(labels) != len(sequences):
            raise ValueError("mse needs one label sequence per token sequence")
        for i, (s, y) in enumerate(zip(sequences, labels)):
            s = _as_long(s)
            y = torch.as_tensor(y, dtype=torch.float32)
            if y.shape != s.shape:
                raise ValueError(f"labels shape {list(y.shape)} != sequence shape {list(s.shape)}")
            examples.append(Example(i, s.tolist(), targets=y.tolist()))
    else:
        examples = [Example(i, _as_long(c).tolist(), rejected=_as_long(r).tolist())
                    for i, (c, r) in enumerate(sequences)]
    if not examples:
        raise ValueError("no training data")
    objective = "token_regression" if loss == "mse" else "pairwise"
    return fit(model, objective, examples, steps=steps, lr=lr, batch_size=batch_size, seed=seed, warmup=0.0,
               clip=0.0, schedule="constant", signal_index=signal_index, progress=False, device="cpu").history


# --------------------------------------------------------------------------
# the training loop of `otter-gguf train` (data: otter_gguf.reference.data)
# --------------------------------------------------------------------------
CHECKPOINT_VERSION = 1


@dataclass
class FitResult:
    """``history``: the loss of every step (resumed steps included); ``metrics``:
    the held-out metrics at the end; ``seconds``/``tokens``: this run only."""

    history: list[float]
    metrics: dict
    steps: int
    seconds: float
    tokens: int
    evals: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to ``[B, T]``; returns (tokens, lengths).

    Right padding under the causal mask is exact: a real position attends only
    to positions before it, never to the padding after it, so the padded
    positions need no key mask; their outputs are dropped by the loss masks."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


@contextlib.contextmanager
def _without_lm_head(model: OtterModel, enabled: bool = True):
    """A head needs no vocabulary logits: swap the LM head for an empty matrix
    while the side stream trains (the main logits come out as [.., 0])."""
    w = model.base.weights
    saved = w["lm_head.weight"]
    if enabled:
        w["lm_head.weight"] = saved[:0]
    try:
        yield
    finally:
        w["lm_head.weight"] = saved


def _signals(model: OtterModel, tokens: torch.Tensor, device) -> torch.Tensor:
    return model(tokens.to(device)).signals


def _final(sig: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return sig[torch.arange(sig.shape[0], device=sig.device), lengths.to(sig.device) - 1]


def _targets(batch: Sequence[Example], T: int, device, fill: float = math.nan) -> torch.Tensor:
    out = torch.full((len(batch), T), fill, dtype=torch.float32)
    for i, ex in enumerate(batch):
        out[i, : len(ex.targets)] = torch.tensor(ex.targets, dtype=torch.float32)
    return out.to(device)


def _batch_loss(model: OtterModel, objective: str, batch: Sequence[Example], signal_index: int,
                device) -> tuple[torch.Tensor, int, dict]:
    """Mean loss of a batch, its token count and the raw outputs for metrics."""
    if objective == "pairwise":
        toks, lens = pad_batch([e.tokens for e in batch] + [e.rejected for e in batch])
        r = _final(_signals(model, toks, device)[..., signal_index], lens)
        n = len(batch)
        margin = r[:n] - r[n:]
        return -F.logsigmoid(margin).mean(), int(lens.sum()), {"margin": margin}
    toks, lens = pad_batch([e.tokens for e in batch])
    ntok = int(lens.sum())
    if objective == "next_token":
        sig = _signals(model, toks, device)
        mask = _targets(batch, toks.shape[1], device, 0.0)[:, :-1] > 0
        logits = sig[:, :-1][mask]
        nxt = toks[:, 1:].to(device)[mask]
        ce = F.cross_entropy(logits.float(), nxt, reduction="none")
        return ce.mean(), ntok, {"ce": ce, "mask": mask, "next": nxt}
    sig = _signals(model, toks, device)[..., signal_index]
    if objective == "sequence_regression":
        pred = _final(sig, lens)
        y = torch.tensor([e.target for e in batch], dtype=pred.dtype, device=pred.device)
        return F.mse_loss(pred, y), ntok, {"pred": pred, "true": y}
    if objective == "token_regression":
        y = _targets(batch, toks.shape[1], device).to(sig.dtype)
        m = ~torch.isnan(y)
        pred, true = sig[m], y[m]
        return F.mse_loss(pred, true), ntok, {"pred": pred, "true": true}
    raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as in Spearman's rho."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    """Pearson, Spearman (average ranks for ties) and MSE of predictions against targets (float64)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    return {"pearson": _pearson(pred, true), "spearman": _pearson(_ranks(pred), _ranks(true)),
            "mse": float(np.mean((pred - true) ** 2))}


def evaluate(model: OtterModel, objective: str, examples: Sequence[Example], *,
             batch_size: int = 8, signal_index: int = 0, device=None) -> dict:
    """Held-out metrics that fit the objective.

    pairwise: ``accuracy`` (share of pairs with r_chosen > r_rejected), ``mean_margin``, ``loss``;
    token/sequence regression: ``pearson``, ``spearman`` (pooled over labelled tokens, resp.
    sequences), ``mse``; next_token: ``loss`` (nats per predicted token) and ``base_loss``
    (the base model's own next-token loss on the same positions)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    device = torch.device(device or "cpu")
    examples = list(examples)
    if not examples:
        return {}
    sums: dict[str, list] = {}
    base_ce: list[torch.Tensor] = []
    with torch.no_grad(), _without_lm_head(model, objective != "next_token"):
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            _, _, out = _batch_loss(model, objective, batch, signal_index, device)
            for k, v in out.items():
                sums.setdefault(k, []).append(v)
            if objective == "next_token":
                toks, _ = pad_batch([e.tokens for e in batch])
                logits = model.base(toks.to(device))[:, :-1][out["mask"]]
                base_ce.append(F.cross_entropy(logits.float(), out["next"], reduction="none"))
    n = len(examples)
    if objective == "pairwise":
        m = torch.cat(sums["margin"]).double().cpu().numpy()
        return {"pairs": n, "accuracy": float((m > 0).mean()), "mean_margin": float(m.mean()),
                "loss": float(np.mean(np.logaddexp(0.0, -m)))}
    if objective == "next_token":
        ce = torch.cat(sums["ce"]).double()
        return {"sequences": n, "tokens": int(ce.numel()), "loss": float(ce.mean()),
                "base_loss": float(torch.cat(base_ce).double().mean())}
    pred = torch.cat(sums["pred"]).double().cpu().numpy()
    true = torch.cat(sums["true"]).double().cpu().numpy()
    key = "tokens" if objective == "token_regression" else "sequences"
    return {key: int(len(pred)), **regression_metrics(pred, true)}


def _lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str = "cosine") -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _on_device(model: OtterModel, device: torch.device):
    """Move base and side tensors to ``device`` (factory calls inside the forward
    follow through torch's default device) and back to the CPU afterwards."""
    if device.type == "cpu":
        yield
        return
    base = model.base
    cpu_base = dict(base.weights)
    base.weights.update({k: v.to(device) for k, v in cpu_base.items()})
    inv = base._inv_freq
    base._inv_freq = inv.to(device)
    for k in list(model.tensors):
        model.tensors[k] = model.tensors[k].to(device)
    try:
        with torch.device(device):
            yield
    finally:
        base.weights.update(cpu_base)
        base._inv_freq = inv
        for k in list(model.tensors):
            model.tensors[k] = model.tensors[k].detach().cpu()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fit(
    model: OtterModel,
    objective: str,
    train: Sequence[Example],
    heldout: Sequence[Example] = (),
    *,
    steps: int,
    lr: float = 3e-4,
    batch_size: int = 8,
    seed: int = 0,
    warmup: float = 0.05,
    clip: float = 1.0,
    schedule: str = "cosine",
    signal_index: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    eval_every: int = 0,
    progress: bool = True,
    device: str | None = None,
    log=None,
) -> FitResult:
    """Train ``model``'s Otter tensors (side weights + head) on ``train``; the base stays frozen.

    Batches of ``batch_size`` examples are drawn in a seeded random order (a new
    permutation every epoch), right-padded (:func:`pad_batch`), and optimised
    with Adam (linear warm-up over ``warmup`` of the steps, then ``schedule``: ``"cosine"`` decay to
    10% or ``"constant"``; gradient-norm clipping at ``clip``, 0: none). With ``checkpoint`` the full
    state (tensors, optimiser, data order, RNG) is written every
    ``checkpoint_every`` steps and at the end; ``resume=True`` continues from
    it, giving the same result as an uninterrupted run. ``device``: ``None``
    picks CUDA when torch sees a GPU, else the CPU. ``model.tensors`` are
    updated in place; the held-out metrics (:func:`evaluate`) are computed at
    the end (and every ``eval_every`` steps).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    if objective == "next_token" and model.config.head_kind != "token_reward":
        raise ValueError("the next_token objective trains a token_reward head (n_out == vocab_size)")
    if objective != "next_token" and model.config.head_kind != "reward":
        raise ValueError(f"the {objective} objective trains a reward head, not {model.config.head_kind}")
    if not 0 <= signal_index < model.n_out:
        raise ValueError(f"signal_index {signal_index} out of range [0, {model.n_out})")
    train = list(train)
    if not train:
        raise ValueError("no training examples")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', found {schedule!r}")
    dev = torch.device(device or default_device())
    say = log or (lambda msg: None)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    n_warm = max(1, int(round(warmup * steps))) if warmup > 0 else 0

    torch.manual_seed(seed)
    rng = random.Random(seed)
    order: list[int] = []
    history: list[float] = []
    start = 0
    state = None
    if resume and ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        want = {"version": CHECKPOINT_VERSION, "objective": objective, "config": model.config.to_dict(),
                "n_train": len(train), "steps": steps, "batch_size": batch_size, "seed": seed}
        got = {k: state.get(k) for k in want}
        if got != want:
            diff = [k for k in want if got[k] != want[k]]
            raise ValueError(f"{ckpt}: checkpoint is from a different run ({', '.join(diff)} differ); "
                             f"remove it or train without --resume")
        for k, v in state["tensors"].items():
            model.tensors[k].copy_(v)
        start, order, history = state["step"], list(state["order"]), list(state["history"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        say(f"resumed from {ckpt} at step {start}/{steps}")

    evals: list[dict] = []
    tokens = 0
    t0 = time.perf_counter()
    with _on_device(model, dev):
        params = model.parameters()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        if state is not None:
            opt.load_state_dict(state["opt"])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc=f"train {objective}", unit="step", dynamic_ncols=True)

        def snapshot(step: int) -> dict:
            return {"version": CHECKPOINT_VERSION, "objective": objective, "config": model.config.to_dict(),
                    "n_train": len(train), "steps": steps, "batch_size": batch_size, "seed": seed,
                    "step": step, "order": list(order), "history": list(history), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "opt": opt.state_dict(),
                    "tensors": {k: v.detach().cpu().clone() for k, v in model.tensors.items()}}

        try:
            for step in range(start, steps):
                batch = _draw(train, batch_size, order, rng)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, steps, lr, n_warm, schedule)
                opt.zero_grad(set_to_none=True)
                with _without_lm_head(model):
                    loss, ntok, _ = _batch_loss(model, objective, batch, signal_index, dev)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss became {float(loss)} at step {step + 1}; lower the "
                                                 f"learning rate (now {lr:g})")
                    loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                history.append(float(loss.detach()))
                tokens += ntok
                if bar is not None:
                    bar.set_postfix(loss=f"{np.mean(history[-20:]):.4f}",
                                    tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
                    bar.update(1)
                done = step + 1
                if ckpt is not None and (done % checkpoint_every == 0 or done == steps):
                    _save_checkpoint(ckpt, snapshot(done))
                if eval_every and heldout and done % eval_every == 0 and done != steps:
                    m = evaluate(model, objective, heldout, batch_size=batch_size,
                                 signal_index=signal_index, device=dev)
                    evals.append({"step": done, **m})
                    say(f"step {done}: held-out {m}")
        finally:
            if bar is not None:
                bar.close()
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        seconds = time.perf_counter() - t0
        metrics = evaluate(model, objective, heldout, batch_size=batch_size, signal_index=signal_index,
                           device=dev) if heldout else {}
    return FitResult(history, metrics, steps, seconds, tokens, evals)
