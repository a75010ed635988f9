"""A layer decrypted once is reused from the store only by a pull that proves it holds the key.

Images are encrypted by skopeo (or by ``coco image copy`` for a key provider) and served by a real
docker-registry. After a pull with the right key, a pull with no key, a wrong key, or the key of
another image must fail with the very line a fresh store gives and leave no bundle; the right key
reuses the layer without fetching it (its blob is corrupted in the registry to show it). The same
through the pull service, for flattened and overlay bundles, after ``coco image prune``, and for
stores written before key proofs were recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coco.errors import CocoError, PullError
from coco.image import LayerStore
from coco.image.pull import PullOptions, pull_image
from coco.image.service import PullService, pull_via_service
from coco.oci.transport import Access
from tests.conftest import Registry
from tests.image._util import make_request
from tests.imagekit import write_image

from ._util import F, diff_id, tar
from .test_pull import _cli, leftovers, push, skopeo_copy, unique

KPIMPL = Path(__file__).parent.parent / "ocicrypt" / "kpimpl.py"


@dataclass
class Keys:
    priv: Path
    pub: Path
    cert: Path  # self-signed X.509 for ``priv`` (pkcs7)
    other: Path  # an unrelated key pair, the key of another image
    other_pub: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("storekeys")
    k = Keys(d / "k.pem", d / "k.pub", d / "k.crt", d / "o.pem", d / "o.pub")
    for priv, pub in ((k.priv, k.pub), (k.other, k.other_pub)):
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                 "-out", str(priv))  # fmt: skip
        _openssl("pkey", "-in", str(priv), "-pubout", "-out", str(pub))
    _openssl("req", "-x509", "-new", "-key", str(k.priv), "-subj", "/CN=coco-store-test",
             "-days", "30", "-out", str(k.cert))  # fmt: skip
    return k


def _push_enc(tmp: Path, reg: Registry, layers: list[bytes], key: str, **extra: object) -> str:
    """skopeo encrypts a layout of ``layers`` with ``--encryption-key key`` into the registry."""
    lay = tmp / f"layout-{uuid.uuid4().hex[:8]}"
    write_image(lay, layers, tag="t", **extra)  # type: ignore[arg-type]
    ref = reg.url(f"keys/{uuid.uuid4().hex[:12]}", "v1")
    skopeo_copy("--encryption-key", key, f"oci:{lay}:t", ref)
    return ref


def _blob(reg: Registry, ref: str) -> Path:
    """The registry's file of the (only) layer blob of ``ref``."""
    from .test_pull import _manifest

    return reg.blob_file(_manifest(reg, ref)["layers"][0]["digest"])


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class Cli:
    """``coco image pull -q --tls-verify=false`` through the real entry point."""

    def __init__(self, capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
        self.capsys, self.tmp = capsys, tmp

    def pull(self, store: Path, ref: str, bundle: str, *flags: str) -> tuple[int, str]:
        self.capsys.readouterr()
        args = ["image", "pull", "--tls-verify=false", "--store", str(store), *flags]
        code = _cli([*args, ref, str(self.tmp / bundle)])
        return code, self.capsys.readouterr().err

    def fresh(self, ref: str, *flags: str) -> str:
        """The error a fresh store gives for this pull (which must fail)."""
        code, err = self.pull(self.tmp / f"fresh-{uuid.uuid4().hex[:6]}", ref, "fresh-b", *flags)
        assert code == 1 and err.count("\n") == 1, err
        assert not (self.tmp / "fresh-b").exists()
        return err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    return Cli(capsys, tmp_path)


def _refused_as_fresh(cli: Cli, store: LayerStore, ref: str, bundle: str, *flags: str) -> str:
    held = store.layers()
    code, err = cli.pull(store.root, ref, bundle, *flags)
    assert code == 1
    assert err == cli.fresh(ref, *flags)
    assert not (cli.tmp / bundle).exists()
    assert leftovers(store) == (held, [])
    return err


# -- the CLI -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_stored_layer_needs_the_key(
    cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys, flatten: bool
) -> None:
    secret = unique()
    ref = _push_enc(cli.tmp, open_registry, [tar([F("secret", secret)])], f"jwe:{keys.pub}")
    mode = ["--flatten"] if flatten else []
    code, err = cli.pull(store.root, ref, "b1", *mode, "--decryption-key", str(keys.priv))
    assert code == 0 and "1 pulled, 0 reused" in err, err
    assert (cli.tmp / "b1/rootfs/secret").read_bytes() == secret

    err = _refused_as_fresh(cli, store, ref, "b2", *mode)
    assert "expected a --decryption-key" in err
    err = _refused_as_fresh(cli, store, ref, "b3", *mode, "--decryption-key", str(keys.other))
    assert "could unwrap the layer key" in err

    # the right key: reused, its blob not even fetched (it is corrupt in the registry now)
    _corrupt(_blob(open_registry, ref))
    code, err = cli.pull(store.root, ref, "b4", *mode, "--decryption-key", str(keys.priv))
    assert code == 0 and "0 pulled, 1 reused" in err, err
    assert (cli.tmp / "b4/rootfs/secret").read_bytes() == secret
    # a key that cannot even be read fails as on a fresh store
    _refused_as_fresh(cli, store, ref, "b5", *mode, "--decryption-key", str(cli.tmp / "gone.pem"))


def test_key_of_another_image(
    cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys
) -> None:
    """Images built to name a stored layer's diff_id, with a key that opens them (or none):
    the stored layer is not theirs to take; they fail as they would on a fresh store."""
    secret_tar = tar([F("secret", unique())])
    ref = _push_enc(cli.tmp, open_registry, [secret_tar], f"jwe:{keys.pub}")
    key = ["--decryption-key", str(keys.priv)]
    assert cli.pull(store.root, ref, "b1", "--flatten", *key)[0] == 0

    # a legitimate image of another owner: its key unwraps nothing of this one
    other = _push_enc(cli.tmp, open_registry, [tar([F("o", unique())])], f"jwe:{keys.other_pub}")
    assert (
        cli.pull(store.root, other, "ob", "--flatten", "--decryption-key", str(keys.other))[0] == 0
    )
    _refused_as_fresh(cli, store, ref, "b2", "--decryption-key", str(keys.other))

    # a forged image: its own layer and key, the config naming the secret layer's diff_id
    claim = {"rootfs": {"type": "layers", "diff_ids": [diff_id(secret_tar)]}}
    forged = _push_enc(
        cli.tmp, open_registry, [tar([F("x", unique())])], f"jwe:{keys.other_pub}",
        config_extra=claim,
    )  # fmt: skip
    err = _refused_as_fresh(cli, store, forged, "f1", "--decryption-key", str(keys.other))
    assert "diff_id mismatch" in err
    # the same claim without encryption: the layer was stored from an encrypted one
    plain, _ = push(cli.tmp, open_registry, [tar([F("y", unique())])], config_extra=claim)
    err = _refused_as_fresh(cli, store, plain, "f2")
    assert "diff_id mismatch" in err
    assert not (cli.tmp / "f2").exists()


def test_same_layer_encrypted_twice_is_proven_by_either_key(
    cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys
) -> None:
    """The same plaintext under two symmetric keys (skopeo makes a fresh one per copy): the
    second image's key is checked by decrypting once, then its pulls reuse the layer too."""
    layer = tar([F("shared", unique())])
    a = _push_enc(cli.tmp, open_registry, [layer], f"jwe:{keys.pub}")
    b = _push_enc(cli.tmp, open_registry, [layer], f"jwe:{keys.other_pub}")
    assert cli.pull(store.root, a, "a1", "--flatten", "--decryption-key", str(keys.priv))[0] == 0
    code, err = cli.pull(store.root, b, "b1", "--flatten", "--decryption-key", str(keys.other))
    assert code == 0 and "1 pulled, 0 reused" in err, err
    assert len(store.get(diff_id(layer)).keys) == 2
    assert leftovers(store) == ([diff_id(layer)], [])
    for ref, k, name in ((a, keys.priv, "a2"), (b, keys.other, "b2")):
        code, err = cli.pull(store.root, ref, name, "--flatten", "--decryption-key", str(k))
        assert code == 0 and "0 pulled, 1 reused" in err, err
    # neither key opens the other image
    _refused_as_fresh(cli, store, a, "a3", "--decryption-key", str(keys.other))


def test_pkcs7_key(cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys) -> None:
    secret = unique()
    ref = _push_enc(cli.tmp, open_registry, [tar([F("p7", secret)])], f"pkcs7:{keys.cert}")
    right = ["--decryption-key", str(keys.priv), "--decryption-key", str(keys.cert)]
    assert cli.pull(store.root, ref, "b1", "--flatten", *right)[0] == 0
    _refused_as_fresh(cli, store, ref, "b2", "--decryption-key", str(keys.cert))
    _refused_as_fresh(
        cli, store, ref, "b3", "--decryption-key", str(keys.other), "--decryption-key",
        str(keys.cert),
    )  # fmt: skip
    code, err = cli.pull(store.root, ref, "b4", "--flatten", *right)
    assert code == 0 and "0 pulled, 1 reused" in err, err
    assert (cli.tmp / "b4/rootfs/p7").read_bytes() == secret


def test_key_provider(
    cli: Cli,
    store: LayerStore,
    open_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = {"key-providers": {"cmdkp": {"cmd": {"path": sys.executable,
                                               "args": [str(KPIMPL), "cmdkp"]}}}}  # fmt: skip
    (tmp_path / "ocicrypt.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("OCICRYPT_KEYPROVIDER_CONFIG", str(tmp_path / "ocicrypt.json"))
    secret = unique()
    lay = tmp_path / "kp-layout"
    write_image(lay, [tar([F("kp", secret)])], tag="t")
    ref = open_registry.url(f"keys/{uuid.uuid4().hex[:12]}", "v1")
    copy = ["image", "copy", "-q", "--dest-tls-verify=false"]
    assert _cli([*copy, "--encryption-key", "provider:cmdkp:k1", f"oci:{lay}:t", ref]) == 0
    assert (
        cli.pull(store.root, ref, "b1", "--flatten", "--decryption-key", "provider:cmdkp:k1")[0]
        == 0
    )
    err = _refused_as_fresh(cli, store, ref, "b2", "--decryption-key", "provider:cmdkp:wrong")
    assert "keyprovider cmdkp" in err
    code, err = cli.pull(
        store.root, ref, "b3", "--flatten", "--decryption-key", "provider:cmdkp:k1"
    )
    assert code == 0 and "0 pulled, 1 reused" in err, err
    assert (tmp_path / "b3/rootfs/kp").read_bytes() == secret


def test_prune_then_pull(cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys) -> None:
    ref = _push_enc(cli.tmp, open_registry, [tar([F("s", unique())])], f"jwe:{keys.pub}")
    key = ["--decryption-key", str(keys.priv)]
    assert cli.pull(store.root, ref, "b1", "--flatten", *key)[0] == 0
    assert _cli(["image", "prune", "-q", "--store", str(store.root)]) == 0
    assert len(store.layers()) == 1  # b1 uses it
    _refused_as_fresh(cli, store, ref, "b2", "--flatten")
    shutil.rmtree(cli.tmp / "b1")
    assert _cli(["image", "prune", "-q", "--store", str(store.root)]) == 0
    assert store.layers() == []
    _refused_as_fresh(cli, store, ref, "b3", "--flatten", "--decryption-key", str(keys.other))
    code, err = cli.pull(store.root, ref, "b4", "--flatten", *key)
    assert code == 0 and "1 pulled, 0 reused" in err, err
    _refused_as_fresh(cli, store, ref, "b5", "--flatten")


# -- stores written before key proofs ----------------------------------------------------------
def _meta_path(store: LayerStore, diff_id: str) -> Path:
    """The file holding a stored layer's record."""
    return store.root / "layers" / diff_id.partition(":")[2] / "meta.json"


def _make_old(store: LayerStore) -> None:
    """Rewrite every record as the store wrote it before sizes and key proofs were kept."""
    for p in (store.root / "layers").glob("*/meta.json"):
        meta = json.loads(p.read_text())
        for k in ("file_bytes", "encrypted", "keys"):
            del meta[k]
        p.write_text(json.dumps(meta))


def test_old_records_are_not_proof(
    cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys
) -> None:
    secret = unique()
    ref = _push_enc(cli.tmp, open_registry, [tar([F("old", secret)])], f"jwe:{keys.pub}")
    key = ["--decryption-key", str(keys.priv)]
    assert cli.pull(store.root, ref, "b1", "--flatten", *key)[0] == 0
    _make_old(store)
    _refused_as_fresh(cli, store, ref, "b2", "--flatten")
    _refused_as_fresh(cli, store, ref, "b3", "--flatten", "--decryption-key", str(keys.other))
    # the right key decrypts once more, which completes the record; then it is reused
    code, err = cli.pull(store.root, ref, "b4", "--flatten", *key)
    assert code == 0 and "1 pulled, 0 reused" in err, err
    (d,) = store.layers()
    info = store.get(d)
    assert info.encrypted is True and len(info.keys) == 1 and info.file_bytes == len(secret)
    code, err = cli.pull(store.root, ref, "b5", "--flatten", *key)
    assert code == 0 and "0 pulled, 1 reused" in err, err
    _refused_as_fresh(cli, store, ref, "b6", "--flatten")


def test_old_plain_records_are_completed(
    cli: Cli, store: LayerStore, open_registry: Registry
) -> None:
    ref, _ = push(cli.tmp, open_registry, [tar([F("p", b"plain")])])
    assert cli.pull(store.root, ref, "b1", "--flatten")[0] == 0
    _make_old(store)
    code, err = cli.pull(store.root, ref, "b2", "--flatten")
    assert code == 0 and "1 pulled, 0 reused" in err, err
    (d,) = store.layers()
    assert store.get(d).encrypted is False and store.get(d).file_bytes == 5
    code, err = cli.pull(store.root, ref, "b3", "--flatten")
    assert code == 0 and "0 pulled, 1 reused" in err, err
    assert (cli.tmp / "b3/rootfs/p").read_bytes() == b"plain"


def test_records_from_before_whiteout_dirs_are_completed(
    cli: Cli, store: LayerStore, open_registry: Registry
) -> None:
    """A record without whiteout_dirs (the overlay bundle reads it) is incomplete: the layer is
    fetched again and the record gains it."""
    ref, _ = push(cli.tmp, open_registry, [tar([F("w/.wh.gone", b""), F("k", b"kept")])])
    assert cli.pull(store.root, ref, "b1", "--flatten")[0] == 0
    (d,) = store.layers()
    assert store.get(d).whiteout_dirs == frozenset({"w"})
    meta_path = _meta_path(store, d)
    meta = json.loads(meta_path.read_text())
    del meta["whiteout_dirs"]
    meta_path.write_text(json.dumps(meta))
    assert store.get(d).file_bytes is None  # incomplete: never reused as it is
    code, err = cli.pull(store.root, ref, "b2")
    assert code == 0 and "1 pulled, 0 reused" in err, err
    assert store.get(d).whiteout_dirs == frozenset({"w"}) and store.get(d).file_bytes == 4
    assert not (cli.tmp / "b2/rootfs/w").exists()  # a dir of only whiteouts shows nothing
    assert (cli.tmp / "b2/rootfs/k").read_bytes() == b"kept"


def test_store_secret(cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys) -> None:
    ref = _push_enc(cli.tmp, open_registry, [tar([F("s", unique())])], f"jwe:{keys.pub}")
    assert cli.pull(store.root, ref, "b1", "--flatten", "--decryption-key", str(keys.priv))[0] == 0
    st = os.stat(store.root / "secret")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 32
    (d,) = store.layers()
    meta = _meta_path(store, d).read_text()
    (proof,) = json.loads(meta)["keys"]
    assert len(proof) == 64 and proof not in meta.replace(proof, "", 1)
    # another store has its own secret: the same key gives another proof
    other = LayerStore(cli.tmp / "other")
    assert cli.pull(other.root, ref, "c1", "--flatten", "--decryption-key", str(keys.priv))[0] == 0
    assert other.get(d).keys and other.get(d).keys != store.get(d).keys


def test_damaged_secret(cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys) -> None:
    ref = _push_enc(cli.tmp, open_registry, [tar([F("s", unique())])], f"jwe:{keys.pub}")
    key = ["--flatten", "--decryption-key", str(keys.priv)]
    assert cli.pull(store.root, ref, "b1", *key)[0] == 0
    (store.root / "secret").write_bytes(b"short")
    code, err = cli.pull(store.root, ref, "b2", *key)
    assert code == 1 and err.count("\n") == 1
    assert "secret: expected 32 bytes, found 5" in err
    assert not (cli.tmp / "b2").exists()
    # removed: a new secret; the layer is decrypted once more to prove the key again
    (store.root / "secret").unlink()
    _refused_as_fresh(cli, store, ref, "b3", "--flatten")
    code, err = cli.pull(store.root, ref, "b4", *key)
    assert code == 0 and "1 pulled, 0 reused" in err, err
    code, err = cli.pull(store.root, ref, "b5", *key)
    assert code == 0 and "0 pulled, 1 reused" in err, err


# -- proofs remembered by key files (claims) ---------------------------------------------------
def _warm_pull_imports(store: Path, ref: str, bundle: Path, *flags: str) -> tuple[str, str]:
    """A pull in a new process with ``-X importtime``: (its stderr, the modules it imported)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "coco.cli.main", "image", "pull",
         "--tls-verify=false", "--store", str(store), *flags, ref, str(bundle)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    mods = "\n".join(ln for ln in out.stderr.splitlines() if ln.startswith("import time:"))
    return "\n".join(ln for ln in out.stderr.splitlines() if not ln.startswith("import")), mods


def test_claim_reuses_without_loading_a_key(
    cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys
) -> None:
    """The key files that decrypted a layer are remembered (by their bytes, keyed by the store's
    secret): the same files again reuse it without cryptography or the RSA operation; the same
    bytes elsewhere too; other bytes, or a wrong password, are checked the long way."""
    secret = unique()
    ref = _push_enc(cli.tmp, open_registry, [tar([F("c", secret)])], f"jwe:{keys.pub}")
    code, err = cli.pull(store.root, ref, "b1", "--decryption-key", str(keys.priv))
    assert code == 0 and "1 pulled, 0 reused" in err, err
    (d,) = store.layers()
    (claim,) = store.get(d).claims
    assert len(claim) == 64 and claim not in store.get(d).keys

    err, mods = _warm_pull_imports(
        store.root, ref, cli.tmp / "b2", "--decryption-key", str(keys.priv)
    )
    assert "0 pulled, 1 reused" in err, err
    assert "cryptography" not in mods and "coco.ocicrypt.config" not in mods
    assert (cli.tmp / "b2/rootfs/c").read_bytes() == secret

    moved = cli.tmp / "elsewhere.pem"  # the same bytes under another name
    shutil.copy(keys.priv, moved)
    err, mods = _warm_pull_imports(store.root, ref, cli.tmp / "b3", "--decryption-key", str(moved))
    assert "0 pulled, 1 reused" in err and "cryptography" not in mods, err

    # the other key: no claim matches; unwrapping fails as on a fresh store
    _refused_as_fresh(cli, store, ref, "b4", "--decryption-key", str(keys.other))
    # the right key file given with a password it does not take: another claim, the long way,
    # which refuses the password (the key is not encrypted) as a fresh store does
    _refused_as_fresh(cli, store, ref, "b5", "--decryption-key", f"{keys.priv}:pass=nope")
    assert store.get(d).claims == frozenset({claim})


def test_claims_cannot_be_forged_or_carried(
    cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys
) -> None:
    """A claim is an HMAC under the store's secret: one written into the record by hand, or
    carried from another store, proves nothing, and the pull unwraps (and fails without the
    key) as before."""
    ref = _push_enc(cli.tmp, open_registry, [tar([F("f", unique())])], f"jwe:{keys.pub}")
    key = ["--decryption-key", str(keys.priv)]
    assert cli.pull(store.root, ref, "b1", *key)[0] == 0
    (d,) = store.layers()
    meta_path = _meta_path(store, d)
    meta = json.loads(meta_path.read_text())

    # a second store's claims for the same key and layer are made with its own secret
    other = LayerStore(cli.tmp / "other")
    assert cli.pull(other.root, ref, "o1", "--flatten", *key)[0] == 0
    other_meta_path = _meta_path(other, d)
    other_meta = json.loads(other_meta_path.read_text())
    assert set(other_meta["claims"]).isdisjoint(meta["claims"])

    # carried over, and a made-up one: a pull with the wrong key, or none, is still refused
    meta["claims"] = sorted({*meta["claims"], *other_meta["claims"], "00" * 32})
    meta_path.write_text(json.dumps(meta))
    _refused_as_fresh(cli, store, ref, "b2", "--decryption-key", str(keys.other))
    _refused_as_fresh(cli, store, ref, "b3")

    # the right key still works, by its claim
    err, mods = _warm_pull_imports(store.root, ref, cli.tmp / "b4", *key)
    assert "0 pulled, 1 reused" in err and "cryptography" not in mods, err


def test_claim_is_recorded_on_first_proof(
    cli: Cli, store: LayerStore, open_registry: Registry, keys: Keys
) -> None:
    """A record without claims (a store from before them): the first reuse proves the key by
    unwrapping, records the claim, and the next reuse needs no key operation."""
    ref = _push_enc(cli.tmp, open_registry, [tar([F("r", unique())])], f"jwe:{keys.pub}")
    key = ["--decryption-key", str(keys.priv)]
    assert cli.pull(store.root, ref, "b1", *key)[0] == 0
    (d,) = store.layers()
    meta_path = _meta_path(store, d)
    meta = json.loads(meta_path.read_text())
    del meta["claims"]
    meta_path.write_text(json.dumps(meta))
    assert store.get(d).claims == frozenset()

    err, mods = _warm_pull_imports(store.root, ref, cli.tmp / "b2", *key)
    assert "0 pulled, 1 reused" in err, err
    assert "cryptography" in mods  # proven the long way
    assert len(store.get(d).claims) == 1
    err, mods = _warm_pull_imports(store.root, ref, cli.tmp / "b3", *key)
    assert "0 pulled, 1 reused" in err and "cryptography" not in mods, err


# -- the library and the pull service ----------------------------------------------------------
def test_library_pull(
    tmp_path: Path, store: LayerStore, open_registry: Registry, keys: Keys
) -> None:
    from coco.ocicrypt import decrypt_config

    ref = _push_enc(tmp_path, open_registry, [tar([F("lib", b"L")])], f"jwe:{keys.pub}")
    access = Access(tls_verify=False)

    def opts(key: Path | None) -> PullOptions:
        dec = decrypt_config([str(key)]) if key else None
        return PullOptions(access=access, decryption=dec, flatten=True)

    res = pull_image(ref, tmp_path / "b1", store, opts(keys.priv))
    assert [x.action for x in res.layers] == ["pulled"]
    for i, key in enumerate((None, keys.other)):
        with pytest.raises(CocoError) as warm:
            pull_image(ref, tmp_path / f"w{i}", store, opts(key))
        with pytest.raises(CocoError) as fresh:
            pull_image(ref, tmp_path / f"f{i}", tmp_path / f"fresh{i}", opts(key))
        assert str(warm.value) == str(fresh.value) and "\n" not in str(warm.value)
        assert type(warm.value) is type(fresh.value)
        assert not (tmp_path / f"w{i}").exists()
    res = pull_image(ref, tmp_path / "b2", store, opts(keys.priv))
    assert [x.action for x in res.layers] == ["reused"]


def test_claim_names_only_the_bytes_that_unwrapped(
    tmp_path: Path, store: LayerStore, open_registry: Registry, keys: Keys
) -> None:
    """A key file rewritten between the claim's digest and the key's loading (here: while the
    pull loads its keys) records no claim: the claim would name bytes that unwrapped nothing.
    Its new bytes (the same key, PEM with a trailing newline more) then earn their own claim."""
    from coco.ocicrypt import decrypt_config

    ref = _push_enc(tmp_path, open_registry, [tar([F("race", b"R")])], f"jwe:{keys.pub}")
    kf = tmp_path / "key.pem"
    kf.write_bytes(keys.priv.read_bytes())

    def load_and_change() -> object:
        kf.write_bytes(keys.priv.read_bytes() + b"\n")
        return decrypt_config([str(kf)])

    opts = PullOptions(
        access=Access(tls_verify=False), decryption=load_and_change, decryption_keys=(str(kf),)
    )
    res = pull_image(ref, tmp_path / "b1", store, opts)
    assert [x.action for x in res.layers] == ["pulled"]
    (d,) = store.layers()
    assert store.get(d).claims == frozenset() and len(store.get(d).keys) == 1

    steady = PullOptions(
        access=Access(tls_verify=False),
        decryption=lambda: decrypt_config([str(kf)]),
        decryption_keys=(str(kf),),
    )
    res = pull_image(ref, tmp_path / "b2", store, steady)  # proven by unwrapping, then claimed
    assert [x.action for x in res.layers] == ["reused"] and len(store.get(d).claims) == 1


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "run" / "image.sock")
    svc = PullService(path)
    th = threading.Thread(target=svc.serve_forever, daemon=True)
    th.start()
    try:
        yield path
    finally:
        svc.shutdown()
        th.join(10)


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_service_pull(
    service: str,
    tmp_path: Path,
    store: LayerStore,
    open_registry: Registry,
    keys: Keys,
    flatten: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = _push_enc(tmp_path, open_registry, [tar([F("svc", b"S")])], f"jwe:{keys.pub}")

    def req(bundle: str, st: Path, key: Path | None) -> dict:
        k = [str(key)] if key else []
        return make_request(ref, tmp_path / bundle, st, tls_verify=False, flatten=flatten,
                            decryption_keys=k)  # fmt: skip

    first = pull_via_service(service, req("b1", store.root, keys.priv))
    assert (first["pulled"], first["reused"]) == (1, 0)
    for i, key in enumerate((None, keys.other)):
        with pytest.raises(PullError) as warm:
            pull_via_service(service, req(f"w{i}", store.root, key))
        with pytest.raises(PullError) as fresh:
            pull_via_service(service, req(f"f{i}", tmp_path / f"fresh{i}", key))
        assert str(warm.value) == str(fresh.value) and "\n" not in str(warm.value)
        assert not (tmp_path / f"w{i}").exists()
        assert leftovers(store)[1] == []
    again = pull_via_service(service, req("b2", store.root, keys.priv))
    assert (again["pulled"], again["reused"]) == (0, 1)
    assert (tmp_path / "b2/rootfs/svc").read_bytes() == b"S"
    # `coco image pull --service`: the same line as an in-process pull on a fresh store
    cli = Cli(capsys, tmp_path)
    mode = ["--flatten"] if flatten else []
    code, err = cli.pull(store.root, ref, "c1", "--service", service, *mode)
    assert code == 1 and err == cli.fresh(ref, *mode)
    assert not (tmp_path / "c1").exists()
    code, err = cli.pull(store.root, ref, "c2", "--service", service, *mode,
                         "--decryption-key", str(keys.priv))  # fmt: skip
    assert code == 0 and "0 pulled, 1 reused" in err, err
