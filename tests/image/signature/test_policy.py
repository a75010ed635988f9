"""policy.json parsing (strict, field named), scope matching and identity rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coco.errors import PolicyError
from coco.image.signature import PolicyContext, Signatures
from coco.image.signature.policy import (
    ExactReference,
    ExactRepository,
    InsecureAcceptAnything,
    MatchExact,
    MatchRepoDigestOrExact,
    MatchRepository,
    Policy,
    Reject,
    RemapIdentity,
    SignedBy,
    SigstoreSigned,
    docker_scope_candidates,
    parse_identity,
)
from coco.oci.reference import parse_docker

DIGEST = "sha256:" + "ab" * 32


def parse(doc: object) -> Policy:
    return Policy.from_bytes(json.dumps(doc).encode(), where="p.json", base=Path("/keys"))


def refused(doc: object) -> str:
    with pytest.raises(PolicyError) as e:
        parse(doc)
    return str(e.value)


def test_minimal_and_full_policy() -> None:
    p = parse(
        {
            "default": [{"type": "reject"}],
            "transports": {
                "docker": {
                    "reg.example.com/app": [
                        {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "app.gpg"}
                    ],
                    "reg.example.com/app:v1": [
                        {
                            "type": "sigstoreSigned",
                            "keyData": "-----BEGIN PUBLIC KEY-----",
                            "signedIdentity": {"type": "matchRepository"},
                        }
                    ],
                    "*.example.com": [{"type": "insecureAcceptAnything"}],
                    "": [{"type": "reject"}],
                },
                "oci": {"/srv/images": [{"type": "insecureAcceptAnything"}]},
            },
        }
    )
    assert p.default == (Reject(),)
    sb = p.transports["docker"]["reg.example.com/app"][0]
    assert isinstance(sb, SignedBy)
    assert sb.keys.paths == ("/keys/app.gpg",)  # relative to the policy's directory
    assert isinstance(sb.signed_identity, MatchRepoDigestOrExact)
    ss = p.transports["docker"]["reg.example.com/app:v1"][0]
    assert isinstance(ss, SigstoreSigned)
    assert ss.keys.data == (b"-----BEGIN PUBLIC KEY-----",)  # PEM text, not base64
    assert isinstance(ss.signed_identity, MatchRepository)
    assert p.transports["oci"]["/srv/images"] == (InsecureAcceptAnything(),)


def test_signedby_keydata_is_base64_and_identities_parse() -> None:
    p = parse(
        {
            "default": [
                {
                    "type": "signedBy",
                    "keyType": "GPGKeys",
                    "keyData": "aGVsbG8=",
                    "signedIdentity": {
                        "type": "exactReference",
                        "dockerReference": "reg.example.com/a:1",
                    },
                },
                {
                    "type": "signedBy",
                    "keyType": "GPGKeys",
                    "keyPaths": ["/a", "/b"],
                    "signedIdentity": {
                        "type": "remapIdentity",
                        "prefix": "mirror.local/x",
                        "signedPrefix": "reg.example.com/y",
                    },
                },
                {
                    "type": "signedBy",
                    "keyType": "GPGKeys",
                    "keyPath": "/a",
                    "signedIdentity": {
                        "type": "exactRepository",
                        "dockerRepository": "reg.example.com/a",
                    },
                },
                {
                    "type": "signedBy",
                    "keyType": "GPGKeys",
                    "keyPath": "/a",
                    "signedIdentity": {"type": "matchExact"},
                },
            ]
        }
    )
    a, b, c, d = p.default
    assert a.keys.data == (b"hello",)
    assert isinstance(a.signed_identity, ExactReference)
    assert b.keys.paths == ("/a", "/b")
    assert b.signed_identity == RemapIdentity("mirror.local/x", "reg.example.com/y")
    assert isinstance(c.signed_identity, ExactRepository)
    assert isinstance(d.signed_identity, MatchExact)


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"transports": {}}, "missing field 'default'"),
        ({"default": [{"type": "reject"}], "extra": 1}, "unknown field 'extra'"),
        ({"default": []}, "expected at least one requirement"),
        ({"default": [{"type": "reject", "x": 1}]}, "default[0]: unknown field 'x'"),
        ({"default": [{"type": "acceptIfLucky"}]}, "found 'acceptIfLucky'"),
        ({"default": [{"type": "signedBy", "keyType": "X509", "keyPath": "/k"}]}, "keyType"),
        ({"default": [{"type": "signedBy", "keyType": "GPGKeys"}]}, "found none"),
        (
            {
                "default": [
                    {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/a", "keyData": "eA=="}
                ]
            },
            "found keyPath, keyData",
        ),
        ({"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyData": "!!"}]}, "base64"),
        (
            {
                "default": [
                    {"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/a", "keyUsage": 1}
                ]
            },
            "unknown field 'keyUsage'",
        ),
        (
            {"default": [{"type": "sigstoreSigned", "fulcio": {}, "rekorPublicKeyPath": "/r"}]},
            "fulcio: keyless",
        ),
        (
            {
                "default": [
                    {
                        "type": "sigstoreSigned",
                        "keyPath": "/k",
                        "signedIdentity": {"type": "matchSomething"},
                    }
                ]
            },
            "signedIdentity.type",
        ),
        (
            {
                "default": [
                    {
                        "type": "sigstoreSigned",
                        "keyPath": "/k",
                        "signedIdentity": {"type": "matchExact", "dockerReference": "a/b:1"},
                    }
                ]
            },
            "unknown field 'dockerReference'",
        ),
        (
            {
                "default": [
                    {
                        "type": "sigstoreSigned",
                        "keyPath": "/k",
                        "signedIdentity": {"type": "exactReference", "dockerReference": "r.io/a"},
                    }
                ]
            },
            "expected a reference with a tag or digest",
        ),
        ({"default": [{"type": "reject"}], "transports": {"ftp": {}}}, "unknown transport 'ftp'"),
        (
            {
                "default": [{"type": "reject"}],
                "transports": {"docker": {"*foo": [{"type": "reject"}]}},
            },
            "invalid wildcard",
        ),
        (
            {
                "default": [{"type": "reject"}],
                "transports": {"docker": {"UPPER/x": [{"type": "reject"}]}},
            },
            "invalid",
        ),
        (
            {
                "default": [{"type": "reject"}],
                "transports": {"oci": {"rel/path": [{"type": "reject"}]}},
            },
            "absolute path",
        ),
    ],
)
def test_bad_policies_are_refused_with_the_field_named(doc: object, needle: str) -> None:
    assert needle in refused(doc)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"p\.json: expected JSON"):
        Policy.from_bytes(b"{", where="p.json")
    with pytest.raises(PolicyError, match="cannot read policy"):
        Policy.from_file(tmp_path / "nope.json")


def test_scope_candidates_most_specific_first() -> None:
    ref = parse_docker("a.b.example.com:5000/ns/sub/app:v1")
    assert docker_scope_candidates(ref) == [
        "a.b.example.com:5000/ns/sub/app:v1",
        "a.b.example.com:5000/ns/sub/app",
        "a.b.example.com:5000/ns/sub",
        "a.b.example.com:5000/ns",
        "a.b.example.com:5000",
        "*.b.example.com",
        "*.example.com",
        "*.com",
    ]


def _policy_ctx(scopes: dict) -> PolicyContext:
    return PolicyContext(parse({"default": [{"type": "reject"}], "transports": {"docker": scopes}}))


def _no_sigs() -> Signatures:
    return Signatures()


@pytest.mark.parametrize(
    ("image", "expected_scope"),
    [
        ("docker://reg.example.com/team/app:v1", "reg.example.com/team/app:v1"),
        ("docker://reg.example.com/team/app:v2", "reg.example.com/team/app"),
        ("docker://reg.example.com/team/other", "reg.example.com/team"),
        ("docker://reg.example.com/solo/x", "reg.example.com"),
        ("docker://mirror.example.com/x/y", "*.example.com"),
        ("docker://docker.io/library/busybox", "docker.io/library/busybox"),
        ("docker://busybox", "docker.io/library/busybox"),  # short names normalized
        ("docker://quay.io/x/y", "default"),
    ],
)
def test_most_specific_scope_wins(image: str, expected_scope: str) -> None:
    names = [
        "reg.example.com/team/app:v1",
        "reg.example.com/team/app",
        "reg.example.com/team",
        "reg.example.com",
        "*.example.com",
        "docker.io/library/busybox",
    ]
    # every scope accepts, so the verdict's scope says which one was chosen
    ctx = _policy_ctx({n: [{"type": "insecureAcceptAnything"}] for n in names})
    v = ctx.evaluate(image, DIGEST, _no_sigs)
    if expected_scope == "default":
        assert not v.accepted and v.scope == "default"
        assert "rejects this image" in v.reason
    else:
        assert v.accepted, v.reason
        assert v.scope == f"transports.docker[{expected_scope!r}]"


def test_reject_accept_and_transport_default() -> None:
    ctx = _policy_ctx(
        {
            "": [{"type": "insecureAcceptAnything"}],
            "bad.example.com": [{"type": "reject"}],
        }
    )
    calls: list[int] = []

    def fetch() -> Signatures:
        calls.append(1)
        return Signatures()

    ok = ctx.evaluate("docker://good.example.org/a:1", DIGEST, fetch)
    assert ok.accepted and ok.scope == "transports.docker['']"
    no = ctx.evaluate("docker://bad.example.com/a:1", DIGEST, fetch)
    assert not no.accepted
    assert "transports.docker['bad.example.com'][0] (reject)" in no.reason
    assert calls == []  # neither needed signatures


def test_all_requirements_must_hold() -> None:
    ctx = _policy_ctx({"r.io/a": [{"type": "insecureAcceptAnything"}, {"type": "reject"}]})
    v = ctx.evaluate("docker://r.io/a:1", DIGEST, _no_sigs)
    assert not v.accepted and "[1] (reject)" in v.reason


def test_missing_key_file_is_a_refusal_naming_it(tmp_path: Path) -> None:
    ctx = PolicyContext(
        parse(
            {
                "default": [
                    {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(tmp_path / "k")}
                ]
            }
        )
    )
    v = ctx.evaluate("docker://r.io/a:1", DIGEST, lambda: Signatures(simple=[b"x"]))
    assert not v.accepted and "cannot read key file" in v.reason and str(tmp_path) in v.reason


R = parse_docker


@pytest.mark.parametrize(
    ("rule", "image", "signed", "ok"),
    [
        (MatchExact(), "r.io/a:1", "r.io/a:1", True),
        (MatchExact(), "r.io/a:1", "r.io/a:2", False),
        (MatchExact(), f"r.io/a@{DIGEST}", f"r.io/a@{DIGEST}", False),  # digests never match
        (MatchRepoDigestOrExact(), f"r.io/a@{DIGEST}", "r.io/a:anything", True),
        (MatchRepoDigestOrExact(), "r.io/a:1", "r.io/a:2", False),
        (MatchRepoDigestOrExact(), "r.io/a:1", "r.io/a:1", True),
        (MatchRepository(), "r.io/a:1", "r.io/a:2", True),
        (MatchRepository(), "r.io/a:1", "r.io/b:1", False),
        (ExactReference(R("r.io/x:7")), "r.io/a:1", "r.io/x:7", True),
        (ExactReference(R("r.io/x:7")), "r.io/x:7", "r.io/x:8", False),
        (ExactRepository(R("r.io/x")), "r.io/a:1", "r.io/x:9", True),
        (ExactRepository(R("r.io/x")), "r.io/a:1", "r.io/y:9", False),
        (RemapIdentity("mirror.io/m", "r.io/up"), "mirror.io/m/app:1", "r.io/up/app:1", True),
        (RemapIdentity("mirror.io/m", "r.io/up"), "mirror.io/m/app:1", "mirror.io/m/app:1", False),
        (RemapIdentity("mirror.io/m", "r.io/up"), "mirror.io/mx/app:1", "mirror.io/mx/app:1", True),
    ],
)
def test_identity_rules(rule, image: str, signed: str, ok: bool) -> None:
    assert rule.matches(R(image), parse_identity(signed, "t")) is ok


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "default",
                    "transports",
                    "docker",
                    "type",
                    "keyType",
                    "keyPath",
                    "keyData",
                    "signedIdentity",
                    "reject",
                    "GPGKeys",
                    "dockerReference",
                    "prefix",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_parser_raises_only_policy_errors(doc: object) -> None:
    try:
        parse(doc)
    except PolicyError as e:
        assert str(e).startswith("p.json")
