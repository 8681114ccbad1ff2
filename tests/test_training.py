"""The small training helper: base frozen, side + head learn a toy task."""

from __future__ import annotations

import pytest
import torch

from otter_gguf.format.adapter import load_adapter
from otter_gguf.reference.model import OtterModel, insert_otter, load_base
from otter_gguf.reference.training import train_head

pytestmark = pytest.mark.unit


def _seqs(n, T, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (T,), generator=g) for _ in range(n)]


def test_mse_lowers_loss_and_keeps_base_frozen(tiny_llama_dir, adapter_reward3_dir):
    base = load_base(tiny_llama_dir)
    cfg, t = load_adapter(adapter_reward3_dir)
    m = OtterModel(base, cfg, t)
    before_base = {k: v.clone() for k, v in base.weights.items()}
    before_side = {k: v.clone() for k, v in m.tensors.items()}
    seqs = _seqs(4, 8, seed=0)
    # toy target: +1 on even token ids, -1 on odd ones, for signal "harmlessness"
    labels = [(s % 2 == 0).float() * 2 - 1 for s in seqs]
    probe = seqs[0]
    logits_before = m(probe).logits
    hist = train_head(m, seqs, labels, loss="mse", steps=12, lr=2e-4, seed=0, signal_index=1,
                      batch_size=4)  # full batch: the history is the training loss
    assert len(hist) == 12
    assert hist[-1] < 0.3 * hist[0], hist
    # the base is untouched, so main logits are still bit-identical
    for k, v in base.weights.items():
        assert torch.equal(v, before_base[k]), k
        assert not v.requires_grad
    assert torch.equal(m(probe).logits, logits_before)
    # side weights (not only the head) moved; nothing left requiring grad
    moved = [k for k in m.tensors if not torch.equal(m.tensors[k], before_side[k])]
    assert "otter.head.weight" in moved
    assert "otter.layers.0.self_attn.q_proj.weight" in moved
    assert "otter.embed_tokens.weight" in moved
    assert all(not v.requires_grad for v in m.tensors.values())


def test_bradley_terry_learns_preference(tiny_qwen2_dir):
    base = load_base(tiny_qwen2_dir)
    cfg, t = insert_otter(base, d2=64, h2=2, h2_kv=1, f2=64, init="copy", seed=0)
    m = OtterModel(base, cfg, t)
    g = torch.Generator().manual_seed(1)

    def pair():
        prefix = torch.randint(0, 512, (4,), generator=g)
        good = torch.randint(0, 100, (1,), generator=g)
        bad = torch.randint(300, 400, (1,), generator=g)
        return torch.cat([prefix, good]), torch.cat([prefix, bad])

    train = [pair() for _ in range(8)]

    def acc():
        with torch.no_grad():
            return sum(float(m(c).signals[-1, 0] > m(r).signals[-1, 0]) for c, r in train) / len(train)

    acc0 = acc()
    hist = train_head(m, train, loss="bradley_terry", steps=10, lr=3e-4, seed=0, batch_size=8)
    assert len(hist) == 10
    assert hist[-1] < 0.5 * hist[0], hist
    assert acc() == 1.0 and acc0 < 1.0
    # copy init starts with zero side-head columns in Wo2; training opened them
    assert m.tensors["otter.layers.0.self_attn.o_proj.weight"][:, 4 * 64:].abs().max() > 0


def test_train_head_argument_errors(tiny_llama_dir, adapter_reward1_dir):
    base = load_base(tiny_llama_dir)
    cfg, t = load_adapter(adapter_reward1_dir)
    m = OtterModel(base, cfg, t)
    s = _seqs(2, 4, seed=0)
    with pytest.raises(ValueError, match="loss must be"):
        train_head(m, s, [torch.zeros(4)] * 2, loss="ce")
    with pytest.raises(ValueError, match="signal_index 1"):
        train_head(m, s, [torch.zeros(4)] * 2, signal_index=1)
    with pytest.raises(ValueError, match="labels shape"):
        train_head(m, s, [torch.zeros(3)] * 2)
    with pytest.raises(ValueError, match="one label sequence"):
        train_head(m, s, None)
