"""The shipped Prometheus alert rules (``alert_rules/``), adapted for tests that load them.

The rule file in the repository is the one source of truth: the Helm chart renders it and the
end-to-end tests load it into a real Prometheus. Those tests cannot wait the minutes each ``for:``
asks for, so :func:`load_rules_with_for` rewrites every ``for:`` and leaves everything else alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

#: Prometheus' duration syntax (``model.ParseDuration``): units in descending order, each at most
#: once, integers only; ``0`` alone is also valid.
_PROMETHEUS_DURATION = re.compile(
    r"0|(?=\d)(?:\d+y)?(?:\d+w)?(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?(?:\d+ms)?"
)

#: Line width for the YAML writer: long enough that no annotation is folded across lines.
_NO_WRAP = 1_000_000


class RuleFileError(ValueError):
    """A file that is not a Prometheus rule file: no ``groups`` list whose groups list ``rules``."""


class _RuleFileDumper(yaml.SafeDumper):
    """Writes multi-line strings (annotations, PromQL) as block scalars so the output reads like
    the source file."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_RuleFileDumper.add_representer(str, _represent_str)


def load_rules_with_for(path: str | Path, for_duration: str) -> str:
    """Return the rule file at ``path`` as YAML text with every rule's ``for:`` set to
    ``for_duration`` (a Prometheus duration such as ``"5s"``).

    Only rules that have a ``for:`` get the new one; rules without it already fire on the first
    evaluation. Comments are not kept. Raises ``ValueError`` for a malformed duration and
    :class:`RuleFileError` for a file that is not a rule file.
    """
    if _PROMETHEUS_DURATION.fullmatch(for_duration) is None:
        raise ValueError(
            f"for_duration {for_duration!r} is not a Prometheus duration (e.g. '5s', '1m30s')"
        )
    path = Path(path)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    for rule in _rules(document, path):
        if "for" in rule:
            rule["for"] = for_duration
    header = f"# Generated from {path.name} with every 'for' set to {for_duration}.\n"
    return header + yaml.dump(
        document, Dumper=_RuleFileDumper, sort_keys=False, allow_unicode=True, width=_NO_WRAP
    )


def _rules(document: Any, path: Path) -> list[dict[str, Any]]:
    """Every rule of every group, in file order; the dicts are the document's own, not copies."""
    groups = document.get("groups") if isinstance(document, dict) else None
    if not isinstance(groups, list):
        raise RuleFileError(f"{path}: expected a top-level 'groups' list")
    rules: list[dict[str, Any]] = []
    for index, group in enumerate(groups):
        group_rules = group.get("rules") if isinstance(group, dict) else None
        if not isinstance(group_rules, list) or not all(isinstance(r, dict) for r in group_rules):
            raise RuleFileError(f"{path}: groups[{index}] has no 'rules' list of mappings")
        rules.extend(group_rules)
    return rules
