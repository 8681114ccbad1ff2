"""Per-request heads: which of the served Otter heads a request's ``otter`` block and guidance use.

Every loaded head runs in every decode (they are one graph, as llama.cpp's
LoRA adapters set on a context are); a request chooses the heads it is
answered with, as llama-server's ``"lora": [{"id", "scale"}]`` chooses
adapters and vLLM serves LoRAs by model name:

* ``{"otter": {"heads": ["harmless"]}}``, or
* the model id ``"<served name>:harmless"`` (several: ``"<served name>:a,b"``);
  ``GET /v1/models`` lists those ids.

The ``otter`` block keeps the shape the served heads give it (the same keys
and ``head_kind``); the columns, names and rewards of the other heads are
left out. Pure Python: no model needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from otter_gguf.runtime.signals import OtterHead, head_signal_names

__all__ = ["HeadSelection", "model_heads", "select"]

SEP = ":"  # model id form: <served name>:<head>[,<head>...]


def model_heads(model: Optional[str], served: Sequence[str]) -> Optional[List[str]]:
    """The heads a model id names (``<served name>:a,b``), None when it names none. A model id of
    another form (``gpt-4o``, ``llama3:8b``) names no heads: a one-model server answers any name."""
    if not model:
        return None
    for name in served:
        if model.startswith(name + SEP) and len(model) > len(name) + 1:
            return [h for h in model[len(name) + 1:].split(",")]
    return None


@dataclass
class HeadSelection:
    """The heads one request uses (a subset of ``heads``, in signal order)."""

    heads: List[OtterHead]  # the served heads, in signal order
    chosen: List[str]  # names, in signal order

    @property
    def all(self) -> bool:
        return len(self.chosen) == len(self.heads)

    @property
    def signal_names(self) -> List[str]:
        """The chosen heads' names in the served naming (``head/signal`` with several heads)."""
        return [n for n in head_signal_names(self.heads) if self.owns(n)]

    def owns(self, signal: str) -> bool:
        """True when the served signal name ``signal`` belongs to a chosen head."""
        if len(self.heads) == 1:
            return True
        head, _, _ = signal.partition("/")
        return head in self.chosen

    def guidance(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        """``otter.guidance`` checked against the chosen heads: a ``signal`` naming another head's
        signal is a ValueError; with no ``signal`` and one chosen signal, that signal."""
        if self.all:
            return spec
        sig = spec.get("signal")
        if sig is None:
            names = self.signal_names
            if len(names) == 1:
                return {**spec, "signal": names[0]}
            return spec
        named = [sig] if isinstance(sig, str) else list(sig) if isinstance(sig, dict) else []
        other = [n for n in named if isinstance(n, str) and not self.owns(n)]
        if other:
            raise ValueError(f"signal {other[0]!r} is not a signal of the request's heads "
                             f"({', '.join(self.chosen)}): {', '.join(self.signal_names)}")
        return spec

    def block(self, block: Optional[dict]) -> Optional[dict]:
        """``block`` with the other heads' columns left out (the block itself when all heads are chosen)."""
        if block is None or self.all:
            return block
        names = block.get("signal_names") or []
        keep = [k for k, n in enumerate(names) if self.owns(n)]
        out = dict(block, heads=list(self.chosen), signal_names=[names[k] for k in keep])
        if out.get("signals") is not None and names:
            out["signals"] = [None if r is None else [r[k] for k in keep] for r in out["signals"]]
        if out.get("rewards") is not None:
            kept = set(out["signal_names"])
            out["rewards"] = [None if r is None else {n: v for n, v in r.items() if n in kept}
                              for r in out["rewards"]]
        if out.get("signal_rows") is not None:
            cols = [c for h in self.heads if h.name in self.chosen for c in range(h.offset, h.offset + h.n_out)]
            out["signal_rows"] = [None if r is None else [r[c] for c in cols] for r in out["signal_rows"]]
        return out


def select(heads: Sequence[OtterHead], requested: Optional[Sequence[str]]) -> HeadSelection:
    """The selection of ``requested`` head names among ``heads`` (all when None); a ValueError
    names an unknown head and the heads there are."""
    names = [h.name for h in heads]
    if requested is None:
        return HeadSelection(list(heads), names)
    req = list(requested)
    if not req:
        raise ValueError(f"no head chosen; the heads of this server are: {', '.join(names)}")
    for r in req:
        if not isinstance(r, str) or r not in names:
            raise ValueError(f"unknown head {r!r}; the heads of this server are: {', '.join(names)}")
    return HeadSelection(list(heads), [n for n in names if n in req])
