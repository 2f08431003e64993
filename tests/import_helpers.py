"""A real HTTPS server for import tests: a test CA made here (cryptography), a certificate for the loopback
names, and a log of every request it receives (the proof that a refused import fetched nothing)."""

import datetime
import ipaddress
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_test_ca(where: Path, names: list[str], addresses: list[str]) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) as PEM files; the server's names and addresses as SANs."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("rebasin test CA")).issuer_name(_name("rebasin test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = where / "ca.pem", where / "server.pem", where / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class FileServer:
    """Serves ``files`` (path -> bytes) and ``redirects`` (path -> Location) over HTTPS on every local address."""

    cert: Path
    key: Path
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    unsized: set[str] = field(default_factory=set)  # sent chunked, without Content-Length
    gates: dict[str, threading.Event] = field(default_factory=dict)  # the body is sent once its gate opens
    log: list[tuple[str, str]] = field(default_factory=list)  # (Host header, path) of every request
    port: int = 0

    def start(self) -> "FileServer":
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server_self.log.append((self.headers.get("Host", ""), self.path))
                if self.path in server_self.redirects:
                    self.send_response(302)
                    self.send_header("Location", server_self.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path in server_self.files:
                    body = server_self.files[self.path]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    if self.path in server_self.unsized:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        try:
                            for start in range(0, len(body), 65536):
                                piece = body[start:start + 65536]
                                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                            self.wfile.write(b"0\r\n\r\n")
                        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                            pass
                        return
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    try:
                        if self.path in server_self.gates:
                            self.wfile.write(body[:1024])
                            self.wfile.flush()
                            server_self.gates[self.path].wait(timeout=300)
                            body = body[1024:]
                        self.wfile.write(body)
                    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                        pass
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        # Every local address (127.0.0.0/8 and the host's own): a request that a refused import made would land here.
        self.httpd = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self) -> list[str]:
        return [path for _, path in self.log]
