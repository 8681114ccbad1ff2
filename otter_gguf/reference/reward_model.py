"""A separate reward model, the baseline an Otter head is measured against (docs/EVAL.md, "Quality").

The form TRL's reward trainer trains (``AutoModelForSequenceClassification``): the base transformer, its LM
head unused, and a linear score head (``score.weight`` ``[n_out, d]``, ``score.bias`` ``[n_out]``) on the final
normed hidden state of every position. The top ``trainable_layers`` transformer layers and the final norm are
fine-tuned with the head (all layers: ``trainable_layers = n_layer``); the rest of the base stays frozen.

:class:`RewardModel` has the interface :func:`otter_gguf.reference.training.fit` and ``evaluate`` use
(``config.head_kind``, ``n_out``, ``tensors``, ``parameters()``, ``base``, a forward whose ``signals`` are the
rewards), so it trains on the same data, objective and loop as an Otter head.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from otter_gguf.reference.model import BaseModel, KVCache

__all__ = ["RewardModel", "RewardModelConfig", "RewardOutput", "layer_tensor_names", "new_reward_model"]


@dataclass
class RewardModelConfig:
    signal_names: list[str]
    trainable_layers: int
    base_model: str | None = None
    head_kind: str = "reward"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_out(self) -> int:
        return len(self.signal_names)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RewardOutput:
    signals: torch.Tensor   # [.., T, n_out]
    hidden: torch.Tensor    # [.., T, d]: the final normed hidden states the score head reads


def layer_tensor_names(base: BaseModel, trainable_layers: int) -> list[str]:
    """The base tensors a reward model fine-tunes: every weight of the top ``trainable_layers`` layers and
    the final norm (HF names)."""
    n = base.config.num_hidden_layers
    if not 0 <= trainable_layers <= n:
        raise ValueError(f"trainable_layers must be in [0, {n}] (the base has {n} layers), found {trainable_layers}")
    prefixes = tuple(f"model.layers.{i}." for i in range(n - trainable_layers, n))
    names = [k for k in base.expected_shapes() if k.startswith(prefixes)]
    return names + ["model.norm.weight"]


class RewardModel:
    """The base with a score head; ``tensors`` holds what trains (score head + fine-tuned base tensors)."""

    def __init__(self, base: BaseModel, config: RewardModelConfig, tensors: dict[str, torch.Tensor]):
        d = base.config.hidden_size
        if tuple(tensors["score.weight"].shape) != (config.n_out, d):
            raise ValueError(f"score.weight has shape {list(tensors['score.weight'].shape)}, "
                             f"expected [{config.n_out}, {d}]")
        self.config = config
        self.tensors = tensors
        self.base_names = [k for k in tensors if not k.startswith("score.")]
        unknown = [k for k in self.base_names if k not in base.weights]
        if unknown:
            raise ValueError(f"not tensors of the base: {', '.join(unknown[:4])}")
        # a copy of the base's dict: the fine-tuned tensors replace the base's own in this model only
        self.base = copy.copy(base)
        self.base.weights = dict(base.weights)

    @property
    def n_out(self) -> int:
        return self.config.n_out

    @property
    def signal_names(self) -> list[str]:
        return list(self.config.signal_names)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.tensors.values())

    def new_cache(self) -> KVCache:
        return self.base.new_cache()

    def forward(self, tokens, cache: KVCache | None = None) -> RewardOutput:
        # bind the tensors that train (fit may move them to another device and back)
        self.base.weights.update({k: self.tensors[k] for k in self.base_names})
        _, _, xn, _ = self.base._run(tokens, cache, None)
        w, b = self.tensors["score.weight"], self.tensors["score.bias"]
        return RewardOutput(xn @ w.to(xn.dtype).T + b.to(xn.dtype), xn)

    __call__ = forward


def new_reward_model(base: BaseModel, *, signal_names: list[str], trainable_layers: int, seed: int = 0,
                     base_model: str | None = None) -> RewardModel:
    """A reward model to train: the base's top layers copied, a score head drawn from N(0, 0.02^2) (HF's
    ``initializer_range``) with a zero bias."""
    names = layer_tensor_names(base, trainable_layers)
    g = torch.Generator().manual_seed(seed)
    d = base.config.hidden_size
    tensors = {"score.weight": (torch.randn(len(signal_names), d, generator=g) * 0.02).to(base.dtype),
               "score.bias": torch.zeros(len(signal_names), dtype=base.dtype)}
    tensors.update({k: base.weights[k].detach().clone() for k in names})
    cfg = RewardModelConfig(list(signal_names), trainable_layers, base_model)
    return RewardModel(base, cfg, tensors)
