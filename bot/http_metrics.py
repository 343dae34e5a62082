"""Prometheus text exposition (format 0.0.4), by hand: prometheus_client is not a dependency.

The numbers come from three places: the API's own request counter, `engine.stats()` and
`learner.metrics()` (whatever numbers it reports), plus training jobs counted in the store.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from model.interface import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _name(*parts: str) -> str:
    name = "_".join(_NAME_BAD.sub("_", p) for p in parts if p)
    return name if not name[:1].isdigit() else f"_{name}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


def _fmt(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


class MetricsText:
    """Accumulate families, then `render()` once."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._seen: set[str] = set()

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, Any], float]],
    ) -> None:
        if name in self._seen:
            return
        self._seen.add(name)
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self._lines.append(
                f"{name}{{{text}}} {_fmt(value)}" if text else f"{name} {_fmt(value)}"
            )

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"


def render_metrics(
    requests: Counter[tuple[str, str, int]],
    completion_tokens: int,
    stats: EngineStats,
    learner: Mapping[str, Any],
    jobs_by_status: Mapping[str, int],
) -> str:
    out = MetricsText()
    out.family(
        "ouro_http_requests_total",
        "counter",
        "HTTP API requests by endpoint, method and status.",
        (
            ({"endpoint": path, "method": method, "status": status}, count)
            for (path, method, status), count in sorted(requests.items())
        ),
    )
    out.family(
        "ouro_api_completion_tokens_total",
        "counter",
        "Tokens generated for HTTP API answers.",
        [({}, completion_tokens)],
    )
    out.family(
        "ouro_engine_requests_total",
        "counter",
        "Requests the engine admitted.",
        [({}, stats.requests_total)],
    )
    out.family(
        "ouro_engine_requests_failed_total",
        "counter",
        "Requests the engine failed.",
        [({}, stats.requests_failed)],
    )
    out.family(
        "ouro_tokens_generated_total",
        "counter",
        "Tokens the engine generated (all platforms).",
        [({}, stats.tokens_generated)],
    )
    out.family(
        "ouro_batch_decode_steps_total",
        "counter",
        "Decode steps run, by batch size.",
        (({"batch_size": size}, n) for size, n in sorted(stats.batch_sizes.items())),
    )
    out.family(
        "ouro_resident_adapters",
        "gauge",
        "Adapters loaded in memory.",
        [({}, stats.resident_adapters)],
    )
    out.family(
        "ouro_active_adapter_info",
        "gauge",
        "Active adapter version per owner (1 per live version).",
        (({"owner": o, "version": v}, 1) for o, v in sorted(stats.active_versions.items())),
    )
    out.family(
        "ouro_training_jobs",
        "gauge",
        "Training jobs in the store, by status.",
        (({"status": s}, n) for s, n in sorted(jobs_by_status.items())),
    )
    for key, value in sorted(learner.items()):
        name = _name("ouro_learner", key)
        number = _number(value)
        if number is not None:
            out.family(name, "gauge", f"Learner metric {key}.", [({}, number)])
        elif isinstance(value, Mapping):
            samples = [
                ({"key": k}, n) for k, v in sorted(value.items()) if (n := _number(v)) is not None
            ]
            if samples:
                out.family(name, "gauge", f"Learner metric {key}, by key.", samples)
    return out.render()
