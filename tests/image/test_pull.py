"""``coco image pull`` end to end: images pushed by skopeo to a real docker-registry, pulled by us,
compared file by file with ``umoci unpack`` of the same image; ``runc run`` of the bundle; reuse of
the layer store; failures that must leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from coco.cli.main import main
from coco.errors import CocoError
from coco.image import LayerStore
from coco.image.pull import PullOptions, pull_image
from coco.oci.transport import Access
from tests.conftest import Registry
from tests.imagekit import BuiltImage, write_image

from ._util import D, F, L, T, snapshot, tar
from .test_umoci_compare import BASE, TOP, UPPER

ACCESS = Access(tls_verify=False)


def skopeo_copy(*args: str) -> None:
    exe = shutil.which("skopeo")
    if exe is None:
        pytest.skip("skopeo is not installed")
    cmd = [exe, "--insecure-policy", "copy", "-q", "--dest-tls-verify=false", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"


def push(
    tmp: Path,
    reg: Registry,
    layers: list[bytes],
    *,
    compression: str = "gzip",
    config_extra: dict[str, object] | None = None,
    encrypt_to: Path | None = None,
) -> tuple[str, BuiltImage]:
    """Write an OCI layout and let skopeo push it (encrypting it when asked); returns the ref."""
    lay = tmp / f"layout-{uuid.uuid4().hex[:8]}"
    img = write_image(lay, layers, tag="t", compression=compression, config_extra=config_extra)
    repo = f"pull/{uuid.uuid4().hex[:12]}"
    ref = reg.url(repo, "v1")
    if compression == "none" and encrypt_to is None:
        # skopeo gzips uncompressed layers on the way to a registry: push these as they are
        assert _cli(["image", "copy", "-q", "--dest-tls-verify=false", f"oci:{lay}:t", ref]) == 0
        return ref, img
    extra = ["--encryption-key", f"jwe:{encrypt_to}"] if encrypt_to else []
    skopeo_copy(*extra, f"oci:{lay}:t", ref)
    return ref, img


def umoci_rootfs(tmp: Path, img: BuiltImage) -> dict[str, object]:
    out = tmp / f"umoci-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{img.path}:{img.tag}", str(out)],
        check=True,
        capture_output=True,
    )
    return snapshot(out / "rootfs")


def leftovers(store: LayerStore) -> tuple[list[str], list[str]]:
    return store.layers(), sorted(p.name for p in (store.root / "tmp").iterdir())


def unique() -> bytes:
    return uuid.uuid4().hex.encode()


# -- against umoci ------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_pull_matches_umoci(
    tmp_path: Path,
    store: LayerStore,
    umoci: str,
    open_registry: Registry,
    compression: str,
    flatten: bool,
) -> None:
    layers = [tar(BASE), tar(UPPER), tar(TOP)]
    ref, img = push(tmp_path, open_registry, layers, compression=compression)
    # umoci 0.4.7 reads gzip layers only: unpack the gzip twin (same diff_ids, same tree)
    twin = write_image(tmp_path / "twin", layers, tag="t", compression="gzip")
    assert twin.diff_ids == img.diff_ids
    expected = umoci_rootfs(tmp_path, twin)
    res = pull_image(
        ref, tmp_path / "bundle", store, PullOptions(access=ACCESS, flatten=flatten, jobs=2)
    )
    assert res.bundle.mode == ("flatten" if flatten else "overlay")
    assert res.manifest_digest == img.manifest_digest
    assert res.config_digest == img.config_digest
    assert [x.action for x in res.layers] == ["pulled"] * 3
    assert sorted(store.layers()) == sorted(img.diff_ids)
    ours = snapshot(res.bundle.rootfs, hide_whiteouts=True)
    assert ours == expected
    assert "data/gone" not in ours and "opaque/old1" not in ours
    assert (res.bundle.rootfs / "bin/tool").read_bytes() == b"third copy wins"
    cfg = json.loads((res.bundle.path / "config.json").read_text())
    assert cfg["process"]["args"] == ["/bin/sh"]
    assert cfg["root"]["path"] == "rootfs"


def test_encrypted_pull_matches_umoci(
    tmp_path: Path, store: LayerStore, umoci: str, open_registry: Registry, rsa_keys: RsaKeys
) -> None:
    layers = [tar(BASE), tar(UPPER), tar([F("big", hashlib.sha256(b"s").digest() * 90_000)])]
    ref, img = push(tmp_path, open_registry, layers, encrypt_to=rsa_keys.pub)
    expected = umoci_rootfs(tmp_path, img)  # the plain layout skopeo encrypted from
    from coco.ocicrypt import decrypt_config

    opts = PullOptions(access=ACCESS, decryption=decrypt_config([str(rsa_keys.priv)]))
    res = pull_image(ref, tmp_path / "bundle", store, opts)
    assert [x.action for x in res.layers] == ["pulled"] * 3
    assert snapshot(res.bundle.rootfs, hide_whiteouts=True) == expected
    assert (res.bundle.rootfs / "big").stat().st_size == 32 * 90_000


# -- runc ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "overlay"])
def test_runc_runs_pulled_bundle(
    tmp_path: Path, store: LayerStore, open_registry: Registry, flatten: bool
) -> None:
    runc = shutil.which("runc")
    busybox = shutil.which("busybox") or "/bin/busybox"
    if runc is None or not Path(busybox).exists():
        pytest.skip("runc and busybox-static are needed")
    token = uuid.uuid4().hex
    layers = [
        tar([D("bin/"), F("bin/busybox", Path(busybox).read_bytes(), mode=0o755)]),
        tar([D("etc/"), F("etc/greeting", f"hello {token}\n".encode())]),
    ]
    ref, _ = push(
        tmp_path,
        open_registry,
        layers,
        config_extra={
            "config": {
                "Entrypoint": ["/bin/busybox"],
                "Cmd": ["cat", "/etc/greeting"],
                "Env": ["GREETING=x"],
                "WorkingDir": "/etc",
            }
        },
    )
    res = pull_image(ref, tmp_path / "b", store, PullOptions(access=ACCESS, flatten=flatten))
    cfg = json.loads((res.bundle.path / "config.json").read_text())
    assert cfg["process"]["args"] == ["/bin/busybox", "cat", "/etc/greeting"]
    assert cfg["process"]["cwd"] == "/etc"
    assert "GREETING=x" in cfg["process"]["env"]
    cid = f"coco-pull-{uuid.uuid4().hex[:8]}"
    state = tmp_path / "runc-state"
    try:
        proc = subprocess.run(
            [runc, "--root", str(state), "run", "--bundle", str(res.bundle.path), cid],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run([runc, "--root", str(state), "delete", "-f", cid], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"hello {token}\n"


# -- the store ----------------------------------------------------------------------------------
def test_second_pull_fetches_no_layer_blob(
    tmp_path: Path, store: LayerStore, open_registry: Registry
) -> None:
    layers = [tar([F("a", unique())]), tar([F("b", unique() * 1000)])]
    ref, img = push(tmp_path, open_registry, layers, compression="zstd")
    first = pull_image(ref, tmp_path / "one", store, PullOptions(access=ACCESS))
    assert [x.action for x in first.layers] == ["pulled", "pulled"]
    # Take the layer blobs away from the registry: a second pull that asked for them would fail.
    moved = []
    for d in img.layer_digests:
        f = open_registry.blob_file(d)
        f.rename(f.with_name("data.away"))
        moved.append(f)
    try:
        second = pull_image(ref, tmp_path / "two", store, PullOptions(access=ACCESS))
        assert [x.action for x in second.layers] == ["reused", "reused"]
        assert (second.bundle.rootfs / "a").read_bytes() == (first.bundle.rootfs / "a").read_bytes()
        # and a store without the layers does need the blobs: the trick above is real
        other = LayerStore(tmp_path / "other-store")
        with pytest.raises(CocoError):
            pull_image(ref, tmp_path / "three", other, PullOptions(access=ACCESS))
        assert not (tmp_path / "three").exists()
        assert leftovers(other) == ([], [])
    finally:
        for f in moved:
            f.with_name("data.away").rename(f)
    assert sorted(store.bundles()) == sorted(
        [str((tmp_path / "one").absolute()), str((tmp_path / "two").absolute())]
    )


def test_second_pull_takes_its_config_from_the_store(
    tmp_path: Path, store: LayerStore, open_registry: Registry
) -> None:
    """The store keeps configs by digest: a second pull of a stored image asks the registry for
    its manifest only. A kept config that no longer hashes to its digest is fetched again, and
    prune empties the cache."""
    ref, img = push(tmp_path, open_registry, [tar([F("c", unique())])])
    pull_image(ref, tmp_path / "one", store, PullOptions(access=ACCESS))
    kept = store.root / "configs" / img.config_digest.partition(":")[2]
    assert kept.read_bytes() == img.config
    blob = open_registry.blob_file(img.config_digest)
    blob.rename(blob.with_name("data.away"))
    try:
        second = pull_image(ref, tmp_path / "two", store, PullOptions(access=ACCESS))
        assert second.config_digest == img.config_digest
        assert (second.bundle.path / "config.json").read_bytes() == (
            tmp_path / "one" / "config.json"
        ).read_bytes()
        kept.write_bytes(img.config.replace(b"linux", b"LINUX"))  # damaged: not trusted
        with pytest.raises(CocoError):  # ... and the registry has no copy to fetch
            pull_image(ref, tmp_path / "three", store, PullOptions(access=ACCESS))
        assert not (tmp_path / "three").exists()
    finally:
        blob.with_name("data.away").rename(blob)
    third = pull_image(ref, tmp_path / "four", store, PullOptions(access=ACCESS))
    assert third.config_digest == img.config_digest
    assert kept.read_bytes() == img.config  # fetched again, checked, kept again
    assert _cli(["image", "prune", "--store", str(store.root), "-q"]) == 0
    assert not (store.root / "configs").exists()


def test_shared_layers_and_prune(
    tmp_path: Path, store: LayerStore, open_registry: Registry
) -> None:
    base = tar([F("base", unique())])
    ref1, img1 = push(tmp_path, open_registry, [base, tar([F("one", unique())])])
    ref2, img2 = push(tmp_path, open_registry, [base, tar([F("two", unique())])])
    b1 = pull_image(ref1, tmp_path / "b1", store, PullOptions(access=ACCESS, flatten=True))
    b2 = pull_image(ref2, tmp_path / "b2", store, PullOptions(access=ACCESS, flatten=True))
    assert [x.action for x in b2.layers] == ["reused", "pulled"]
    assert len(store.layers()) == 3  # the base layer once
    from coco.image import remove_bundle

    remove_bundle(store, b1.bundle.path)
    code = _cli(["image", "prune", "--store", str(store.root), "-q"])
    assert code == 0
    assert sorted(store.layers()) == sorted(img2.diff_ids)
    assert (b2.bundle.rootfs / "base").exists()
    assert img1.diff_ids[1] not in store.layers()


def test_concurrent_pulls_share_the_store(
    tmp_path: Path, store: LayerStore, open_registry: Registry
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    layers = [tar([F("a", unique() * 50_000)]), tar([F("b", unique() * 50_000)])]
    ref, img = push(tmp_path, open_registry, layers)
    opts = PullOptions(access=ACCESS, flatten=True)
    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(pull_image, ref, tmp_path / f"b{i}", store, opts) for i in range(3)]
        results = [f.result() for f in futs]
    assert sorted(store.layers()) == sorted(img.diff_ids)
    assert leftovers(store)[1] == []
    for r in results:
        assert (r.bundle.rootfs / "a").stat().st_size == 32 * 50_000
    assert len(store.bundles()) == 3


def test_duplicate_layers_in_one_image(
    tmp_path: Path, store: LayerStore, open_registry: Registry
) -> None:
    a = tar([F("f", unique())])
    b = tar([T(".wh.f"), F("g", b"g")])
    ref, _ = push(tmp_path, open_registry, [a, b, a])
    res = pull_image(ref, tmp_path / "b", store, PullOptions(access=ACCESS, flatten=True))
    assert [x.action for x in res.layers] == ["pulled", "pulled", "reused"]
    assert (res.bundle.rootfs / "f").exists() and (res.bundle.rootfs / "g").exists()


def test_index_picks_platform(tmp_path: Path, store: LayerStore, open_registry: Registry) -> None:
    from tests.imagekit import write_index

    idx = write_index(
        tmp_path / "idx",
        [
            ("linux", "amd64", [tar([F("arch", b"amd64")])]),
            ("linux", "arm64", [tar([F("arch", b"arm64")])]),
        ],
        tag="t",
    )
    ref = open_registry.url(f"pull/{uuid.uuid4().hex[:12]}", "multi")
    skopeo_copy("--all", f"oci:{idx.path}:t", ref)
    for arch in ("arm64", "amd64"):
        res = pull_image(
            ref, tmp_path / arch, store, PullOptions(access=ACCESS, arch=arch, flatten=True)
        )
        assert (res.bundle.rootfs / "arch").read_bytes() == arch.encode()
        want = next(im for im in idx.images if im.platform.architecture == arch)
        assert res.manifest_digest == want.manifest_digest
    with pytest.raises(CocoError, match="no image for platform linux/s390x"):
        pull_image(ref, tmp_path / "s390x", store, PullOptions(access=ACCESS, arch="s390x"))
    assert not (tmp_path / "s390x").exists()


# -- failures leave nothing ---------------------------------------------------------------------
def _fails(
    tmp_path: Path, store: LayerStore, ref: str, match: str, opts: PullOptions | None = None
) -> None:
    with pytest.raises(CocoError, match=match) as ei:
        pull_image(ref, tmp_path / "bundle", store, opts or PullOptions(access=ACCESS, jobs=3))
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "bundle").exists()
    assert leftovers(store) == ([], [])
    assert store.bundles() == {}


def test_corrupt_blob(tmp_path: Path, store: LayerStore, open_registry: Registry) -> None:
    layers = [tar([F("ok", unique())]), tar([F("x", unique() * 5000)])]
    ref, img = push(tmp_path, open_registry, layers)
    f = open_registry.blob_file(img.layer_digests[1])
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    _fails(tmp_path, store, ref, r"layer 2/2 .*digest")


def test_diff_id_mismatch(tmp_path: Path, store: LayerStore, open_registry: Registry) -> None:
    layer = tar([F("f", unique())])
    wrong = "sha256:" + "ab" * 32
    ref, _ = push(
        tmp_path,
        open_registry,
        [layer],
        config_extra={"rootfs": {"type": "layers", "diff_ids": [wrong]}},
    )
    _fails(tmp_path, store, ref, r"diff_id mismatch: expected sha256:abab")


def test_diff_id_count_mismatch(tmp_path: Path, store: LayerStore, open_registry: Registry) -> None:
    layer = tar([F("f", unique())])
    ref, _ = push(
        tmp_path,
        open_registry,
        [layer],
        config_extra={"rootfs": {"type": "layers", "diff_ids": []}},
    )
    _fails(tmp_path, store, ref, r"as many rootfs.diff_ids .* \(1\), found 0")


def test_wrong_key_and_no_key(
    tmp_path: Path, store: LayerStore, open_registry: Registry, rsa_keys: RsaKeys
) -> None:
    from coco.ocicrypt import decrypt_config

    ref, _ = push(tmp_path, open_registry, [tar([F("s", unique())])], encrypt_to=rsa_keys.pub)
    _fails(tmp_path, store, ref, r"encrypted .*expected a --decryption-key")
    wrong = PullOptions(access=ACCESS, decryption=decrypt_config([str(rsa_keys.other)]))
    _fails(tmp_path, store, ref, r"could unwrap", wrong)


def test_tampered_ciphertext(
    tmp_path: Path, store: LayerStore, open_registry: Registry, rsa_keys: RsaKeys
) -> None:
    """A flipped ciphertext byte is caught (by the blob digest, before the HMAC would be)."""
    from coco.ocicrypt import decrypt_config

    layers = [tar([F("s", unique() * 20000)])]
    ref, _ = push(tmp_path, open_registry, layers, encrypt_to=rsa_keys.pub)
    man = _manifest(open_registry, ref)
    f = open_registry.blob_file(man["layers"][0]["digest"])
    data = bytearray(f.read_bytes())
    data[-10] ^= 1
    f.write_bytes(bytes(data))
    opts = PullOptions(access=ACCESS, decryption=decrypt_config([str(rsa_keys.priv)]))
    _fails(tmp_path, store, ref, r"digest", opts)


def test_hmac_mismatch(
    tmp_path: Path, store: LayerStore, open_registry: Registry, rsa_keys: RsaKeys
) -> None:
    """Ciphertext changed under a consistent manifest (new digest, old HMAC): the HMAC catches it
    and nothing of the layer is kept."""
    from coco.oci.layout import OciLayout
    from coco.oci.models import Descriptor
    from coco.ocicrypt import decrypt_config
    from tests.imagekit import sha256

    plain = write_image(tmp_path / "plain", [tar([F("s", unique() * 20000)])], tag="t")
    enc = tmp_path / "enc"
    skopeo_copy("--encryption-key", f"jwe:{rsa_keys.pub}", f"oci:{plain.path}:t", f"oci:{enc}:t")
    index = json.loads((enc / "index.json").read_text())
    man = json.loads((enc / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    layer = man["layers"][0]
    blob = bytearray((enc / "blobs/sha256" / layer["digest"][7:]).read_bytes())
    blob[len(blob) // 2] ^= 1
    layer["digest"] = sha256(bytes(blob))
    raw_man = json.dumps(man).encode()
    with OciLayout(enc).transaction() as tx:
        tx.put_bytes(bytes(blob))
        tx.put_bytes(raw_man)
        tx.set_tag("bad", Descriptor(man["mediaType"], sha256(raw_man), len(raw_man)))
    ref = open_registry.url(f"pull/{uuid.uuid4().hex[:12]}", "bad")
    skopeo_copy(f"oci:{enc}:bad", ref)
    opts = PullOptions(access=ACCESS, decryption=decrypt_config([str(rsa_keys.priv)]))
    _fails(tmp_path, store, ref, r"layer 1/1 .*HMAC mismatch", opts)


def test_policy_refusal_writes_nothing(tmp_path: Path, open_registry: Registry) -> None:
    ref, _ = push(tmp_path, open_registry, [tar([F("f", unique())])])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "reject"}], "transports": {}}))
    store_dir = tmp_path / "store"
    from coco.image.pull import load_policy

    opts = PullOptions(access=ACCESS, policy=load_policy(policy))
    with pytest.raises(CocoError, match="refused"):
        pull_image(ref, tmp_path / "bundle", store_dir, opts)
    assert not store_dir.exists() and not (tmp_path / "bundle").exists()


def test_trailing_garbage_after_gzip(
    tmp_path: Path, store: LayerStore, open_registry: Registry
) -> None:
    """Bytes after the compressed stream are refused (they are covered by no diff_id)."""
    import gzip

    layer = tar([F("f", unique())])
    blob = gzip.compress(layer, mtime=0) + b"\x00junk-after-the-stream"
    ref, _ = _push_raw(tmp_path, open_registry, [blob], [layer])
    _fails(tmp_path, store, ref, r"layer 1/1 .*(trailing|gzip|Gzip)")


def test_bundle_dir_exists(tmp_path: Path, store: LayerStore, open_registry: Registry) -> None:
    ref, _ = push(tmp_path, open_registry, [tar([F("f", unique())])])
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "mine").write_text("keep")
    with pytest.raises(CocoError, match="expected a new directory"):
        pull_image(ref, tmp_path / "bundle", store, PullOptions(access=ACCESS))
    assert (tmp_path / "bundle" / "mine").read_text() == "keep"
    assert leftovers(store) == ([], [])


# -- hostile layers through the whole pipeline ---------------------------------------------------
def test_hostile_layer_is_contained(
    tmp_path: Path, store: LayerStore, open_registry: Registry
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layers = [
        tar([D("etc/"), L("etc/escape", str(outside)), L("up", "../../../../..")]),
        tar(
            [
                F("etc/escape/pwned", b"x"),
                F("../../../../outside-dotdot", b"x"),
                F("up/pwned2", b"x"),
            ]
        ),
    ]
    ref, _ = push(tmp_path, open_registry, layers)
    try:
        res = pull_image(ref, tmp_path / "b", store, PullOptions(access=ACCESS, flatten=True))
    except CocoError as e:  # refused: one line, nothing left
        assert "\n" not in str(e)
        assert not (tmp_path / "b").exists()
        assert leftovers(store)[1] == []
    else:  # contained: the escapes landed inside the rootfs
        assert (res.bundle.rootfs / "outside-dotdot").exists()
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "outside-dotdot").exists()
    assert not Path("/outside-dotdot").exists()


# -- the CLI ------------------------------------------------------------------------------------
def _cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_cli_pull_and_errors(
    tmp_path: Path,
    store: LayerStore,
    open_registry: Registry,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref, img = push(tmp_path, open_registry, [tar([F("hello", b"hi\n")])])
    capsys.readouterr()
    args = ["image", "pull", "--tls-verify=false", "--store", str(store.root)]
    assert _cli([*args, ref, str(tmp_path / "b")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == img.manifest_digest
    assert "1 pulled, 0 reused" in err
    assert (tmp_path / "b/rootfs/hello").read_text() == "hi\n"
    # a missing tag: one line on stderr, exit 1, no bundle
    assert _cli([*args, ref.replace(":v1", ":nope"), str(tmp_path / "c")]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "nope" in err
    assert not (tmp_path / "c").exists()
    # usage errors exit 2
    assert _cli([*args, "--jobs", "0", ref, str(tmp_path / "d")]) == 2


def test_cli_encrypted_pull_and_reuse(
    tmp_path: Path,
    store: LayerStore,
    open_registry: Registry,
    rsa_keys: RsaKeys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref, _ = push(tmp_path, open_registry, [tar([F("secret", b"s3")])], encrypt_to=rsa_keys.pub)
    args = ["image", "pull", "--tls-verify=false", "--store", str(store.root)]
    assert _cli([*args, ref, str(tmp_path / "none")]) == 1
    assert "expected a --decryption-key" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    key = ["--decryption-key", str(rsa_keys.priv)]
    assert _cli([*args, *key, ref, str(tmp_path / "b")]) == 0
    assert "1 pulled, 0 reused" in capsys.readouterr().err
    assert (tmp_path / "b/rootfs/secret").read_bytes() == b"s3"
    # warm: the key is still needed (to prove it opens the stored layer), the data is not fetched
    assert _cli([*args, *key, ref, str(tmp_path / "c")]) == 0
    assert "0 pulled, 1 reused" in capsys.readouterr().err
    assert (tmp_path / "c/rootfs/secret").read_bytes() == b"s3"


# -- helpers needing more than imagekit ----------------------------------------------------------
class RsaKeys:
    def __init__(self, d: Path) -> None:
        self.priv, self.pub, self.other = d / "k.pem", d / "k.pub", d / "other.pem"


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> RsaKeys:
    k = RsaKeys(tmp_path_factory.mktemp("pullkeys"))
    for priv in (k.priv, k.other):
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", str(priv)],
            check=True,
            capture_output=True,
        )  # fmt: skip
    subprocess.run(
        ["openssl", "pkey", "-in", str(k.priv), "-pubout", "-out", str(k.pub)],
        check=True,
        capture_output=True,
    )
    return k


def _manifest(reg: Registry, ref: str) -> dict:
    import urllib.request

    repo, tag = ref.removeprefix(f"docker://{reg.host}/").rsplit(":", 1)
    req = urllib.request.Request(
        f"http://{reg.host}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def _push_raw(tmp: Path, reg: Registry, blobs: list[bytes], tars: list[bytes]) -> tuple[str, Path]:
    """Push an image whose layer blobs are given as they are (for malformed compression)."""
    from coco.oci import mediatypes as mt
    from coco.oci.layout import OciLayout
    from coco.oci.models import Descriptor, go_json
    from tests.imagekit import sha256

    cfg = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in tars]},
        }
    ).encode()
    man = go_json(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": Descriptor(mt.OCI_CONFIG, sha256(cfg), len(cfg)).to_json(),
            "layers": [Descriptor(mt.OCI_LAYER_GZIP, sha256(b), len(b)).to_json() for b in blobs],
        }
    )
    lay = tmp / f"raw-{uuid.uuid4().hex[:8]}"
    layout = OciLayout.init(lay)
    with layout.transaction() as tx:
        for b in [cfg, *blobs, man]:
            tx.put_bytes(b)
        tx.set_tag("t", Descriptor(mt.OCI_MANIFEST, sha256(man), len(man)))
    ref = reg.url(f"pull/{uuid.uuid4().hex[:12]}", "v1")
    skopeo_copy(f"oci:{lay}:t", ref)
    return ref, lay
