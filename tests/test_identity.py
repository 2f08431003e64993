"""Identity and limits on a real multi-replica deployment: two `rebasin serve` processes behind the same
PostgreSQL and Redis (managed keys, sessions, shared limits); a local OIDC issuer signing real RS256 and
ES256 tokens; the audit log over every state-changing operation of the OpenAPI document."""

import base64
import hashlib
import hmac
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from safetensors.torch import save as save_safetensors

from tests.conftest import free_port, process_env, rebasin_command
from tests.service_helpers import make_mlp, upload

REVOCATION_DEADLINE_S = 5


def keys_cli(env: dict, *args: str) -> dict | list:
    run = subprocess.run(rebasin_command("keys", *args, "--json"), env=process_env(env), capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def status_of(url: str, key: str | None = None, cookies: dict | None = None, path: str = "/v1/jobs") -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + path, headers=headers, cookies=cookies, timeout=30).status_code


def wait_until(condition, timeout_s: float) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.fixture
def two_replicas(make_production_service):
    """Two API processes, no worker (jobs stay queued), the same PostgreSQL and Redis."""
    first = make_production_service(workers=0, REBASIN_TENANT_REQUESTS_PER_S="0")
    second = make_production_service(workers=0, REBASIN_TENANT_REQUESTS_PER_S="0")
    return first, second


def sign_in(url: str, key: str) -> dict:
    response = httpx.post(f"{url}/v1/session", json={"api_key": key}, timeout=30)
    assert response.status_code == 200, response.text
    return {"rebasin_session": response.cookies["rebasin_session"]}


def test_key_lifecycle_on_two_replicas(two_replicas):
    a, b = two_replicas
    env = a.env
    created = keys_cli(env, "create", "--tenant", "acme", "--name", "ci")
    assert created["secret"].startswith("rbk_") and created["scope"] == "write"
    secret = created["secret"]
    assert status_of(a.url, secret) == 200 and status_of(b.url, secret) == 200
    assert status_of(a.url, "rbk_not-a-key") == 401
    listed = keys_cli(env, "list")
    assert [k["id"] for k in listed] == [created["id"]] and "secret" not in listed[0]

    # A session made from the key on one replica is honoured by the other (it lives in the database).
    cookies = sign_in(a.url, secret)
    assert status_of(b.url, cookies=cookies) == 200

    keys_cli(env, "revoke", created["id"])
    took = wait_until(lambda: all(status_of(u, secret) == 401 and status_of(u, cookies=cookies) == 401 for u in (a.url, b.url)),
                      REVOCATION_DEADLINE_S)
    print(f"revoked key and its session refused on both replicas after {took:.2f} s")

    # Rotation: both secrets work during the overlap, only the new one after it (checked below, over the
    # admin API, with an overlap short enough to wait out: the CLI alone takes seconds to start here).
    old = keys_cli(env, "create", "--tenant", "acme")
    assert status_of(a.url, old["secret"]) == 200
    new = keys_cli(env, "rotate", old["id"], "--overlap", "1h")
    assert new["id"] != old["id"] and new["tenant"] == "acme"
    for url in (a.url, b.url):
        assert status_of(url, old["secret"]) == 200 and status_of(url, new["secret"]) == 200
    check_admin_api_and_sign_out(a, b, rotating=new)


def check_admin_api_and_sign_out(a, b, rotating: dict):
    admin = keys_cli(a.env, "create", "--tenant", "ops", "--scope", "admin")["secret"]
    auth = {"Authorization": f"Bearer {admin}"}
    writer = httpx.post(f"{b.url}/v1/keys", json={"tenant": "acme", "name": "writer"}, headers=auth).json()["secret"]

    refused = httpx.post(f"{a.url}/v1/keys", json={"tenant": "acme"}, headers={"Authorization": f"Bearer {writer}"})
    assert refused.status_code == 403 and refused.json()["type"].endswith("/insufficient-scope")
    made = httpx.post(f"{a.url}/v1/keys", json={"tenant": "acme", "scope": "read"}, headers=auth)
    assert made.status_code == 201, made.text
    reader = made.json()["secret"]
    assert status_of(b.url, reader) == 200
    assert httpx.delete(f"{b.url}/v1/jobs/job_x", headers={"Authorization": f"Bearer {reader}"}).status_code == 405
    assert httpx.post(f"{b.url}/v1/jobs/job_x/cancel", headers={"Authorization": f"Bearer {reader}"}).status_code == 403

    cookies = sign_in(b.url, reader)
    assert status_of(a.url, cookies=cookies) == 200
    revoked = httpx.delete(f"{b.url}/v1/keys/{made.json()['id']}", headers=auth)
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    wait_until(lambda: status_of(a.url, reader) == 401 and status_of(a.url, cookies=cookies) == 401, REVOCATION_DEADLINE_S)

    rotated = httpx.post(f"{a.url}/v1/keys/{rotating['id']}/rotate", json={"overlap_s": 5}, headers=auth)
    assert rotated.status_code == 201, rotated.text
    newest = rotated.json()["secret"]
    overlap_ends = datetime.fromisoformat(httpx.get(f"{b.url}/v1/keys/{rotating['id']}", headers=auth).json()["revoked_at"])
    for url in (a.url, b.url):
        assert status_of(url, rotating["secret"]) == 200 and status_of(url, newest) == 200
    assert datetime.now(UTC) < overlap_ends  # the checks above ran within the overlap
    time.sleep(max(0.0, (overlap_ends - datetime.now(UTC)).total_seconds()) + 0.1)
    for url in (a.url, b.url):
        assert status_of(url, rotating["secret"]) == 401 and status_of(url, newest) == 200
    assert httpx.get(f"{b.url}/v1/keys/{rotating['id']}", headers=auth).json()["status"] == "revoked"

    # Sign-out ends the session on the server: a copy of the cookie is refused on both replicas at once.
    cookies = sign_in(a.url, writer)
    assert httpx.delete(f"{a.url}/v1/session", cookies=cookies).status_code == 204
    assert status_of(a.url, cookies=cookies) == 401 and status_of(b.url, cookies=cookies) == 401
    assert status_of(b.url, writer) == 200  # the key itself still works


def test_limits_are_shared_by_the_replicas(make_production_service):
    """Stored bytes: concurrent uploads never pass the quota together. Active jobs: 50 concurrent submissions
    against a quota of 5 make exactly 5 jobs. Request rate: a tenant
    sending to both replicas at once gets the configured rate (one bucket in Redis), not twice it."""
    rate, burst, duration_s = 20.0, 60, 5.0
    files = [save_safetensors(make_mlp(seed).state_dict()) for seed in range(10)]
    assert len({len(f) for f in files}) == 1
    env = {"REBASIN_API_KEYS": "quota:quota-key,rate:rate-key,storage:storage-key", "REBASIN_TENANT_REQUESTS_PER_S": str(rate),
           "REBASIN_TENANT_REQUEST_BURST": str(burst), "REBASIN_TENANT_MAX_ACTIVE_JOBS": "5",
           "REBASIN_TENANT_MAX_STORED_BYTES": str(int(3.5 * len(files[0])))}
    replicas = [make_production_service(workers=0, **env), make_production_service(workers=0, **env)]

    # Stored bytes: ten concurrent uploads, each within the quota on its own; exactly three fit.
    def store(i: int) -> int:
        return httpx.post(f"{replicas[i % 2].url}/v1/checkpoints", files={"file": (f"m{i}.safetensors", files[i])},
                          headers={"Authorization": "Bearer storage-key"}, timeout=60).status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        codes = list(pool.map(store, range(10)))
    assert codes.count(201) == 3 and codes.count(429) == 7, codes
    usage = httpx.get(f"{replicas[0].url}/v1/usage", headers={"Authorization": "Bearer storage-key"}).json()
    assert usage["usage"]["stored_bytes"] == 3 * len(files[0])

    headers = {"Authorization": "Bearer quota-key"}
    with httpx.Client(base_url=replicas[0].url, headers=headers, timeout=60) as client:
        ids = [upload(client, make_mlp(seed).state_dict(), f"m{seed}")["id"] for seed in (1, 2)]
    body = {"checkpoints": ids, "architecture": {"name": "mlp"}, "method": "weight_matching"}

    def submit(i: int) -> int:
        return httpx.post(f"{replicas[i % 2].url}/v1/jobs", json=body, headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(submit, range(50)))
    assert codes.count(202) == 5 and codes.count(429) == 45, codes
    jobs = httpx.get(f"{replicas[1].url}/v1/jobs", headers=headers).json()["items"]
    assert len(jobs) == 5

    sent = []  # (monotonic time halfway between sending and the answer: about when the server saw it, status)
    lock = threading.Lock()
    start = threading.Barrier(6)

    def hammer(url: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer rate-key"}, timeout=30) as client:
            client.get("/healthz")  # connected before the clock starts (health checks are not counted)
            start.wait()
            stop_at = time.monotonic() + duration_s
            while (before := time.monotonic()) < stop_at:
                code = client.get("/v1/usage").status_code
                with lock:
                    sent.append(((before + time.monotonic()) / 2, code))

    threads = [threading.Thread(target=hammer, args=(s.url,)) for s in replicas for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = max(t for t, _ in sent) - min(t for t, _ in sent)
    allowed = burst + rate * elapsed
    codes = [code for _, code in sent]
    print(f"{codes.count(200)} allowed, {codes.count(429)} refused in {elapsed:.2f} s; the bucket allows {allowed:.0f}")
    assert set(codes) == {200, 429} and codes.count(429) > codes.count(200), "the test did not send faster than the rate"
    assert 0.9 * allowed <= codes.count(200) <= 1.1 * allowed


# --- OIDC: a local issuer --------------------------------------------------------------------------------

ISSUER_AUDIENCE = "rebasin"


class Issuer:
    """Discovery document and JWKS over HTTP; RS256 and ES256 signing keys."""

    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.jwks_requests = 0
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        jwks = {"keys": [
            json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key())) | {"kid": "rsa-1", "alg": "RS256", "use": "sig"},
            json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key())) | {"kid": "ec-1", "alg": "ES256", "use": "sig"},
        ]}
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_requests += 1
                    body = jwks
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def claims(self, **overrides) -> dict:
        now = int(time.time())
        return {"iss": self.url, "aud": ISSUER_AUDIENCE, "sub": "alice", "tenant": "acme", "scope": "openid rebasin:write",
                "iat": now, "exp": now + 300} | overrides

    def token(self, alg: str = "RS256", kid: str | None = None, **overrides) -> str:
        key = self.rsa if alg.startswith("RS") else self.ec
        return jwt.encode(self.claims(**overrides), key, algorithm=alg, headers={"kid": kid or ("rsa-1" if key is self.rsa else "ec-1")})

    def public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict, claims: dict, key: bytes | None = None) -> str:
    """A token built by hand: ``alg: none`` (no signature), or HS256 keyed with whatever ``key`` is."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = _b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest()) if key else ""
    return f"{signing_input}.{signature}"


@pytest.fixture(scope="module")
def issuer():
    issuer = Issuer()
    yield issuer
    issuer.server.shutdown()


def test_oidc_tokens_are_accepted_and_refused_with_the_failed_check(make_embedded_service, issuer):
    service = make_embedded_service(REBASIN_OIDC_ISSUER=issuer.url, REBASIN_OIDC_AUDIENCE=ISSUER_AUDIENCE)

    def call(token: str) -> httpx.Response:
        return httpx.get(f"{service.url}/v1/usage", headers={"Authorization": f"Bearer {token}"}, timeout=30)

    for alg in ("RS256", "ES256"):
        ok = call(issuer.token(alg))
        assert ok.status_code == 200, ok.text
        assert ok.json()["tenant"] == "acme"
    assert call(issuer.token(tenant="globex")).json()["tenant"] == "globex"
    read_only = issuer.token(scope="rebasin:read")
    assert httpx.post(f"{service.url}/v1/jobs/job_x/cancel", headers={"Authorization": f"Bearer {read_only}"}).status_code == 403

    claims = issuer.claims()
    refused = {
        "expired": issuer.token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        "audience": issuer.token(aud="someone-else"),
        "issuer": issuer.token(iss="https://evil.example"),
        "kid": issuer.token(kid="rotated-away"),
        "algorithm": unsigned_token({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims),
        "signature": jwt.encode(claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                                headers={"kid": "rsa-1"}),
        "scope": issuer.token(scope="openid"),
        "tenant": issuer.token(tenant=None),
    }
    hs256_with_public_key = unsigned_token({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims, issuer.public_pem())
    for check, token in [*refused.items(), ("algorithm", hs256_with_public_key)]:
        response = call(token)
        assert response.status_code == 401, (check, response.text)
        problem = response.json()
        assert problem["type"].endswith("/invalid-token") and problem["check"] == check, (check, problem)
        assert token not in response.text and "BEGIN PUBLIC KEY" not in response.text
    # Keys are cached: unknown key ids do not make the server fetch the JWKS on every request.
    before = issuer.jwks_requests
    for _ in range(5):
        assert call(issuer.token(kid="another-unknown")).status_code == 401
    assert issuer.jwks_requests - before <= 1


# --- The audit log over the whole OpenAPI document ---------------------------------------------------------

AUDIT_KEYS = "acme:acme-key,globex:globex-key,ops:ops-key:admin"


def _fill(path: str) -> str:
    import re

    return re.sub(r"\{[^}]+\}", "x_missing", path)


def test_every_state_changing_operation_writes_one_audit_row(make_embedded_service):
    service = make_embedded_service(REBASIN_API_KEYS=AUDIT_KEYS, REBASIN_TENANT_REQUESTS_PER_S="0")
    acme = httpx.Client(base_url=service.url, headers={"Authorization": "Bearer acme-key"}, timeout=60)
    document = acme.get("/openapi.json").json()
    operations = [(path, method, op["operationId"]) for path, item in document["paths"].items()
                  for method, op in item.items() if method in ("post", "put", "patch", "delete")]
    assert len(operations) >= 10
    created = upload(acme, make_mlp(1).state_dict(), "audited")
    sent = {}
    for path, method, operation_id in operations:
        if operation_id in ("sign_in", "sign_out"):
            response = acme.request(method.upper(), path, json={"api_key": "acme-key"} if method == "post" else None)
        elif "multipart/form-data" in json.dumps(document["paths"][path][method].get("requestBody", {})):
            response = acme.request(method.upper(), path, files={"file": ("m.safetensors", save_safetensors(make_mlp(2).state_dict()))})
        else:
            response = acme.request(method.upper(), _fill(path), json={})
        sent[operation_id] = response.status_code

    ops = httpx.Client(base_url=service.url, headers={"Authorization": "Bearer ops-key"}, timeout=60)
    rows = []
    page = ops.get("/v1/audit", params={"page_size": 200}).json()
    rows += page["items"]
    assert page["next_page_token"] is None
    by_action = {}
    for row in rows:
        by_action.setdefault(row["action"], []).append(row)
    for path, method, operation_id in operations:
        expected = 2 if operation_id == "upload_checkpoint" else 1  # the fixture's upload above, and the one here
        found = by_action.get(operation_id, [])
        assert len(found) == expected, (operation_id, found)
        assert all(r["tenant"] == "acme" and r["method"] == method.upper() and r["client"] == "127.0.0.1" for r in found)
        assert found[0]["status_code"] == sent[operation_id]
    assert any(r["object_id"] == created["id"] for r in by_action["upload_checkpoint"])
    assert all(row["action"] in {op for _, _, op in operations} for row in rows)

    # Tenants read only their own; filters and paging work.
    own = acme.get("/v1/audit", params={"page_size": 200}).json()["items"]
    assert len(own) == len(rows) and all(r["tenant"] == "acme" for r in own)
    globex = httpx.get(f"{service.url}/v1/audit", headers={"Authorization": "Bearer globex-key"}).json()
    assert globex["items"] == []
    assert httpx.get(f"{service.url}/v1/audit", params={"tenant": "acme"}, headers={"Authorization": "Bearer globex-key"}).json()["items"] == []
    one = acme.get("/v1/audit", params={"action": "upload_checkpoint", "page_size": 1}).json()
    assert len(one["items"]) == 1 and one["next_page_token"]
    second = acme.get("/v1/audit", params={"action": "upload_checkpoint", "page_size": 1, "page_token": one["next_page_token"]}).json()
    assert second["items"][0]["id"] != one["items"][0]["id"]
    # Reading is not state-changing: GETs leave no row.
    assert len(ops.get("/v1/audit", params={"page_size": 200}).json()["items"]) == len(rows)
