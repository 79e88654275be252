"""Who a connection is and what it may do: JWT verification and per-room permissions.

``TokenVerifier`` checks a JWT with PyJWT against exactly one configured algorithm, so ``alg=none`` and
algorithm confusion (an HS256 token signed with the RS256 public key as its secret) are refused by
construction. ``exp``, ``nbf``, ``aud`` and ``iss`` are honoured; the caller passes the time, so tests need no
clock.

An ``Identity`` carries the user id (``sub``), optional public presence metadata (the ``meta`` claim) and the
``rooms`` / ``publish`` claims: lists of room names or glob patterns (``team-*``) limiting which rooms the user
may join and publish to. A claim that is absent allows everything; an empty list allows nothing.

Nothing here logs or returns the token itself: error messages describe what is wrong, never the token.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import jwt

from .errors import RoomServerError

ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
MAX_META_BYTES = 1024

_KEY_NEEDED = {"HS": "a shared secret, not a PEM key or certificate", "RS": "an RSA public key in PEM format",
               "PS": "an RSA public key in PEM format", "ES256": "an EC public key on curve P-256 in PEM format",
               "ES384": "an EC public key on curve P-384 in PEM format"}
"""What each algorithm (or family) verifies with, for the message that refuses any other key."""


class Action(enum.Enum):
    JOIN = "join"
    PUBLISH = "publish"


class AuthError(RoomServerError):
    """A token that cannot be accepted; ``message`` says why without repeating the token."""

    code = "unauthorized"


@dataclass(frozen=True)
class Identity:
    """An authenticated (or anonymous) user behind one or more connections."""

    user: str
    rooms: tuple[str, ...] | None = None
    publish: tuple[str, ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    expires_at: float | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def may(self, action: Action, room: str) -> bool:
        patterns = self.rooms if action is Action.JOIN else self.publish
        if patterns is None:
            return True
        return any(fnmatchcase(room, pattern) for pattern in patterns)


def anonymous(client_id: str) -> Identity:
    """Without authentication every connection is its own anonymous user, allowed everywhere."""
    return Identity(user=client_id)


def _patterns(claims: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise AuthError(f'the "{name}" claim must be a list of room names or patterns')


class TokenVerifier:
    """Verifies JWTs signed with one algorithm and key; ``leeway`` seconds of clock skew are tolerated."""

    def __init__(
        self,
        key: str | bytes,
        algorithm: str = "HS256",
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported JWT algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        if algorithm.startswith("HS") and len(key) < 32:
            raise ValueError("an HMAC JWT secret must be at least 32 bytes long")
        self.key = _prepared_key(key, algorithm)
        self.algorithm = algorithm
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    def verify(self, token: str, now: float) -> Identity:
        """The identity a valid token carries; ``AuthError`` for anything else."""
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise AuthError("missing or oversized token")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["sub"], "verify_iat": False, "verify_exp": False, "verify_nbf": False},
            )
        except jwt.InvalidAudienceError as exc:
            raise AuthError("the token is for another audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthError("the token is from another issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"the token lacks the {exc.claim!r} claim") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise AuthError("the token is not signed with the accepted algorithm") from exc
        except jwt.PyJWTError as exc:
            # Any other refusal of PyJWT's (InvalidKeyError is not an InvalidTokenError) is a refused token too: an
            # exception escaping here would be an HTTP 500 in the handshake, or a close 1011 that clients retry.
            raise AuthError("the token is invalid") from exc
        return self._identity(claims, now)

    def _identity(self, claims: Mapping[str, Any], now: float) -> Identity:
        # exp and nbf are checked here, against the time we are told, not PyJWT's own clock.
        expires_at = _number(claims, "exp")
        not_before = _number(claims, "nbf")
        if expires_at is not None and now >= expires_at + self.leeway:
            raise AuthError("the token has expired")
        if not_before is not None and now + self.leeway < not_before:
            raise AuthError("the token is not valid yet")
        user = claims.get("sub")
        if not isinstance(user, str) or not user or len(user) > 256:
            raise AuthError('the "sub" claim must be a non-empty string')
        meta = claims.get("meta", {})
        if not isinstance(meta, Mapping):
            raise AuthError('the "meta" claim must be an object')
        return Identity(
            user=user,
            rooms=_patterns(claims, "rooms"),
            publish=_patterns(claims, "publish"),
            meta=dict(meta),
            expires_at=expires_at,
            claims=dict(claims),
        )


MIN_RSA_BITS = 2048


def _prepared_key(key: str | bytes, algorithm: str) -> Any:
    """``key`` as PyJWT verifies ``algorithm`` with it, parsed once; ``ValueError`` if it cannot be used.

    PyJWT parses the key only when a token comes: a key that does not fit the algorithm (an RSA key for ES256,
    a certificate, a PEM that does not parse) was accepted at start, and then every token failed."""
    needed = _KEY_NEEDED.get(algorithm, _KEY_NEEDED.get(algorithm[:2], "a key that fits it"))
    try:
        implementation = jwt.get_algorithm_by_name(algorithm)
    except NotImplementedError as exc:  # RS*, PS*, ES* without the cryptography package
        raise ValueError(f"{algorithm} is not available: {exc}") from None
    try:
        prepared = implementation.prepare_key(key)
    except Exception:  # PyJWT's InvalidKeyError, or the ValueError or TypeError of the PEM parser underneath it
        raise ValueError(f"{algorithm} needs {needed}") from None
    if callable(getattr(prepared, "public_key", None)):
        # A private key: PyJWT cannot verify RS* with one, and the server has no business holding it.
        raise ValueError(f"{algorithm} needs {needed}, not a private key")
    bits = getattr(prepared, "key_size", None)
    if algorithm.startswith(("RS", "PS")) and isinstance(bits, int) and bits < MIN_RSA_BITS:
        # Forgeable within reach of a determined attacker (NIST retired them in 2013); PyJWT only warns, at
        # every token.
        raise ValueError(f"{algorithm} needs an RSA key of at least {MIN_RSA_BITS} bits, not {bits}")
    return prepared


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError(f'the "{name}" claim must be a number')
    return float(value)
