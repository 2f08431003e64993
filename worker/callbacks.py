"""Job-finished callbacks: signed with HMAC-SHA256, sent only to public addresses unless allowed.

The receiver checks ``X-Rebasin-Signature: t=<unix time>,v1=<hex>`` where the
hex is HMAC-SHA256(secret, "<t>.<raw body>"), and rejects old timestamps.
"""

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from urllib.parse import urlsplit

import httpx

SIGNATURE_HEADER = "X-Rebasin-Signature"
TIMEOUT_S = 10


class CallbackRefused(ValueError):
    pass


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def check_callback_url(url: str, allow_private: bool) -> None:
    """Refuse URLs that would make the server call into its own network (SSRF)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("callback_url must be an http(s) URL with a host")
    if allow_private:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)}
    except socket.gaierror:
        raise CallbackRefused(f"callback host {parts.hostname!r} does not resolve") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            raise CallbackRefused(
                f"callback_url resolves to {ip}, a loopback, link-local or private address; "
                "the server is configured to call public addresses only"
            )


def deliver(url: str, payload: dict, secret: str, allow_private: bool) -> None:
    check_callback_url(url, allow_private)  # again at send time: DNS may have changed since submission
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, int(time.time()), body)}
    response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_S, follow_redirects=False)
    response.raise_for_status()
