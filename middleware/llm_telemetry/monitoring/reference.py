"""The metric table of ``docs/metrics.md``, rendered from the contract (a test keeps the docs equal to it).

Usage::

    from llm_telemetry.monitoring.reference import render_metric_table

    print(render_metric_table())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from llm_telemetry import instruments as inst

#: Markers around the generated table in docs/metrics.md.
BEGIN: Final = "<!-- metric table: generated from llm_telemetry.instruments.CONTRACT; do not edit by hand -->"
END: Final = "<!-- end of metric table -->"

#: Attributes a point carries only sometimes, and the footnote saying when.
_OPTIONAL: Final = {
    inst.GEN_AI_RESPONSE_MODEL: "¹",
    inst.ERROR_TYPE: "²",
}
_KINDS: Final = {"counter": "counter", "updowncounter": "up-down counter", "histogram": "histogram"}


def _attributes(spec: inst.MetricSpec) -> str:
    names = []
    for key in spec.attributes:
        mark = "" if spec is inst.ERRORS and key == inst.ERROR_TYPE else _OPTIONAL.get(key, "")
        names.append(f"`{key}`{mark}")
    if spec.attributed:
        names.append("attribution")
    return ", ".join(names)


def render_metric_table(contract: Sequence[inst.MetricSpec] = inst.CONTRACT) -> str:
    """The Markdown table, between :data:`BEGIN` and :data:`END`, ending in a newline."""
    lines = [
        BEGIN,
        "",
        "| OpenTelemetry instrument | kind, unit | Prometheus name | attributes | description |",
        "|---|---|---|---|---|",
    ]
    for spec in contract:
        prometheus = f"`{spec.prometheus_name}`" + (" (gauge)" if spec.kind == "updowncounter" else "")
        lines.append(
            f"| `{spec.name}` | {_KINDS[spec.kind]}, `{spec.unit}` | {prometheus} | {_attributes(spec)} | "
            f"{spec.description} |"
        )
    lines += [
        "",
        "¹ present when the response named its model. ² present only on failed requests, so "
        '`llm_requests_total{error_type=""}` selects the successes. "attribution": the `llm.metadata.<name>` '
        "attributes (`llm_metadata_<name>` labels) configured from request headers.",
        "",
        END,
    ]
    return "\n".join(lines) + "\n"


__all__: Sequence[str] = ("BEGIN", "END", "render_metric_table")
