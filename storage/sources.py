"""Checkpoints by reference: which sources an import may read, and reading them safely.

Sources: ``s3://bucket/key`` (buckets in REBASIN_IMPORT_S3_BUCKETS, the deployment's credentials),
``https://host/...`` (hosts in REBASIN_IMPORT_HTTP_HOSTS), and ``models:/name/version`` or
``runs:/run_id/path`` from REBASIN_MLFLOW_TRACKING_URI. Anything else is refused before a byte moves.

HTTPS is where a server can be turned against its own network (SSRF). So: the host must be on the
allow-list; every address it resolves to must be public (not loopback, link-local such as the
169.254.169.254 metadata service, private, shared or reserved, IPv4 or IPv6) unless it lies in a
network the operator allowed (REBASIN_IMPORT_HTTP_ALLOWED_NETWORKS); the connection goes to the
address that was checked (a second DNS answer cannot swap it: no rebinding); every redirect is
checked the same way before it is followed; the body is bounded by REBASIN_MAX_UPLOAD_BYTES.
"""

import http.client
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from core.config import Settings

log = logging.getLogger("rebasin.imports")

MAX_SOURCE_CHARS = 2048
MAX_REDIRECTS = 5
HTTP_ATTEMPTS = 3
CHUNK = 1024 * 1024
USER_AGENT = "rebasin-import"
MLFLOW_SOURCE = re.compile(r"^(models:/[^/]+/[^/]+|runs:/[0-9A-Za-z_-]+/.+)$")


class SourceRefused(ValueError):
    """A source the policy does not allow (422 at submission; an import's error if found while fetching)."""


class SourceFailed(RuntimeError):
    """Reading an allowed source failed. ``status`` is the problem's status; ``retry``: worth another attempt."""

    def __init__(self, message: str, status: int = 502, retry: bool = False, kind: str = "import-failed"):
        super().__init__(message)
        self.status, self.retry, self.kind = status, retry, kind


@dataclass(frozen=True)
class Source:
    scheme: str  # s3 | https | http | mlflow
    uri: str
    host: str = ""  # https/http: host name; s3: bucket
    port: int = 0
    path: str = ""  # https/http: path with query; s3: key


Writer = Callable[[bytes], None]  # takes the fetched bytes in order (raises to stop: too large)


def parse_source(uri: str, settings: Settings) -> Source:
    """The source, checked against everything the policy says without contacting it (no DNS either)."""
    if len(uri) > MAX_SOURCE_CHARS or not uri.isprintable() or uri != uri.strip():
        raise SourceRefused(f"source must be a URI of at most {MAX_SOURCE_CHARS} printable characters")
    if uri.startswith(("models:/", "runs:/")):
        if not MLFLOW_SOURCE.match(uri):
            raise SourceRefused("an MLflow source is models:/<name>/<version> or runs:/<run_id>/<path>")
        if not settings.mlflow_tracking_uri:
            raise SourceRefused("this server has no MLflow tracking server (REBASIN_MLFLOW_TRACKING_URI)")
        from storage import mlflow_io

        if not mlflow_io.available():
            raise SourceRefused("MLflow is not installed on this server (pip install 'rebasin[mlflow]')")
        return Source("mlflow", uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if not bucket or not key:
            raise SourceRefused("an S3 source is s3://<bucket>/<key>")
        if bucket not in settings.import_buckets():
            raise SourceRefused(f"bucket {bucket!r} is not one imports may read (REBASIN_IMPORT_S3_BUCKETS)")
        return Source("s3", uri, host=bucket, path=unquote(key))
    if scheme not in ("https", "http") or (scheme == "http" and not settings.import_allow_plain_http):
        allowed = "https, http, s3, models, runs" if settings.import_allow_plain_http else "https, s3, models, runs"
        raise SourceRefused(f"scheme {parts.scheme or '(none)'!r} is not allowed; use one of: {allowed}")
    if parts.username is not None or parts.password is not None:
        raise SourceRefused("credentials in the URL are not allowed")
    try:
        host, port = (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise SourceRefused("the URL's port is invalid") from None
    if not host:
        raise SourceRefused("the URL has no host")
    if host not in settings.import_hosts():
        raise SourceRefused(f"host {host!r} is not one imports may read (REBASIN_IMPORT_HTTP_HOSTS)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Source(scheme, uri, host=host, port=port, path=path)


def _allowed_networks(settings: Settings) -> list:
    networks = []
    for entry in filter(None, (e.strip() for e in settings.import_http_allowed_networks.split(","))):
        networks.append(ipaddress.ip_network(entry, strict=False))
    return networks


def check_address(address: str, settings: Settings) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(ip in network for network in _allowed_networks(settings)):
        return ip
    if not ip.is_global or ip.is_multicast:
        raise SourceRefused(
            f"the host resolves to {ip}, a loopback, link-local, private or reserved address; imports connect "
            "to public addresses only (REBASIN_IMPORT_HTTP_ALLOWED_NETWORKS lists exceptions)"
        )
    return ip


def resolve_checked(source: Source, settings: Settings) -> list:
    """Every address the host resolves to, each allowed; one refused address refuses the host."""
    try:
        infos = socket.getaddrinfo(source.host, source.port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise SourceRefused(f"host {source.host!r} does not resolve") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    return [check_address(address, settings) for address in addresses]


def check_source(uri: str, settings: Settings) -> Source:
    """The whole policy, as at submission: also where an http(s) host's name points now."""
    source = parse_source(uri, settings)
    if source.scheme in ("https", "http"):
        resolve_checked(source, settings)
    return source


# --- HTTPS --------------------------------------------------------------------------------------


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to the address that was checked, while TLS verifies the certificate for the host name."""

    def __init__(self, source: Source, address, timeout: float):
        super().__init__(source.host, source.port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self):
        sock = socket.create_connection((str(self.address), self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, source: Source, address, timeout: float):
        super().__init__(source.host, source.port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((str(self.address), self.port), self.timeout)


def _fetch_http_once(source: Source, settings: Settings, limit: int, write: Writer) -> None:
    for _ in range(MAX_REDIRECTS + 1):
        address = resolve_checked(source, settings)[0]
        kind = _PinnedHTTPSConnection if source.scheme == "https" else _PinnedHTTPConnection
        connection = kind(source, address, settings.import_timeout_s)
        try:
            connection.request("GET", source.path, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise SourceFailed(f"{source.uri} answered {response.status} without a Location", status=502)
                target = urljoin(source.uri, location)
                try:
                    source = parse_source(target, settings)
                except SourceRefused as refused:
                    raise SourceRefused(f"{source.uri} redirects to {target}, which is refused: {refused}") from None
                if source.scheme not in ("https", "http"):
                    raise SourceRefused(f"a redirect to {target} is refused: only http(s) redirects are followed")
                continue
            if response.status != 200:
                retry = response.status >= 500 or response.status == 429
                raise SourceFailed(f"{source.uri} answered {response.status} {response.reason}", status=502 if retry else 422, retry=retry)
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise SourceFailed(f"{source.uri} is {length} bytes, over the limit of {limit} bytes (REBASIN_MAX_UPLOAD_BYTES)",
                                   status=413, kind="upload-too-large")
            received = 0
            while chunk := response.read(CHUNK):
                received += len(chunk)
                if received > limit:
                    raise SourceFailed(f"{source.uri} sent more than the limit of {limit} bytes (REBASIN_MAX_UPLOAD_BYTES)",
                                       status=413, kind="upload-too-large")
                write(chunk)
            if length is not None and length.isdigit() and received != int(length):
                raise SourceFailed(f"{source.uri} ended after {received} of {length} bytes", retry=True)
            return
        finally:
            connection.close()
    raise SourceFailed(f"more than {MAX_REDIRECTS} redirects from {source.uri}", status=422)


def fetch_http(source: Source, settings: Settings, limit: int, open_writer: Callable[[], Writer]) -> None:
    """GET with a few quick retries on transient failures (connection errors, 5xx, truncation)."""
    for attempt in range(HTTP_ATTEMPTS):
        try:
            return _fetch_http_once(source, settings, limit, open_writer())
        except ssl.SSLCertVerificationError as error:
            raise SourceFailed(f"{source.uri}: the TLS certificate is not trusted ({error.verify_message})", status=422) from None
        except (OSError, http.client.HTTPException) as error:
            failure = SourceFailed(f"{source.uri}: {type(error).__name__}: {error}", retry=True)
        except SourceFailed as error:
            if not error.retry:
                raise
            failure = error
        if attempt + 1 < HTTP_ATTEMPTS:
            log.warning("import from %s: %s; trying again", source.uri, failure)
            time.sleep(min(2**attempt, 10))
    raise failure


# --- S3 and MLflow ------------------------------------------------------------------------------


def fetch_s3(source: Source, settings: Settings, limit: int, write: Writer) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    config = Config(retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"},
                    connect_timeout=settings.import_timeout_s, read_timeout=settings.import_timeout_s)
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
    try:
        size = client.head_object(Bucket=source.host, Key=source.path)["ContentLength"]
        if size > limit:
            raise SourceFailed(f"{source.uri} is {size} bytes, over the limit of {limit} bytes (REBASIN_MAX_UPLOAD_BYTES)",
                               status=413, kind="upload-too-large")
        body = client.get_object(Bucket=source.host, Key=source.path)["Body"]
        try:
            received = 0
            for chunk in body.iter_chunks(CHUNK):
                received += len(chunk)
                if received > limit:
                    raise SourceFailed(f"{source.uri} grew past the limit of {limit} bytes", status=413, kind="upload-too-large")
                write(chunk)
        finally:
            body.close()
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound", "403", "AccessDenied", "NoSuchBucket"):
            raise SourceFailed(f"{source.uri}: {code or 'not found'}", status=422) from None
        raise SourceFailed(f"{source.uri}: {error}", retry=True) from None
    except BotoCoreError as error:
        raise SourceFailed(f"{source.uri}: {error}", retry=True) from None


def fetch_mlflow(source: Source, settings: Settings, limit: int, workdir: Path) -> Path:
    """Download an MLflow model or run artifact and pick the one checkpoint file in it."""
    from storage import mlflow_io

    return mlflow_io.download_checkpoint(source.uri, settings.mlflow_tracking_uri, workdir, limit)


def fetch(source: Source, settings: Settings, limit: int, workdir: Path, open_writer: Callable[[], Writer]) -> Path | None:
    """Bring the source's bytes in: through ``open_writer()`` (a fresh writer per attempt), or, for MLflow,
    as a downloaded file whose path is returned."""
    if source.scheme == "s3":
        fetch_s3(source, settings, limit, open_writer())
    elif source.scheme in ("https", "http"):
        fetch_http(source, settings, limit, open_writer)
    else:
        return fetch_mlflow(source, settings, limit, workdir)
    return None
