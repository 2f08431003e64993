"""Bearer JWTs from an OIDC provider (REBASIN_OIDC_ISSUER): signature by the issuer's published keys (JWKS,
found through its discovery document and cached), issuer, audience and lifetime checked; tenant and scope
mapped from claims. Only asymmetric algorithms are accepted: ``none`` and HMAC (which a forger would key with
the public key) never are."""

import threading
import time

import httpx
import jwt

from api.identity import SCOPES, Principal
from api.problems import Problem
from core.config import Settings

ACCEPTED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# An unknown key id may mean the issuer rotated its keys: fetch them again, but not more often than this.
UNKNOWN_KID_REFETCH_S = 30
LEEWAY_S = 30
FETCH_TIMEOUT_S = 5


def refused(check: str, detail: str) -> Problem:
    return Problem(401, "Invalid token", f"The bearer token was refused: {detail}.", kind="invalid-token",
                   headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{check}"'}, check=check)


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


def _claim(claims: dict, path: str):
    value = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


class OidcVerifier:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.issuer = settings.oidc_issuer.rstrip("/")
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    def _fetch_keys(self) -> None:
        with httpx.Client(timeout=FETCH_TIMEOUT_S) as client:
            discovery = client.get(f"{self.issuer}/.well-known/openid-configuration").raise_for_status().json()
            jwks = client.get(discovery["jwks_uri"]).raise_for_status().json()
        keys = {}
        for jwk in jwks.get("keys", []):
            if jwk.get("use", "sig") == "sig" and "kid" in jwk:
                try:
                    keys[jwk["kid"]] = jwt.PyJWK(jwk)
                except jwt.PyJWTError:
                    continue  # a key type this server cannot use
        self._keys, self._fetched_at = keys, time.monotonic()

    def _key(self, kid: str) -> jwt.PyJWK | None:
        with self._lock:
            age = time.monotonic() - self._fetched_at
            if age > self.settings.oidc_jwks_cache_s or (kid not in self._keys and age > UNKNOWN_KID_REFETCH_S):
                try:
                    self._fetch_keys()
                except (httpx.HTTPError, ValueError, KeyError):
                    if not self._keys:
                        raise Problem(503, "Identity provider unreachable", "The OIDC issuer's signing keys could not be "
                                      "fetched; try again shortly.", kind="identity-provider-unavailable") from None
            return self._keys.get(kid)

    def verify(self, token: str) -> Principal:
        """The caller a token stands for; a 401 problem naming the check that failed. Blocking (may fetch keys)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise refused("malformed", "not a well-formed JWT") from None
        algorithm = header.get("alg")
        if algorithm not in ACCEPTED_ALGORITHMS:
            raise refused("algorithm", f"algorithm {str(algorithm)[:20]!r} is not accepted (only asymmetric signatures are)")
        key = self._key(str(header.get("kid")))
        if key is None:
            raise refused("kid", "its key id is not one of the issuer's signing keys")
        if key.algorithm_name != algorithm and not (key.algorithm_name is None):
            raise refused("algorithm", "its algorithm does not match the issuer's key")
        try:
            claims = jwt.decode(token, key.key, algorithms=[algorithm], audience=self.settings.oidc_audience,
                                issuer=self.settings.oidc_issuer, leeway=LEEWAY_S, options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise refused("expired", "it has expired") from None
        except jwt.InvalidAudienceError:
            raise refused("audience", "it is not meant for this service (aud)") from None
        except jwt.InvalidIssuerError:
            raise refused("issuer", "it was not issued by the configured issuer (iss)") from None
        except jwt.ImmatureSignatureError:
            raise refused("not-yet-valid", "it is not valid yet (nbf/iat)") from None
        except jwt.MissingRequiredClaimError as error:
            raise refused("missing-claim", f"it lacks the {error.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise refused("signature", "its signature does not verify") from None
        except jwt.PyJWTError:
            raise refused("malformed", "it could not be decoded") from None
        tenant = _claim(claims, self.settings.oidc_tenant_claim)
        if not isinstance(tenant, str) or not 0 < len(tenant) <= 100:
            raise refused("tenant", f"it names no tenant in the {self.settings.oidc_tenant_claim!r} claim")
        granted = _claim(claims, self.settings.oidc_scope_claim) or []
        granted = granted.split() if isinstance(granted, str) else granted if isinstance(granted, list) else []
        scopes = [s for s in SCOPES if f"rebasin:{s}" in granted]
        if not scopes:
            raise refused("scope", f"it grants none of rebasin:read, rebasin:write, rebasin:admin in {self.settings.oidc_scope_claim!r}")
        return Principal(tenant=tenant, scope=scopes[-1], id=f"oidc:{str(claims.get('sub', ''))[:200]}")
