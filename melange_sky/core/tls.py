"""How melange-sky's own clients (membership pushes, the controller's probes and reads) trust a router that serves
TLS: pinned to the certificate the user gave it (`deployment.router.tls.certfile`), not to the system's CAs and not
to a host name.

The fleet reaches its router at the address its cloud gave it, while the certificate names whatever the user's DNS
calls it (or nothing, when self-signed): a host name check would refuse every real certificate. Trusting only the
given certificate is the stronger check: no other certificate passes, whichever CA issued it.
"""
from __future__ import annotations

import os
import re
import ssl
from pathlib import Path

from melange_sky.errors import ConfigError

__all__ = ["client_context", "first_certificate"]

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s.+?\s-----END CERTIFICATE-----", re.S)


def first_certificate(certfile: str | os.PathLike[str]) -> str:
    """The first PEM certificate of `certfile` (a server's own, in a chain file); ConfigError (one line) when the file
    cannot be read or holds none."""
    try:
        data = Path(certfile).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(str(certfile), None, f"cannot read the router's certificate: {exc.strerror}") from None
    match = _PEM_CERT.search(data)
    if match is None:
        raise ConfigError(str(certfile), None, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return match.group(0).decode("ascii", "replace")


def client_context(cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """The TLS context to reach a router with: with `cafile`, trusting exactly its first certificate (the router's
    own: a chain's intermediates are not trusted, so no other certificate of the same CA passes) and no host name
    check (see the module's docstring); without, the system's CAs and the host name, as any HTTPS client."""
    if cafile is None:
        return ssl.create_default_context()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the pinned certificate is the anchor, CA or not
    try:
        context.load_verify_locations(cadata=first_certificate(cafile))
    except ssl.SSLError as exc:
        raise ConfigError(str(cafile), None, f"not a usable certificate ({exc.reason or exc})") from None
    return context
