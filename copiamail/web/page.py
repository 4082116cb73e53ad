"""The web page: ``static/page.html`` and ``static/page.js``, read once.

Everything the page shows comes from ``/api/status`` and goes into the page
as text (``textContent``, ``createTextNode``, ``setAttribute``), never as
markup: addresses and ``EMAIL_ERROR`` come from job files and servers. The
Content-Security-Policy header allows only this server's own script, so even
markup that got in could not run."""

from __future__ import annotations

from importlib.resources import files
from types import MappingProxyType

_STATIC = files("copiamail.web") / "static"
PAGE_HTML = (_STATIC / "page.html").read_text(encoding="utf-8")
PAGE_JS = (_STATIC / "page.js").read_text(encoding="utf-8")

SECURITY_HEADERS = MappingProxyType({
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
})
