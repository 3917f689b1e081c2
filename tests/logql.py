"""LogQL as Grafana sends it and as Loki checks it, for the tests of the dashboard's Loki panel.

``interpolate`` replaces a dashboard's variables the way Grafana's Loki datasource does: the variable's
``allValue`` when it is at All, the value (its regular-expression characters escaped) when one is chosen,
``(a|b)`` when several are.
``selector`` reads a query's stream selector; ``loki_refuses`` applies Loki's rule for it (a selector needs a
matcher that does not match the empty string: Loki answers 400 otherwise).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
#: What Grafana's Loki datasource escapes in a chosen value, with two backslashes: one for the regular expression,
#: one for the LogQL string literal around it (a backslash itself becomes four).
_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]+?.()|]")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def interpolate(
    expr: str,
    dashboard: Mapping[str, Any],
    chosen: Mapping[str, Sequence[str]] | None = None,
    found: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """``expr`` with the dashboard's variables replaced: those in ``chosen`` by their values, the rest at All. A
    variable at All with no ``allValue`` of its own stands for every value its query found: ``found`` gives them."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    chosen = chosen or {}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            return match.group(0)  # a Grafana built-in ($__range) or text
        if name not in chosen and variables[name].get("allValue") is not None:
            return str(variables[name]["allValue"])
        picked = chosen[name] if name in chosen else (found or {})[name]
        values = [_REGEX_SPECIAL.sub(r"\\\\\g<0>", v.replace("\\", "\\" * 4)) for v in picked]
        return values[0] if len(values) == 1 else "(" + "|".join(values) + ")"

    return _VARIABLE.sub(value, expr)


def selector(expr: str) -> list[tuple[str, str, str]]:
    """The matchers ``(label, operator, value)`` of the query's stream selector, its first ``{...}``."""
    start, end = expr.index("{"), expr.index("}")
    body = expr[start + 1 : end]
    matchers, position = [], 0
    while position < len(body):
        found = _MATCHER.match(body, position)
        assert found, f"not a matcher at {body[position:]!r}"
        label, op, raw = found.groups()
        matchers.append((label, op, raw.encode().decode("unicode_escape")))
        position = found.end()
    return matchers


def matches_empty(op: str, value: str) -> bool:
    if op == "=":
        return value == ""
    if op == "!=":
        return value != ""
    found = re.fullmatch(value, "") is not None
    return found if op == "=~" else not found


def loki_refuses(expr: str) -> bool:
    """Whether Loki refuses the query's selector: every matcher in it matches the empty string."""
    return all(matches_empty(op, value) for _, op, value in selector(expr))
