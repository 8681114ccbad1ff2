"""``/metrics``: Prometheus text exposition (format 0.0.4), no client library needed."""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Dict, List, Sequence, Tuple

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1


def _labels(d: Dict[str, str]) -> str:
    if not d:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(d.items())) + "}"


class Metrics:
    """Counters, gauges (read when scraped) and histograms of one server."""

    PREFIX = "otter_"

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
        self._help: Dict[str, Tuple[str, str]] = {}
        self._gauges: List[Tuple[str, str, Callable[[], float], str]] = []
        self._hist: Dict[str, _Histogram] = {}

    def counter(self, name: str, help: str, value: float = 1.0, **labels: str) -> None:
        self._help.setdefault(name, ("counter", help))
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value

    def gauge(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge") -> None:
        """A value read at scrape time (``kind="counter"`` for a monotonic one kept elsewhere)."""
        self._gauges.append((name, help, read, kind))

    def observe(self, name: str, help: str, value: float) -> None:
        self._help.setdefault(name, ("histogram", help))
        with self._lock:
            self._hist.setdefault(name, _Histogram(LATENCY_BUCKETS)).observe(value)

    def render(self) -> str:
        out: List[str] = []
        with self._lock:
            names = sorted({k[0] for k in self._counters})
            for name in names:
                kind, help = self._help[name]
                out += [f"# HELP {self.PREFIX}{name} {help}", f"# TYPE {self.PREFIX}{name} counter"]
                for (n, labels), v in sorted(self._counters.items()):
                    if n == name:
                        out.append(f"{self.PREFIX}{name}{_labels(dict(labels))} {v:g}")
            for name, h in sorted(self._hist.items()):
                out += [f"# HELP {self.PREFIX}{name} {self._help[name][1]}", f"# TYPE {self.PREFIX}{name} histogram"]
                acc = 0
                for b, c in zip(h.buckets, h.counts):
                    acc += c
                    out.append(f'{self.PREFIX}{name}_bucket{{le="{b:g}"}} {acc}')
                out.append(f'{self.PREFIX}{name}_bucket{{le="+Inf"}} {h.n}')
                out += [f"{self.PREFIX}{name}_sum {h.sum:.6f}", f"{self.PREFIX}{name}_count {h.n}"]
        for name, help, read, kind in self._gauges:
            out += [f"# HELP {self.PREFIX}{name} {help}", f"# TYPE {self.PREFIX}{name} {kind}",
                    f"{self.PREFIX}{name} {float(read()):g}"]
        return "\n".join(out) + "\n"
