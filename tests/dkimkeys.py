"""RSA keys for the DKIM tests, made with the openssl command (CI installs it),
and a receiver's view: the public key record it looks up, and dkimpy's verdict."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import dkim
import dkim.crypto


def make_key(path: Path, bits: int = 2048) -> Path:
    """A new unencrypted RSA private key in PEM (PKCS#8, OpenSSL 3's default) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "genrsa", "-out", str(path), str(bits)], check=True, capture_output=True)
    return path


def public_record(key_file: Path) -> bytes:
    """The DNS TXT record that publishes ``key_file``'s public key."""
    der = subprocess.run(["openssl", "rsa", "-in", str(key_file), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dns(records: Mapping[str, bytes]) -> Callable[..., bytes | None]:
    """A dnsfunc for dkimpy answering ``selector._domainkey.domain`` from ``records``."""
    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.decode("ascii").rstrip(".").lower())
    return txt


def verifies(message: bytes, records: Mapping[str, bytes]) -> bool:
    """Whether a receiver with these DNS records finds the topmost DKIM signature good."""
    return dkim.verify(message, dnsfunc=dns(records))


def signature_tags(message: bytes) -> dict[str, str]:
    """The tags of the message's first DKIM-Signature header, whitespace removed."""
    head = message.split(b"\r\n\r\n", 1)[0].decode("ascii")
    unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ")
    line = next(l for l in unfolded.split("\r\n") if l.lower().startswith("dkim-signature:"))
    tags = {}
    for part in line.split(":", 1)[1].split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            tags[k.strip()] = "".join(v.split())
    return tags


def _der_integer(n: int) -> bytes:
    body = n.to_bytes(n.bit_length() // 8 + 1, "big")
    return b"\x02" + _der_length(len(body)) + body


def _der_length(n: int) -> bytes:
    if n < 128:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def damaged_copy(key_file: Path, target: Path, change: int = 2) -> Path:
    """``key_file`` with one of its CRT numbers changed: still a well-formed
    PKCS#1 key, but one whose signatures no receiver could verify."""
    pk = dkim.crypto.parse_pem_private_key(key_file.read_bytes())
    numbers = [0, pk["modulus"], pk["publicExponent"], pk["privateExponent"], pk["prime1"], pk["prime2"],
               pk["exponent1"] + change, pk["exponent2"], pk["coefficient"]]
    body = b"".join(_der_integer(n) for n in numbers)
    der = b"\x30" + _der_length(len(body)) + body
    b64 = base64.encodebytes(der).decode("ascii")
    target.write_text(f"-----BEGIN RSA PRIVATE KEY-----\n{b64}-----END RSA PRIVATE KEY-----\n", encoding="ascii")
    return target
