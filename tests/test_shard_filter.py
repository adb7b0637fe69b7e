"""A shard's PromQL: every selector narrowed to its entities, strings written back escaped.

What Prometheus makes of the rewritten queries is tested on a real one in test_sharding.py;
here, the rewriting itself."""

from __future__ import annotations

import re

import promql_parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiops_plugin.sources.shard_filter import (
    NotRestrictable,
    promql_string,
    regex_literal,
    restrict_query,
    same_owned_series,
    selectors,
)

PIN = {"instance": {"b", "a"}}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("up", 'up{instance=~"a|b"}'),
        (
            'sum by (instance) (rate(node_cpu_seconds_total{mode!="idle"}[2m]))',
            'sum by (instance)(rate(node_cpu_seconds_total{mode!="idle",instance=~"a|b"}[2m]))',
        ),
        # once per selector, inside matrices, subqueries and offsets too
        (
            "max_over_time(rate(x[1m] offset 5m)[10m:1m]) / y",
            'max_over_time(rate(x{instance=~"a|b"}[1m] offset 5m)[10m:1m]) / y{instance=~"a|b"}',
        ),
        ('{__name__="x", job="n"}', '{__name__="x",job="n",instance=~"a|b"}'),
        # strings elsewhere keep their escapes (the parser's printer drops them)
        (
            r'label_replace(x, "host", "$1", "instance", "(.*):\\d+")',
            r'label_replace(x{instance=~"a|b"}, "host", "$1", "instance", "(.*):\\d+")',
        ),
        (r'x{path=~"/a\\.json", q="say \"hi\""}', None),
    ],
)
def test_every_selector_is_narrowed_and_the_rest_kept(query: str, expected: str | None) -> None:
    written = restrict_query(query, PIN)
    if expected is not None:
        assert written == expected
    # parsed back, each selector carries the pin once and the user's own matchers unchanged
    selectors: list[promql_parser.VectorSelector] = []

    def collect(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)

    promql_parser.walk(promql_parser.parse(written), collect)
    assert selectors
    for selector in selectors:
        pins = [m for m in selector.matchers.matchers if m.name == "instance"]
        assert [(m.op, m.value) for m in pins] == [(promql_parser.MatchOp.Re, "a|b")]
    if "path" in query:
        matchers = {m.name: m.value for m in selectors[0].matchers.matchers}
        assert matchers["path"] == r"/a\.json" and matchers["q"] == 'say "hi"'


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12),
        min_size=1,
        max_size=6,
        unique=True,
    )
)
def test_pinned_values_match_exactly_themselves(values: list[str]) -> None:
    written = restrict_query('x{job="n"}', {"instance": set(values)})
    selector = promql_parser.parse(written)
    pattern = next(m.value for m in selector.matchers.matchers if m.name == "instance")
    for value in values:
        assert re.fullmatch(pattern, value, flags=re.DOTALL)
    assert not re.fullmatch(pattern, "\x00".join(values) + "\x00", flags=re.DOTALL)


def test_the_escapes_are_promql_and_re2_literals() -> None:
    assert regex_literal("a.b|c*(d)") == r"a\.b\|c\*\(d\)"
    assert regex_literal("pod-7_x:9100") == "pod-7_x:9100"  # RE2 refuses needless escapes
    assert promql_string('a"b\\c\nd') == r'"a\"b\\c\nd"'
    assert promql_string("\x01") == r'"\U00000001"'


def test_what_cannot_be_rewritten_says_why() -> None:
    with pytest.raises(NotRestrictable, match="not parsed"):
        restrict_query("sum by (instance) (", PIN)
    with pytest.raises(NotRestrictable, match="placeholder"):
        restrict_query('x{a="__aiops_shard_string_0__"}', PIN)
    with pytest.raises(ValueError, match="at least one value"):
        restrict_query("x", {"instance": set()})


def test_the_listing_matches_the_selectors_over_all_the_query_reads() -> None:
    found, reach = selectors(
        r'rate(x{job="n"}[5m] offset 1h) / max_over_time(y[10m:1m]) + {__name__=~"z|w", q="a\\b"}'
    )
    assert found == ['{__name__="x",job="n"}', '{__name__="y"}', r'{__name__=~"z|w",q="a\\b"}']
    assert reach == 300 + 3600 + 600 + 0 + 300  # ranges, offsets and subqueries + lookback
    with pytest.raises(NotRestrictable, match="@ modifier"):
        selectors("x @ 100")


def test_owned_series_are_compared_by_labels_and_value() -> None:
    def answer(*rows: tuple[str, str]) -> list[dict]:
        return [{"metric": {"instance": i}, "value": [0, v]} for i, v in rows]

    def mine(metric: dict) -> bool:
        return metric["instance"] in {"a", "b"}

    full = answer(("a", "1"), ("b", "NaN"), ("c", "3"))
    assert same_owned_series(full, answer(("a", "1"), ("b", "NaN")), mine)
    assert not same_owned_series(full, answer(("a", "0.5"), ("b", "NaN")), mine)  # a share
    assert not same_owned_series(full, answer(("a", "1")), mine)  # lost b
