"""DKIM signatures (RFC 6376) on the exact bytes copiamail sends, made with dkimpy.

:func:`sign` is the pure part: a message as :func:`~copiamail.jobfile.message.build_message`
returns it (CRLF, after any transfer encoding), the signing domain, the selector
and a PEM RSA private key in; the same bytes with a ``DKIM-Signature`` header on
top out. rsa-sha256, relaxed/relaxed, over those of :data:`SIGNED_HEADERS` the
message has. A key dkimpy cannot sign with is a :class:`~copiamail.errors.JobError`
with outcome ``DKIM_FAILED``: a message asked to be signed is never sent unsigned.

:func:`sign_for_job` decides for one job: its own key (``$email_dkim_keyfile``,
selector from ``$var_def DKIM_SELECTOR``, domain from the From: header) first,
else config ``dkim:`` for the From: domain, else the message goes as it is.

Cost: dkimpy does RSA in pure Python, about 8 ms per 2048-bit signature on the
project's machine (measured; OpenSSL would take about 0.6 ms). Only messages
that are signed pay it; with no ``dkim:`` config and no job key, nothing is done.
"""

from __future__ import annotations

import re
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING

from copiamail.errors import JobError
from copiamail.jobfile import outcome
from copiamail.jobfile.files import JobFiles
from copiamail.jobfile.model import Job

if TYPE_CHECKING:
    from copiamail.config import Config

# The usual header set (RFC 6376 5.4.1), each signed where the message has it.
SIGNED_HEADERS = (
    "From", "To", "Subject", "Date", "Message-ID", "MIME-Version",
    "Content-Type", "Content-Transfer-Encoding", "Reply-To", "Cc",
)
# RFC 8301 3.2: signers MUST use keys of at least 1024 bits; verifiers ignore shorter ones.
MIN_KEY_BITS = 1024
SELECTOR_VARIABLE = "DKIM_SELECTOR"

_SIGNED = {name.lower().encode("ascii") for name in SIGNED_HEADERS}
_ORDER = {name.lower().encode("ascii"): i for i, name in enumerate(SIGNED_HEADERS)}
# RFC 6376 3.1 and 3.5: a selector and a domain are dot-separated labels of
# letters, digits and hyphens (RFC 5321 sub-domains).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")


def is_dns_name(text: str) -> bool:
    """Whether ``text`` can be a DKIM selector or signing domain (ASCII labels)."""
    return len(text) <= 253 and _DNS_NAME.match(text) is not None


def _pem(key: bytes) -> bytes:
    # dkimpy finds the key between "--\n" and "\n--": a key file saved with
    # Windows line endings would not be found.
    return key.replace(b"\r\n", b"\n")


def key_problem(key: bytes) -> str | None:
    """Why dkimpy cannot make good rsa-sha256 signatures with ``key`` (PEM,
    PKCS#1 or PKCS#8, unencrypted), or None when it can."""
    # dkimpy is imported where it is used: importing it costs a node 70 ms
    # at every start, and most nodes never sign.
    import dkim.crypto

    try:
        pk = dkim.crypto.parse_pem_private_key(_pem(key))
    except Exception as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        return f"not an unencrypted RSA private key in PEM form (PKCS#1 or PKCS#8): {detail}"
    n, e, p, q = pk["modulus"], pk["publicExponent"], pk["prime1"], pk["prime2"]
    if n.bit_length() < MIN_KEY_BITS:
        return f"a {n.bit_length()}-bit key is too short: receivers ignore DKIM keys under {MIN_KEY_BITS} bits (RFC 8301)"
    # dkimpy signs with the CRT numbers and receivers verify with n and e: a
    # damaged file whose numbers disagree would send signatures that never verify.
    if (p <= 1 or q <= 1 or p * q != n or e * pk["exponent1"] % (p - 1) != 1
            or e * pk["exponent2"] % (q - 1) != 1 or pk["coefficient"] * q % p != 1):
        return "the key's numbers do not agree (a damaged key file?)"
    return None


def _header_names(message: bytes) -> list[bytes]:
    """The names (lower-case) of :data:`SIGNED_HEADERS` the message's header has, in that order."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end]
    present = set()
    for line in head.split(b"\r\n"):
        if line[:1] not in (b" ", b"\t"):
            name = line.split(b":", 1)[0].strip().lower()
            if name in _SIGNED:
                present.add(name)
    return sorted(present, key=_ORDER.__getitem__)


def sign(message: bytes, domain: str, selector: str, key: bytes) -> bytes:
    """``message`` (CRLF) with a DKIM-Signature header for ``domain`` and
    ``selector`` made with ``key`` (PEM) prepended; raises JobError
    (``DKIM_FAILED``) when it cannot be signed."""
    problem = key_problem(key)
    if problem is not None:
        raise JobError(f"DKIM signing failed: {problem}", outcome.DKIM_FAILED.code)
    for what, name in (("domain", domain), ("selector", selector)):
        if not is_dns_name(name):
            raise JobError(f"DKIM signing failed: bad {what} {name!r}", outcome.DKIM_FAILED.code)
    import dkim

    try:
        header = dkim.sign(
            message, selector.encode("ascii"), domain.encode("ascii"), _pem(key),
            canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=b"rsa-sha256",
            include_headers=_header_names(message),
        )
    except dkim.DKIMException as e:
        raise JobError(f"DKIM signing failed: {e}", outcome.DKIM_FAILED.code) from None
    return header + message


def from_domain(message: bytes) -> str | None:
    """The domain (lower-case) of the address in the message's From: header, or None."""
    end = message.find(b"\r\n\r\n")
    head = (message if end < 0 else message[:end]).decode("ascii", "replace")
    # Unfold, then take the first From: line (build_message writes one).
    for line in re.sub(r"\r\n(?=[ \t])", "", head).split("\r\n"):
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "from":
            local, at, domain = parseaddr(value)[1].rpartition("@")
            return domain.lower() if at and local and domain else None
    return None


def sign_for_job(message: bytes, job: Job, config: Config, spool_root: Path) -> bytes:
    """The bytes to send for ``job``: ``message`` signed with the job's own key
    where it names one, else with config ``dkim:``'s key for its From: domain,
    else ``message`` unchanged. A job key is read like the job's other files
    (``spool_root``, ``attachment_roots``, ``path_map``). Raises JobError
    (``DKIM_FAILED``, with the job line) when a job asked to be signed cannot be."""
    if job.dkim_keyfile is None and not config.dkim:
        return message  # the common case: nothing to look up
    domain = from_domain(message)
    if job.dkim_keyfile is None:
        if domain is None or (signer := config.dkim.get(domain)) is None:
            return message
        return sign(message, domain, signer.selector, signer.key)
    path, line = job.dkim_keyfile
    selector = job.variables.get(SELECTOR_VARIABLE, "").strip()
    try:
        if not selector:
            raise JobError(f"$email_dkim_keyfile needs $var_def {SELECTOR_VARIABLE} (the key's selector)",
                           outcome.DKIM_FAILED.code)
        if domain is None:
            raise JobError("DKIM signing failed: the From: header has no domain to sign for", outcome.DKIM_FAILED.code)
        try:
            key, _ = JobFiles(spool_root, config.roots, config.path_map).read(path, line)
        except JobError as e:
            raise JobError(f"DKIM key file: {e.message}", outcome.DKIM_FAILED.code) from None
        return sign(message, domain, selector, key)
    except JobError as e:
        raise JobError(e.message, e.outcome, line=line) from None
