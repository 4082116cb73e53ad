"""``copiamail advise``: ``$domain_limit`` lines proposed from the throttle
replies the spool's jobs record, and written into the CFG file on request.

The CopiaFacts manual says a domain's need for a limit is found "by analyzing
e-mail transmission outcome codes and viewing the EMAIL_ERROR variable".
This package does that analysis, one idea per module:

- :mod:`.evidence` reads the jobs in ``SENT``, ``FAIL`` and the TOSEND
  folders: each attempt a throttle reply answered, with its date, its reply
  and, where the job says, the connections open when it came.
- :mod:`.proposals` turns them into a count per domain and node.
- :mod:`.placing` finds where each line goes in the CFG file so that no
  earlier rule shadows it, and writes the file keeping every other byte.
- :mod:`.report` prints the result as text or JSON.

Decisions, and why:

- **Per recipient domain, not per stanza.** A ``$domain_limit`` rule gives
  each domain it matches its own limit; no line can express a pool of
  domains (a regex stanza's ``scope_max_outbound_connections``) or a host
  stanza. And ``EMAIL_CONNECTIONS`` counts the connections holding the job's
  own ``$domain_limit`` key, which is its recipient domain. So evidence is
  grouped by recipient domain; a domain a pooled stanza covers is flagged
  (``pooled``) so the operator can lower that stanza's cap in copiamail.yaml
  too. Host stanzas are not seen: a job records the address its message
  went to only after a delivery, not with a refusal.
- **Per node.** ``$domain_limit`` limits connections from one node, and
  receivers count connections per client address: the evidence of node N1
  says what N1 may open. A line is proposed for the node the attempt
  records name (copiamail writes its node's name in each record); records
  that name none (CopiaFacts' own) give a ``*`` line. The limit in force is
  matched for that node, as the node matches it.
- **The rule's text is ``@domain``.** Rules match substrings of the whole
  address, so this is the narrowest rule that exists; it also applies to a
  domain that merely begins with the same text (``@a.test`` matches
  ``x@a.testing.org``), as CopiaFacts' own advice to write ``@copia.com``
  does.
- **An existing rule of the same node and text is updated in place** (its
  count only): a new line before it would leave it dead, and
  ``check-config`` must be clean after ``--write``. Any other existing rule
  is kept byte for byte; new lines are inserted before the first rule that
  would shadow them.
- **No line where the limit in force is already low enough** (a second run
  after ``--write`` proposes nothing new). Counts from files without
  ``EMAIL_CONNECTIONS`` are one below the limit in force, so each run on the
  same replies lowers it again: give ``--since`` the day of the last change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from copiamail.config import Config
from copiamail.errors import ConfigError
from copiamail.jobfile.fsfile import CommandFile
from copiamail.spool.queue import Spool

from .evidence import Evidence, gather
from .placing import Placement, place, place_all, read_cfg, write_cfg
from .proposals import Proposal, propose

__all__ = ["Advice", "Evidence", "Placement", "Proposal", "advise", "write"]


@dataclass(frozen=True)
class Advice:
    """What ``advise`` found: every proposal with where its line would go
    in the CFG file as it stands (None: nothing to change), the number of
    job files read and the warnings (files skipped)."""

    items: tuple[tuple[Proposal, Placement | None], ...]
    files: int
    warnings: tuple[str, ...]

    @property
    def lines(self) -> int:
        return sum(1 for _, placement in self.items if placement is not None)


def _cfg_text(config: Config) -> CommandFile:
    return read_cfg(config.cfg_path) if config.cfg_path is not None else CommandFile(())


def advise(config: Config, since: date | None = None) -> Advice:
    """The proposals the spool of ``config`` supports, from attempts that
    ended on ``since`` or later where given; the CFG file is not changed."""
    evidence = gather(Spool(config.spool, config.queues, config.fsync), config.throttle_table, since)
    cfg = _cfg_text(config)
    items: list[tuple[Proposal, Placement | None]] = []
    for proposal in propose(config, evidence.throttled):
        rule = proposal.new_rule
        # Each placed in the file as it stands, for the report; write()
        # places them one after another.
        items.append((proposal, place(cfg, rule)[1] if rule is not None else None))
    return Advice(tuple(items), evidence.files, evidence.warnings)


def write(config: Config, advice: Advice) -> int:
    """Write the proposed lines into the CFG file of ``config``; how many.
    Raises ConfigError when the config names no CFG file or it cannot be
    read or written."""
    rules = [p.new_rule for p, placement in advice.items if placement is not None and p.new_rule is not None]
    if not rules:
        return 0
    if config.cfg_path is None:
        raise ConfigError("no CFG file to write the lines into: name one with cfg: in copiamail.yaml", config.path)
    cf, _ = place_all(read_cfg(config.cfg_path), rules)
    write_cfg(config.cfg_path, cf)
    return len(rules)
