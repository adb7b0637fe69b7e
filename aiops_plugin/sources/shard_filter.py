"""A shard's PromQL: the group's query restricted to the entities the shard owns.

PromQL cannot select an expression's result by a hash of its labels, so a shard lists the
identifying label values of the raw series the query's selectors match (:func:`selectors`, for
Prometheus' label-values and series APIs, which read the index, not the samples) and reads the
range of the query with its identifying labels pinned to the values it owns
(:func:`restrict_query`): every vector selector of the expression gets a matcher
``label=~"v1|v2|..."`` per identifying label. The answer then holds (about) the shard's share of
the series instead of all of them.

Pinning the labels of the selectors is the same thing as filtering the result only when each
result series' identifying labels come unchanged from the selectors it was computed from; a
query that aggregates across entities (one entity's share of a total), joins the label in from
another metric, or makes it with ``label_replace`` gives other values, or none, once
restricted. The reader therefore checks each restricted query once against the full one
(:func:`same_owned_series`, one instant evaluation of each) and reads a query that fails the
check in full, as an unsharded agent would.

The expression is parsed and printed with ``promql-parser``. Its printer writes strings
unescaped, so every string of the expression (label values, regexes, ``label_replace``'s
arguments) is swapped for a placeholder before printing and written back escaped afterwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import promql_parser

#: Characters RE2 (Prometheus' regex engine) gives a meaning; escaped to match them literally.
_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")
_MARK = "__aiops_shard_string_"
_PLACEHOLDER = _MARK + "{}__"
_PLACEHOLDER_TEXT = re.compile(r'"__aiops_shard_string_(\d+)__"')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class NotRestrictable(ValueError):
    """The query cannot be restricted by label matchers (the message says why); it is read in
    full."""


def regex_literal(value: str) -> str:
    """``value`` as an RE2 pattern that matches exactly it."""
    return "".join("\\" + char if char in _RE2_SPECIAL else char for char in value)


def promql_string(value: str) -> str:
    """``value`` as a double-quoted PromQL string literal."""
    body = "".join(
        _ESCAPES.get(char) or (char if char.isprintable() else f"\\U{ord(char):08x}")
        for char in value
    )
    return f'"{body}"'


def _parse(promql: str) -> promql_parser.Expr:
    try:
        return promql_parser.parse(promql)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a parse error, or a panic of the Rust parser (BaseException)
        raise NotRestrictable(f"not parsed: {exc}") from exc


def restrict_query(promql: str, values: Mapping[str, Collection[str]]) -> str:
    """``promql`` with every vector selector also matching ``label=~"<one of values>"`` for each
    ``label`` of ``values`` (each collection non-empty).

    Raises :class:`NotRestrictable` when the expression does not parse or uses what this
    rewriting does not keep (``or`` between matcher sets)."""
    if not values or any(not allowed for allowed in values.values()):
        raise ValueError("restrict_query needs at least one value for every label")
    if _MARK in promql:
        raise NotRestrictable("the query contains this rewriting's own placeholder")
    strings: list[str] = []

    def placeholder(text: str) -> str:
        strings.append(text)
        return _PLACEHOLDER.format(len(strings) - 1)

    pinned = {
        label: "|".join(regex_literal(value) for value in sorted(allowed))
        for label, allowed in values.items()
    }

    def rewrite_selector(selector: promql_parser.VectorSelector) -> promql_parser.Expr:
        matchers = selector.matchers
        if matchers.or_matchers:
            raise NotRestrictable("a selector uses 'or' between matcher sets")
        rewritten = [
            promql_parser.Matcher(matcher.op, matcher.name, placeholder(matcher.value))
            for matcher in matchers.matchers
        ]
        rewritten += [
            promql_parser.Matcher(promql_parser.MatchOp.Re, label, placeholder(pattern))
            for label, pattern in pinned.items()
        ]
        selector.matchers = promql_parser.Matchers(rewritten)
        return selector

    def done(selector: promql_parser.VectorSelector) -> bool:
        return any(_MARK in matcher.value for matcher in selector.matchers.matchers)

    def visit(node: promql_parser.Expr) -> promql_parser.Expr | None:
        # a replacement is taken from a fresh parse of the printed node: the library keeps a
        # changed node only when it is a new object; the printed text holds placeholders only
        if isinstance(node, promql_parser.MatrixSelector):
            if done(node.vector_selector):
                return None
            node.vector_selector = rewrite_selector(node.vector_selector)
            return promql_parser.parse(str(node))
        if isinstance(node, promql_parser.VectorSelector):
            return None if done(node) else promql_parser.parse(str(rewrite_selector(node)))
        if isinstance(node, promql_parser.StringLiteral) and _MARK not in node.val:
            return promql_parser.parse(f'"{placeholder(node.val)}"')
        return None

    tree = _parse(promql)
    try:
        text = str(promql_parser.transform(tree, visit))
    except NotRestrictable:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - see _parse
        raise NotRestrictable(f"not rewritten: {exc}") from exc
    written = _PLACEHOLDER_TEXT.sub(lambda m: promql_string(strings[int(m.group(1))]), text)
    if _MARK in written:
        raise NotRestrictable("a string of the query was printed where it cannot be restored")
    return written


#: the matcher operators, by name (the library's enum values are not hashable)
_OPERATORS = {
    "MatchOp.Equal": "=",
    "MatchOp.NotEqual": "!=",
    "MatchOp.Re": "=~",
    "MatchOp.NotRe": "!~",
}
#: how far before an evaluation time Prometheus looks for a selector's last sample
LOOKBACK_SECONDS = 300.0


def selectors(promql: str) -> tuple[list[str], float]:
    """The vector selectors of ``promql`` as series matchers (``{__name__="x",job="n"}``, for
    the series and label-values APIs: what a shard lists its entities from, without evaluating
    the query), and how far before a step the query can read: its ranges, offsets and
    subqueries added up, plus the lookback (an upper bound).

    Raises :class:`NotRestrictable` for what cannot be listed this way (an ``@`` modifier pins
    a selector to another time)."""
    found: list[str] = []
    reach = [LOOKBACK_SECONDS]

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.MatrixSelector):
            reach.append(node.range.total_seconds())
        elif isinstance(node, promql_parser.SubqueryExpr):
            reach.append(node.range.total_seconds())
            if node.at is not None:
                raise NotRestrictable("a subquery has an @ modifier")
            reach.append(abs(node.offset.total_seconds()) if node.offset else 0.0)
        elif isinstance(node, promql_parser.VectorSelector):
            if node.at is not None:
                raise NotRestrictable("a selector has an @ modifier")
            if node.matchers.or_matchers:
                raise NotRestrictable("a selector uses 'or' between matcher sets")
            reach.append(abs(node.offset.total_seconds()) if node.offset else 0.0)
            matchers = [f"__name__={promql_string(node.name)}"] if node.name else []
            matchers += [
                f"{m.name}{_OPERATORS[str(m.op)]}{promql_string(m.value)}"
                for m in node.matchers.matchers
            ]
            found.append("{" + ",".join(matchers) + "}")

    tree = _parse(promql)
    promql_parser.walk(tree, visit)
    return found, sum(reach)


def owned_values(
    entities: Iterable[Mapping[str, str]], labels: Sequence[str]
) -> dict[str, set[str]]:
    """Per identifying label, the values it takes over ``entities`` (what the matchers pin)."""
    values: dict[str, set[str]] = {label: set() for label in labels}
    for entity in entities:
        for label in labels:
            values[label].add(entity[label])
    return values


def same_owned_series(
    full: Iterable[Mapping[str, object]],
    restricted: Iterable[Mapping[str, object]],
    is_owned: Callable[[Mapping[str, object]], bool],
) -> bool:
    """Whether two instant answers (``[{"metric": ..., "value": [t, "v"]}]``) hold the same
    series with the same values, among those ``is_owned(metric)`` says the shard owns."""

    def owned_map(answer: Iterable[Mapping[str, object]]) -> dict[frozenset, float]:
        out: dict[frozenset, float] = {}
        for item in answer:
            metric = item.get("metric", {})
            if not isinstance(metric, Mapping) or not is_owned(metric):
                continue
            value = item.get("value", [None, "nan"])
            out[frozenset((k, v) for k, v in metric.items() if k != "__name__")] = float(
                value[1]  # type: ignore[index]
            )
        return out

    a, b = owned_map(full), owned_map(restricted)
    if a.keys() != b.keys():
        return False
    return all(
        (math.isnan(a[k]) and math.isnan(b[k])) or math.isclose(a[k], b[k], rel_tol=1e-9) for k in a
    )
