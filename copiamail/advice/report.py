"""``advise``'s output: text for an operator, JSON for a script.

JSON is a list with one object per proposal; its keys are stable (scripts
read them): ``domain``, ``node``, ``kind``, ``kinds``, ``replies``,
``connections``, ``current_limit``, ``current_source``, ``proposed_limit``,
``line`` (null when the limit in force is already low enough), ``action``
(``insert``, ``update`` or null), ``before`` (the rule a new line goes
ahead of, or the rule it updates, as ``FILE:LINE``; null: after the last
rule), ``written``, ``first``, ``last`` (ISO dates and times, local),
``example`` and ``pooled``.
"""

from __future__ import annotations

import json
from typing import Any

from .placing import Placement
from .proposals import Proposal

_STAMP = "%Y-%m-%d %H:%M:%S"


def as_object(p: Proposal, placement: Placement | None, written: bool) -> dict[str, Any]:
    """One proposal as a JSON object."""
    anchor = placement.anchor if placement is not None else None
    return {
        "domain": p.domain, "node": p.node, "kind": p.kind.value, "kinds": {k.value: n for k, n in p.kinds},
        "replies": p.replies, "connections": p.connections, "current_limit": p.current_limit,
        "current_source": p.current_source, "proposed_limit": p.proposed_limit, "line": p.line,
        "action": placement.action if placement is not None else None,
        "before": anchor.where() if anchor is not None else None, "written": written,
        "first": p.first.isoformat(sep=" "), "last": p.last.isoformat(sep=" "), "example": p.example,
        "pooled": p.pooled,
    }


def as_json(items: list[tuple[Proposal, Placement | None]], written: bool) -> str:
    return json.dumps([as_object(p, placement, written and placement is not None) for p, placement in items], indent=2)


def _where(placement: Placement) -> str:
    anchor = placement.anchor
    if anchor is None:
        return "after the last $domain_limit line"
    if placement.action == "update":
        return f"in place of the count of {anchor} at {anchor.where()}"
    return f"before {anchor} at {anchor.where()}"


def as_text(items: list[tuple[Proposal, Placement | None]], files: int, spool: str, written: str | None) -> str:
    """What an operator reads: per domain and node its evidence and the
    line proposed; then what ``--write`` did or would do."""
    if not items:
        return f"no throttle replies in {files} job file(s) of {spool}: nothing to propose"
    out = []
    for p, placement in items:
        kinds = ", ".join(f"{k.value}: {n}" for k, n in p.kinds)
        seen = f"between {p.first.strftime(_STAMP)} and {p.last.strftime(_STAMP)}"
        out.append(f"{p.domain} (node {p.node}): {p.replies} throttle repl{'y' if p.replies == 1 else 'ies'} ({kinds}) {seen}")
        if p.connections is not None:
            out.append(f"  smallest number of connections a reply came at: {p.connections}")
        else:
            out.append("  no job says how many connections were open (no EMAIL_CONNECTIONS): one less than the limit")
        out.append(f"  limit in force: {p.current_limit} ({p.current_source})")
        out.append(f"  example: {p.example}")
        if p.pooled is not None:
            out.append(f"  note: domain stanza {p.pooled} in copiamail.yaml pools this domain with others")
        if placement is None:
            out.append(f"  nothing to change: the limit in force is already {p.current_limit}")
        else:
            out.append(f"  propose: {p.line}   ({_where(placement)})")
    lines = sum(1 for _, placement in items if placement is not None)
    if written is not None:
        out.append(f"wrote {lines} line(s) into {written}")
    elif lines:
        out.append(f"{lines} line(s) proposed; copiamail advise --write puts them into the CFG file")
    return "\n".join(out)
