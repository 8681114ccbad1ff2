"""A small helper to fit Otter side weights and head with the base frozen.

Not a training framework: plain Adam on CPU, whole sequences, one example
per step (cycled in a seeded random order). It exists so tests and demos can
produce adapters whose signals mean something.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F

from otter_gguf.reference.model import OtterModel

__all__ = ["train_head"]


def _as_long(x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"each sequence must be a 1-D token list, found shape {list(t.shape)}")
    return t


def _groups(batch: list) -> list[list]:
    """Split a batch into groups of equal-length examples, each run as one
    [B, T] forward (for pairs: chosen and rejected must also match)."""
    groups: dict = {}
    for ex in batch:
        groups.setdefault((ex[0].shape[0], ex[1].shape[0]), []).append(ex)
    return list(groups.values())


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
    """Fit ``model``'s Otter tensors (side weights + head); the base stays frozen.

    - ``loss="mse"``: ``sequences`` are token lists, ``labels`` per-token
      scalar targets of the same lengths; the loss is the mean squared error
      of ``signals[:, signal_index]``.
    - ``loss="bradley_terry"``: ``sequences`` are ``(chosen, rejected)``
      token-list pairs (``labels`` unused); the reward is
      ``signals[-1, signal_index]`` (final token) and the loss is
      ``-log sigmoid(r_chosen - r_rejected)``.

    Each step averages the loss over ``batch_size`` examples drawn (seeded,
    without replacement within an epoch); equal-length examples run as one
    batched forward. Returns the loss of every step. ``model.tensors`` are
    updated in place.

    Keep ``lr`` small (~1e-4): the side stream is normalised by the *main*
    stream's RMS, so nothing bounds its own growth and large Adam steps on
    the side weights can make it diverge.
    """
    if loss not in ("mse", "bradley_terry"):
        raise ValueError(f"loss must be 'mse' or 'bradley_terry', found {loss!r}")
    if not 0 <= signal_index < model.n_out:
        raise ValueError(f"signal_index {signal_index} out of range [0, {model.n_out})")
    if loss == "mse":
        if labels is None or len(labels) != len(sequences):
            raise ValueError("mse needs one label sequence per token sequence")
        data = []
        for s, y in zip(sequences, labels):
            s = _as_long(s)
            y = torch.as_tensor(y, dtype=model.dtype)
            if y.shape != s.shape:
                raise ValueError(f"labels shape {list(y.shape)} != sequence shape {list(s.shape)}")
            data.append((s, y))
    else:
        data = [(_as_long(c), _as_long(r)) for c, r in sequences]
    if not data:
        raise ValueError("no training data")

    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = model.parameters()
    for p in params:
        p.requires_grad_(True)
    for w in model.base.weights.values():
        w.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=lr)
    history: list[float] = []
    order: list[int] = []
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            batch = []
            for _b in range(min(batch_size, len(data))):
                if not order:
                    order = list(range(len(data)))
                    rng.shuffle(order)
                batch.append(data[order.pop()])
            total = 0.0
            for group in _groups(batch):
                a = torch.stack([x for x, _ in group])
                b = torch.stack([y for _, y in group])
                if loss == "mse":
                    sig = model(a).signals[..., signal_index]
                    ell = F.mse_loss(sig, b, reduction="none").mean(dim=1)
                elif a.shape[1] == b.shape[1]:
                    n = len(group)
                    r = model(torch.cat([a, b])).signals[:, -1, signal_index]
                    ell = -F.logsigmoid(r[:n] - r[n:])
                else:
                    rc = model(a).signals[:, -1, signal_index]
                    rr = model(b).signals[:, -1, signal_index]
                    ell = -F.logsigmoid(rc - rr)
                (ell.sum() / len(batch)).backward()
                total += float(ell.detach().sum()) / len(batch)
            opt.step()
            history.append(total)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return history
