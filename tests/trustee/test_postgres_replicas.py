"""Several ``coco kbs serve`` replicas on one PostgreSQL: auth on one, attest on another, fetch
from a third; resources, policies and reference values written anywhere are seen everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coco.protocol.client import KbsClient
from coco.tee import get_attester
from coco.trustee.admin_client import AdminClient
from coco.trustee.storage import open_store
from tests.trustee.conftest import ALLOW_ALL, PG_AVAILABLE
from tests.trustee.test_kbs_e2e import RawGuest

pytestmark = pytest.mark.skipif(not PG_AVAILABLE, reason="PostgreSQL 15 binaries not installed")


@pytest.fixture(scope="module")
def pg() -> Iterator:
    from tests.trustee.pg import PgCluster

    cluster = PgCluster().start()
    yield cluster
    cluster.stop()


def test_store_contract_on_postgres(pg) -> None:
    s = open_store(pg.url)
    assert s.put("t", "k", b"1") and s.get("t", "k") == b"1"
    assert not s.put("t", "k", b"2", overwrite=False) and s.get("t", "k") == b"1"
    assert s.put("t", "e", b"x", expires=1.0) and s.get("t", "e") is None
    assert s.put("t", "e", b"y", overwrite=False)  # an expired entry does not block
    assert s.keys("t") == ["e", "k"] and s.items("t") == {"e": b"y", "k": b"1"}
    assert s.delete("t", "k") and not s.delete("t", "k")
    s.close()


def test_three_replicas_share_everything(pg, start_kbs, tmp_path: Path) -> None:
    replicas = [start_kbs(storage=pg.url) for _ in range(3)]
    a, b, c = replicas
    with AdminClient(a.url) as admin:
        admin.set_resource("shared/key/one", b"from-replica-a")
        admin.set_resource_policy(ALLOW_ALL)
    with AdminClient(b.url) as admin:
        admin.register_reference_values({"svn": ["1"]})
    with AdminClient(c.url) as admin:
        assert admin.get_reference_value("svn") == ["1"]
    # One guest, three replicas: auth on a, attest on b, fetch from c (the cookie travels).
    g = RawGuest(a.url)
    nonce = g.auth().json()["nonce"]
    g.url = b.url
    r = g.attest(nonce)
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    for rep in (c, a):
        got = g.http.get(rep.url + "/kbs/v0/resource/shared/key/one")
        assert got.status_code == 200, got.text
        assert g.decrypt(got.content) == b"from-replica-a"
    # The same token as Bearer on any replica: they share the token-signing key.
    r = httpx.get(
        b.url + "/kbs/v0/resource/shared/key/one", headers={"authorization": f"Bearer {token}"}
    )
    assert r.status_code == 200
    # A nonce claimed on one replica cannot be replayed on another.
    g2 = RawGuest(a.url)
    n2 = g2.auth().json()["nonce"]
    g2.url = c.url
    assert g2.attest(n2).status_code == 200
    g2.url = b.url
    assert g2.attest(n2).status_code == 401
    # A restart of every replica loses nothing.
    for rep in replicas:
        rep.stop()
    a.start()
    with KbsClient(a.url, get_attester("sample")) as client:
        assert client.get_resource("shared/key/one") == b"from-replica-a"
