"""Unit tests of the pure auth, presence, filter and codec pieces (fake time, no sockets)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from roomserver.core.auth import Action, AuthError, Identity, TokenVerifier
from roomserver.core.codecs import JSON_PROTOCOL, MSGPACK_PROTOCOL, CodecRegistry
from roomserver.core.errors import ProtocolViolation
from roomserver.core.filters import (
    Pipeline,
    Rejected,
    SubscriptionFilter,
    allowed_types,
    blocked_words,
    max_text_length,
)
from roomserver.core.presence import Presence

SECRET = "s" * 40
NOW = 1_800_000_000.0


def token(claims: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256", **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers or None)


def test_valid_token_gives_identity_with_claims() -> None:
    verifier = TokenVerifier(SECRET, audience="chat", issuer="auth.example")
    identity = verifier.verify(token({"sub": "alice", "aud": "chat", "iss": "auth.example", "exp": NOW + 60,
                                      "rooms": ["team-*", "lobby"], "publish": ["lobby"], "meta": {"name": "Al"}}),
                               now=NOW)
    assert identity.user == "alice" and identity.expires_at == NOW + 60 and identity.meta == {"name": "Al"}
    assert identity.may(Action.JOIN, "team-blue") and identity.may(Action.JOIN, "lobby")
    assert not identity.may(Action.JOIN, "admin")
    assert identity.may(Action.PUBLISH, "lobby") and not identity.may(Action.PUBLISH, "team-blue")


def rsa_keys() -> tuple[Any, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


@pytest.mark.parametrize(
    "case",
    ["no_sub", "bad_signature", "alg_none", "hs_with_public_key", "wrong_aud", "wrong_iss", "expired", "nbf_future",
     "garbage", "empty", "rooms_not_list"],
)
def test_negative_token_suite(case: str) -> None:
    _, public = rsa_keys()
    good = {"sub": "u", "aud": "chat", "iss": "me", "exp": NOW + 60}
    rs_verifier = TokenVerifier(public, "RS256", audience="chat", issuer="me")
    hs_verifier = TokenVerifier(SECRET, audience="chat", issuer="me")
    verifier, value = {
        "no_sub": (hs_verifier, token({k: v for k, v in good.items() if k != "sub"})),
        "bad_signature": (hs_verifier, token(good, "x" * 40)),
        "alg_none": (hs_verifier, jwt.encode(good, None, algorithm="none")),
        # algorithm confusion: an HS256 token whose "secret" is the RS256 public key
        "hs_with_public_key": (rs_verifier, _hs_signed_with(public, good)),
        "wrong_aud": (hs_verifier, token({**good, "aud": "other"})),
        "wrong_iss": (hs_verifier, token({**good, "iss": "them"})),
        "expired": (hs_verifier, token({**good, "exp": NOW - 1})),
        "nbf_future": (hs_verifier, token({**good, "nbf": NOW + 30})),
        "garbage": (hs_verifier, "not.a.token"),
        "empty": (hs_verifier, ""),
        "rooms_not_list": (hs_verifier, token({**good, "rooms": 5})),
    }[case]
    with pytest.raises(AuthError) as info:
        verifier.verify(value, now=NOW)
    assert value not in info.value.message or not value


def _hs_signed_with(secret: bytes, claims: dict[str, Any]) -> str:
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


def test_rs256_and_es256_tokens_verify_with_public_keys() -> None:
    private, public = rsa_keys()
    assert TokenVerifier(public, "RS256").verify(token({"sub": "r"}, private, "RS256"), now=NOW).user == "r"
    ec_private = ec.generate_private_key(ec.SECP256R1())
    ec_public = ec_private.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    assert TokenVerifier(ec_public, "ES256").verify(token({"sub": "e"}, ec_private, "ES256"), now=NOW).user == "e"


def test_weak_or_unknown_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenVerifier("short")
    with pytest.raises(ValueError):
        TokenVerifier(SECRET, "none")


def _pem(key: Any) -> bytes:
    if hasattr(key, "private_bytes"):
        return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _certificate(private: Any) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.example")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(private, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("case", ["rsa_for_es256", "ec_for_rs256", "p384_for_es256", "certificate_for_rs256",
                                  "certificate_for_es256", "garbage_for_rs256", "garbage_for_es256",
                                  "rsa_private_for_rs256", "ec_private_for_es256", "pem_as_hmac_secret"])
def test_a_key_that_does_not_fit_the_algorithm_is_refused_at_construction(case: str) -> None:
    """PyJWT parses the key only when a token comes: such a key was accepted, and then every token raised
    InvalidKeyError (HTTP 500 in the handshake, close 1011 on an auth message, which clients retry forever)."""
    rsa_private, _ = rsa_keys()
    ec_private = ec.generate_private_key(ec.SECP256R1())
    key, algorithm = {
        "rsa_for_es256": (_pem(rsa_private.public_key()), "ES256"),
        "ec_for_rs256": (_pem(ec_private.public_key()), "RS256"),
        "p384_for_es256": (_pem(ec.generate_private_key(ec.SECP384R1()).public_key()), "ES256"),
        "certificate_for_rs256": (_certificate(rsa_private), "RS256"),
        "certificate_for_es256": (_certificate(ec_private), "ES256"),
        "garbage_for_rs256": (b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n", "RS256"),
        "garbage_for_es256": (b"not a key at all", "ES256"),
        "rsa_private_for_rs256": (_pem(rsa_private), "RS256"),
        "ec_private_for_es256": (_pem(ec_private), "ES256"),
        "pem_as_hmac_secret": (_pem(rsa_private.public_key()), "HS256"),
    }[case]
    with pytest.raises(ValueError, match=f"^{algorithm} needs "):
        TokenVerifier(key, algorithm)


def test_an_rsa_key_shorter_than_2048_bits_is_refused_at_construction() -> None:
    """PyJWT accepted it with a warning at every token."""
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(ValueError, match="at least 2048 bits, not 1024"):
        TokenVerifier(_pem(short), "RS256")
    _, public = rsa_keys()
    assert TokenVerifier(public, "RS256").algorithm == "RS256"


def test_any_refusal_of_pyjwt_is_a_refused_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only InvalidTokenError: whatever PyJWT raises (InvalidKeyError is a PyJWTError, not an
    InvalidTokenError) must come out as AuthError, never as an exception the server reports as 500 or 1011."""
    verifier = TokenVerifier(SECRET)

    def refuses(*args: Any, **kwargs: Any) -> None:
        raise jwt.InvalidKeyError("the key does not fit")

    monkeypatch.setattr(jwt, "decode", refuses)
    with pytest.raises(AuthError, match="the token is invalid"):
        verifier.verify(token({"sub": "u"}), now=NOW)


def test_identity_without_claims_allows_everything_and_empty_lists_nothing() -> None:
    assert Identity("u").may(Action.PUBLISH, "anything")
    assert not Identity("u", rooms=()).may(Action.JOIN, "lobby")


def test_presence_counts_users_not_connections() -> None:
    presence = Presence()
    assert presence.join("r", "alice", "tab1", {"name": "Alice"}).event == "join"  # type: ignore[union-attr]
    assert presence.join("r", "alice", "tab2") is None
    assert presence.join("r", "bob", "b1") is not None
    assert presence.members("r") == [
        {"user": "alice", "connections": 2, "meta": {"name": "Alice"}},
        {"user": "bob", "connections": 1, "meta": {}},
    ]
    assert presence.leave("r", "alice", "tab1") is None, "one of two tabs leaving is silent"
    event = presence.leave("r", "alice", "tab2")
    assert event is not None and event.as_json() == {"type": "presence", "room": "r", "event": "leave", "user": "alice"}
    assert presence.leave("r", "alice", "tab2") is None, "a leave fires once"
    presence.leave("r", "bob", "b1")
    assert presence.room_count() == 0


def test_presence_subscribers() -> None:
    presence = Presence()
    presence.subscribe("r", "c1")
    presence.join("r", "u", "c1")
    assert presence.subscribers("r") == {"c1"}
    presence.leave("r", "u", "c1")
    assert presence.subscribers("r") == frozenset()


def test_filter_pipeline_rejects_and_rewrites() -> None:
    def shout(client: Any, room: str, message: dict[str, Any]) -> dict[str, Any]:
        return {**message, "text": message["text"].upper()}

    pipeline = Pipeline([max_text_length(10), allowed_types({"chat"}), blocked_words(["spam", "scam"]), shout])
    assert pipeline.apply(None, "r", {"type": "chat", "text": "hello"})["text"] == "HELLO"
    for message in ({"type": "chat", "text": "x" * 11}, {"type": "vote", "text": "a"},
                    {"type": "chat", "text": "buy SPAM"}):
        with pytest.raises(Rejected):
            pipeline.apply(None, "r", message)
    assert pipeline.apply(None, "r", {"type": "chat", "text": "spammy"})["text"] == "SPAMMY", "whole words only"


def test_blocked_words_may_begin_or_end_with_any_character() -> None:
    check = blocked_words(["@everyone", "c++", "spam"])
    for text in ("hey @everyone look", "@Everyone!", "I love c++", "(c++)", "spam."):
        with pytest.raises(Rejected):
            check(None, "r", {"type": "chat", "text": text})
    for text in ("mail me@everyone.example", "c++x", "spammer", "an @everyones"):
        assert check(None, "r", {"type": "chat", "text": text})["text"] == text, "whole words only"


def test_subscription_filter_parsing() -> None:
    assert SubscriptionFilter.parse(None) is None
    wanted = SubscriptionFilter.parse({"types": ["chat"]})
    assert wanted is not None and wanted.wants("chat") and not wanted.wants("presence")
    for bad in ({"types": []}, {"types": "chat"}, {"kinds": ["chat"]}, [1], {"types": [1]}):
        with pytest.raises(ValueError):
            SubscriptionFilter.parse(bad)


def test_codecs_round_trip_and_negotiate() -> None:
    registry = CodecRegistry()
    message = {"type": "chat", "room": "r", "text": "héllo", "seq": 3}
    for name in (JSON_PROTOCOL, MSGPACK_PROTOCOL):
        codec = registry.get(name)
        assert codec.decode(codec.encode(message)) == message
    assert registry.get(None) is registry.get(JSON_PROTOCOL)
    assert registry.negotiate(["x.v1", MSGPACK_PROTOCOL, JSON_PROTOCOL]) == MSGPACK_PROTOCOL
    assert registry.negotiate(["x.v1"]) is None
    for name, garbage in ((JSON_PROTOCOL, b"{nope"), (MSGPACK_PROTOCOL, b"\xc1"), (MSGPACK_PROTOCOL, b"\x92\x01")):
        with pytest.raises(ProtocolViolation):
            registry.get(name).decode(garbage)


def test_verifier_uses_the_time_it_is_told() -> None:
    verifier = TokenVerifier(SECRET)
    value = token({"sub": "u", "exp": NOW + 10})
    assert verifier.verify(value, now=NOW + 9).user == "u"
    with pytest.raises(AuthError):
        verifier.verify(value, now=NOW + 10)
    assert time.time() < NOW, "the test's fake now is in the future, so the real clock is not being used"
