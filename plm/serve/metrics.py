"""Server metrics in the Prometheus text format (version 0.0.4), without a client library:
counters, gauges and cumulative histograms, updated from the scheduler thread and the HTTP
handlers under one lock."""
from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        self.counts[bisect_left(self.buckets, x)] += 1
        self.sum += x
        self.count += 1


class Metrics:
    """Named series. `inc`/`set`/`observe` take labels as keyword arguments."""

    def __init__(self, prefix: str = "plm_") -> None:
        self.prefix = prefix
        self.lock = threading.Lock()
        self.help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self.values: dict[str, dict[tuple, float]] = {}
        self.hists: dict[str, dict[tuple, Histogram]] = {}
        self.hist_buckets: dict[str, Sequence[float]] = {}
        self.gauge_fns: dict[str, Callable[[], float]] = {}

    def counter(self, name: str, help: str) -> None:
        self.help[name] = ("counter", help)
        self.values.setdefault(name, {})

    def gauge(self, name: str, help: str, fn: Callable[[], float] | None = None) -> None:
        """A gauge set by `set`, or read from fn() at every scrape."""
        self.help[name] = ("gauge", help)
        self.values.setdefault(name, {})
        if fn is not None:
            self.gauge_fns[name] = fn

    def histogram(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.help[name] = ("histogram", help)
        self.hists.setdefault(name, {})
        self.hist_buckets[name] = buckets

    def inc(self, name: str, by: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[name][key] = self.values[name].get(key, 0) + by

    def set(self, name: str, value: float, **labels: str) -> None:
        with self.lock:
            self.values[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            h = self.hists[name].get(key)
            if h is None:
                h = self.hists[name][key] = Histogram(self.hist_buckets[name])
            h.observe(value)

    def get(self, name: str, **labels: str) -> float:
        with self.lock:
            if name in self.gauge_fns:
                return float(self.gauge_fns[name]())
            return self.values[name].get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        lines = []
        with self.lock:
            for name, (kind, help) in self.help.items():
                full = self.prefix + name
                lines.append(f"# HELP {full} {help}")
                lines.append(f"# TYPE {full} {kind}")
                if kind == "histogram":
                    for key, h in self.hists[name].items():
                        labels = dict(key)
                        acc = 0
                        for bound, n in zip(h.buckets, h.counts):
                            acc += n
                            lines.append(f"{full}_bucket{_labels({**labels, 'le': _num(bound)})} {acc}")
                        lines.append(f"{full}_bucket{_labels({**labels, 'le': '+Inf'})} {h.count}")
                        lines.append(f"{full}_sum{_labels(labels)} {_num(h.sum)}")
                        lines.append(f"{full}_count{_labels(labels)} {h.count}")
                    continue
                if name in self.gauge_fns:
                    lines.append(f"{full} {_num(self.gauge_fns[name]())}")
                    continue
                for key, v in self.values[name].items():
                    lines.append(f"{full}{_labels(dict(key))} {_num(v)}")
        return "\n".join(lines) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a Prometheus text page (tests and the benchmark read it)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
