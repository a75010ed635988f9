"""Prometheus metrics of the KBS, with upstream's metric names (text exposition format 0.0.4)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

from coco import __version__

_DURATION_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.5, 1.0)
_SIZE_BUCKETS = (64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0)

COUNTERS = {
    "kbs_http_requests_total": "HTTP requests handled",
    "kbs_resource_reads_total": "Resources released",
    "kbs_resource_writes_total": "Resources written",
    "kbs_resource_deletes_total": "Resources deleted",
    "kbs_policy_evaluations_total": "Resource policy evaluations",
    "kbs_policy_approvals_total": "Resource policy approvals",
    "kbs_policy_violations_total": "Resource policy denials",
    "kbs_policy_errors_total": "Resource policy errors",
    "kbs_attestation_requests_total": "Attestation requests",
    "kbs_attestation_successes_total": "Successful attestations",
    "kbs_attestation_failures_total": "Failed attestations",
    "kbs_attestation_errors_total": "Attestation requests that could not be processed",
    "kbs_auth_requests_total": "Auth requests",
    "kbs_auth_successes_total": "Successful auth requests",
    "kbs_auth_errors_total": "Failed auth requests",
    "kbs_plugin_requests_total": "Plugin requests",
    "kbs_plugin_errors_total": "Plugin errors",
}
HISTOGRAMS = {
    "kbs_http_request_duration_seconds": ("HTTP request duration", _DURATION_BUCKETS),
    "kbs_http_request_size_bytes": ("HTTP request body size", _SIZE_BUCKETS),
    "kbs_http_response_size_bytes": ("HTTP response body size", _SIZE_BUCKETS),
    "kbs_plugin_request_duration_seconds": ("Plugin request duration", _DURATION_BUCKETS),
}

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = [*labels, extra] if extra else list(labels)
    if not items:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in items]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, dict[Labels, float]] = {n: defaultdict(float) for n in COUNTERS}
        self.hist: dict[str, dict[Labels, list[float]]] = {n: {} for n in HISTOGRAMS}
        self.active_connections = 0

    # Updated from the event-loop thread only, so no lock on the hot path; render() locks
    # against nothing but itself.
    def inc(self, name: str, **labels: str) -> None:
        key = tuple(sorted(labels.items())) if labels else ()
        self.counters[name][key] += 1

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = HISTOGRAMS[name][1]
        key = tuple(sorted(labels.items())) if labels else ()
        h = self.hist[name].get(key)
        if h is None:
            h = self.hist[name][key] = [0.0] * (len(buckets) + 2)  # buckets.., +Inf, sum
        h[bisect.bisect_left(buckets, value)] += 1
        h[-1] += value

    def render(self) -> bytes:
        out = [
            "# HELP kbs_build_info KBS build information",
            "# TYPE kbs_build_info gauge",
            f'kbs_build_info{{version="{__version__}",implementation="coco"}} 1',
            "# HELP kbs_http_active_connections HTTP requests in progress",
            "# TYPE kbs_http_active_connections gauge",
            f"kbs_http_active_connections {self.active_connections}",
        ]
        with self._lock:
            for name, help_ in COUNTERS.items():
                out += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
                for labels, v in sorted(self.counters[name].items()):
                    out.append(f"{name}{_fmt_labels(labels)} {v:g}")
            for name, (help_, buckets) in HISTOGRAMS.items():
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
                for labels, h in sorted(self.hist[name].items()):
                    acc = 0.0
                    for b, n in zip((*buckets, float("inf")), h[:-1], strict=True):
                        acc += n
                        le = "+Inf" if b == float("inf") else f"{b:g}"
                        out.append(f"{name}_bucket{_fmt_labels(labels, ('le', le))} {acc:g}")
                    out.append(f"{name}_sum{_fmt_labels(labels)} {h[-1]:.6g}")
                    out.append(f"{name}_count{_fmt_labels(labels)} {acc:g}")
        return ("\n".join(out) + "\n").encode()
