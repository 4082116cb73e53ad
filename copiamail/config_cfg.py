"""The CFG file (CopiaFacts ``FAXFACTS.CFG`` syntax): ``$domain_limit``, the
retry rules (``$email_retry_delays``, ``$email_retry_max``, ``$retry_delays``,
``$retry_max``), ``$email_esender``, ``$email_from`` and ``$var_def``, read into
the frozen :class:`CfgRules`; any other command is ignored with a warning naming
file and line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from copiamail.errors import ConfigError, SyntaxFileError
from copiamail.jobfile import outcome
from copiamail.jobfile.addresses import read_mailbox, written_address
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.rules import DomainLimitRule, parse_rule


@dataclass(frozen=True)
class CfgRules:
    """What the CFG file says."""

    path: Path | None = None
    domain_limits: tuple[DomainLimitRule, ...] = ()
    retry_delays: Mapping[str, tuple[outcome.RetryItem, ...]] = field(default_factory=dict)
    retry_max: int | None = None
    esender: str | None = None
    warnings: tuple[str, ...] = ()
    variables: Mapping[str, str] = field(default_factory=dict)  # $var_def, names upper-case
    fallback_delays: Mapping[str, tuple[outcome.RetryItem, ...]] = field(default_factory=dict)  # $retry_delays
    fallback_max: int | None = None  # $retry_max
    from_header: str | None = None  # $email_from, else $email_esender as written

    @property
    def retry_rules(self) -> outcome.RetryRules:
        return outcome.RetryRules(self.retry_delays, self.retry_max, self.fallback_delays, self.fallback_max)


# CFG commands of CopiaFacts' e-mail set that copiamail accepts without a
# warning and leaves to copiamail.yaml ($email_settings: DNS and SMTP timeouts).
_CFG_KNOWN_UNUSED = frozenset({"email_settings"})


def load_cfg(path: Path) -> CfgRules:
    """Read the CFG file: ``$domain_limit``, retry rules, ``$email_esender``."""
    try:
        cf = CommandFile.read(path)
    except FileNotFoundError:
        raise ConfigError("CFG file not found", path) from None
    except OSError as e:
        raise ConfigError(f"cannot read CFG file: {e.strerror}", path) from None
    except ValueError as e:  # a name the file system cannot take (NUL, a lone surrogate)
        raise ConfigError(f"bad CFG file name: {e}", repr(str(path))) from None
    try:
        commands = cf.commands()
    except SyntaxFileError as e:
        raise ConfigError(e.message, path, e.line) from None
    rules: list[DomainLimitRule] = []
    delays: dict[str, dict[str, tuple[outcome.RetryItem, ...]]] = {"email_retry_delays": {}, "retry_delays": {}}
    maxima: dict[str, int] = {}
    esender: str | None = None
    written: dict[str, str] = {}
    warnings: list[str] = []
    variables: dict[str, str] = {}
    for cmd in commands:
        if cmd.name == "domain_limit":
            rules.append(parse_rule(cmd, path))
        elif cmd.name in delays:
            try:
                klass, items = outcome.parse_retry_command(cmd.args)
            except ValueError as e:
                raise ConfigError(f"${cmd.name} {e}" if not cmd.args else str(e), path, cmd.line) from None
            delays[cmd.name][klass] = items
        elif cmd.name in ("email_retry_max", "retry_max"):
            if len(cmd.args) != 1 or not (cmd.args[0].isascii() and cmd.args[0].isdigit()):
                raise ConfigError(f"${cmd.name} needs one number of retries (0 or more)", path, cmd.line)
            maxima[cmd.name] = int(cmd.args[0])
        elif cmd.name in ("email_esender", "email_from"):
            text = written_address(cmd, cf)
            mailbox = read_mailbox(text)
            if mailbox is None:
                raise ConfigError(f"${cmd.name} needs one e-mail address (a display name may come first)",
                                  path, cmd.line)
            written[cmd.name] = text
            if cmd.name == "email_esender":
                esender = mailbox.address
        elif cmd.name == "var_def":
            if not cmd.args:
                raise ConfigError("$var_def needs a NAME", path, cmd.line)
            variables[cmd.args[0].upper()] = " ".join(cmd.args[1:])
        elif cmd.name in _CFG_KNOWN_UNUSED:
            continue
        else:
            warnings.append(f"{path}:{cmd.line}: ${cmd.name} is not used by copiamail; ignored")
    return CfgRules(path, tuple(rules), delays["email_retry_delays"], maxima.get("email_retry_max"), esender,
                    tuple(warnings), variables, delays["retry_delays"], maxima.get("retry_max"),
                    written.get("email_from") or written.get("email_esender"))
