"""From the store to the VM: signed references, single-use tokens, the runtime config, the
bundle, and the metadata routes a container VM uses (real HTTP on loopback)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from hatchery.containers.bundle import bundle_chunks, bundle_size
from hatchery.containers.grants import Grants, Verdict
from hatchery.containers.oci import Archive, ImageConfig, ImageRefused, check_image
from hatchery.containers.runtime import runtime_config
from hatchery.containers.service import ContainerService
from hatchery.containers.signed import ReferenceError, parse, sign_archive
from hatchery.containers.store import ContainerNotFound, ContainerStore
from hatchery.images.signing import BadSignature, KeyDirectory, UnknownKey, generate_key
from hatchery.metadata.server import CONTAINER_TOKEN_HEADER, VmMetadata, make_app
from hatchery_lab.oci_images import bad_images, web_image

BUSYBOX = b"\x7fELF fake busybox"


def test_a_token_is_good_once_for_its_own_vm_and_in_time() -> None:
    grants = Grants(ttl=60)
    token = grants.issue("vm-a", boot=1.0, now=100.0)
    assert token is not None
    assert grants.issue("vm-a", boot=1.0, now=101.0) is None  # one per boot
    assert grants.redeem(token, "vm-b", now=102.0) is Verdict.OTHER_VM
    assert grants.redeem(token, "vm-a", now=102.0) is Verdict.OK
    assert grants.redeem(token, "vm-a", now=103.0) is Verdict.USED
    late = grants.issue("vm-c", boot=1.0, now=100.0)
    assert late is not None
    assert grants.redeem(late, "vm-c", now=161.0) is Verdict.EXPIRED
    assert grants.redeem("made-up", "vm-a", now=100.0) is Verdict.UNKNOWN
    again = grants.issue("vm-a", boot=2.0, now=200.0)  # a new boot: a new token
    assert again is not None and again != token


def test_the_runtime_config_drops_what_would_reach_the_metadata_service() -> None:
    config = runtime_config(ImageConfig(entrypoint=("/start",), env=("A=1", "PATH=/bin")),
                            "web1", {"A": "2", "B": "x"})  # fmt: skip
    caps = config["process"]["capabilities"]["bounding"]
    assert "CAP_NET_RAW" not in caps and "CAP_NET_ADMIN" not in caps
    assert config["process"]["env"] == ["A=2", "PATH=/bin", "B=x"]
    assert {"type": "network"} not in config["linux"]["namespaces"]
    assert config["process"]["noNewPrivileges"] is True
    with pytest.raises(ImageRefused, match="no command"):
        runtime_config(ImageConfig(), "web1")
    with pytest.raises(ImageRefused, match="not a valid variable"):
        runtime_config(ImageConfig(cmd=("x",)), "web1", {"A-B": "1"})
    with pytest.raises(ImageRefused, match="is a name"):
        runtime_config(ImageConfig(cmd=("x",), user="nobody"), "web1")


def test_the_bundle_is_a_tar_of_exactly_its_announced_size(tmp_path: Path) -> None:
    path = web_image(tmp_path / "web.tar", BUSYBOX)
    with Archive(path) as archive:
        image = check_image(archive, None)
        config = runtime_config(image.config, "web1")
        raw = b"".join(bundle_chunks(archive, image, config))
    assert len(raw) == bundle_size(image, config)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = tar.getnames()
        layers = tar.extractfile("layers").read().decode().split()  # type: ignore[union-attr]
    assert names == ["config.json", "layers", "layer-00", "layer-01", "layer-02"]
    assert layers[:3] == ["00", "gzip", image.layers[0].sha256]


def _signed(
    tmp_path: Path, archive: Path, name: str = "web", tag: str = "1"
) -> tuple[Path, KeyDirectory]:
    keys = tmp_path / "keys"
    pair = generate_key(keys, force=True) if not (keys / "image-signing.pub").exists() else None
    private = pair.private if pair else next(p for p in keys.iterdir() if p.suffix != ".pub")
    return sign_archive(archive, name, tag, private), KeyDirectory(keys)


def test_the_store_takes_only_the_signed_archive(tmp_path: Path) -> None:
    archive = web_image(tmp_path / "web.tar", BUSYBOX)
    doc, keys = _signed(tmp_path, archive)
    store = ContainerStore(tmp_path / "store", keys)
    other = web_image(tmp_path / "other.tar", BUSYBOX, tag="2")
    with pytest.raises(ReferenceError, match="not the archive signed"):
        store.publish(other, doc.read_bytes())
    tampered = doc.read_bytes().replace(b'"tag": "1"', b'"tag": "x"')
    with pytest.raises(BadSignature, match="does not match the reference"):
        store.publish(archive, tampered)
    copy = tmp_path / "elsewhere" / "web.tar"
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    stranger, _ = _signed(tmp_path / "elsewhere", copy)
    with pytest.raises(UnknownKey, match="does not trust"):
        store.publish(archive, stranger.read_bytes())
    ref = store.publish(archive, doc.read_bytes())
    assert str(ref) == "web:1" and store.resolve("web", "1").path.exists()
    assert [str(r) for r in store.refs()] == ["web:1"]
    with pytest.raises(ContainerNotFound):
        store.resolve("web", "2")
    assert parse(doc.read_bytes()).ref == ref


class _Vms:
    """Which VM a request comes from: the test says who is asking."""

    def __init__(self, *vms: VmMetadata) -> None:
        self.vms = {vm.name: vm for vm in vms}
        self.asking = vms[0].name

    def vm_by_ip(self, bridge: str, ip: str) -> VmMetadata | None:
        return self.vms[self.asking]


def _vm(name: str, image: str = "web:1") -> VmMetadata:
    return VmMetadata(name, f"uuid-{name}", "127.0.0.1", "52:54:00:00:00:01", started=5.0,
                      container_image=image, container_ports=(80,))  # fmt: skip


async def test_the_routes_give_one_download_per_boot_to_its_own_vm(tmp_path: Path) -> None:
    archive = web_image(tmp_path / "web.tar", BUSYBOX)
    doc, keys = _signed(tmp_path, archive)
    store = ContainerStore(tmp_path / "store", keys)
    store.publish(archive, doc.read_bytes())
    bad = bad_images(tmp_path / "bad", BUSYBOX)["symlink"]
    bad_doc, _ = _signed(tmp_path, bad, "evil", "1")
    store.publish(bad, bad_doc.read_bytes())
    states: dict[str, list[str]] = {}

    async def record(name: str, text: str) -> None:
        states.setdefault(name, []).append(text)

    vms = _Vms(
        _vm("a"), _vm("b"), _vm("evil", "evil:1"), VmMetadata("plain", "u", "127.0.0.1", "m")
    )
    app = make_app("br0", vms, containers=ContainerService(store, record))
    async with TestClient(TestServer(app)) as client:
        ticket = await (await client.get("/hatchery/container")).text()
        lines = dict(line.split("=", 1) for line in ticket.split())
        assert lines["image"] == "web:1" and lines["ports"] == "80"
        assert (await client.get("/hatchery/container")).status == 410  # once per boot
        vms.asking = "b"
        stolen = await client.get("/hatchery/container/bundle",
                                  headers={CONTAINER_TOKEN_HEADER: lines["token"]})  # fmt: skip
        assert stolen.status == 403 and "another VM" in await stolen.text()
        vms.asking = "a"
        answer = await client.get("/hatchery/container/bundle",
                                  headers={CONTAINER_TOKEN_HEADER: lines["token"]})  # fmt: skip
        body = await answer.read()
        assert answer.status == 200 and len(body) == answer.content_length
        again = await client.get("/hatchery/container/bundle",
                                 headers={CONTAINER_TOKEN_HEADER: lines["token"]})  # fmt: skip
        assert again.status == 410 and "already used" in await again.text()
        assert states["a"] == ["pulling", "pulled"]
        vms.asking = "evil"
        token = (
            (await (await client.get("/hatchery/container")).text()).split("token=")[1].split()[0]
        )
        refused = await client.get(
            "/hatchery/container/bundle", headers={CONTAINER_TOKEN_HEADER: token}
        )
        assert refused.status == 422 and "leaves the image's root" in await refused.text()
        assert states["evil"][-1].startswith("refused: layer 1: symlink 'escape'")
        vms.asking = "plain"
        assert (await client.get("/hatchery/container")).status == 404


def test_the_token_table_stays_bounded() -> None:
    grants = Grants(ttl=60, max_grants=4)
    tokens = [grants.issue(f"vm{i}", boot=1.0, now=float(i)) for i in range(6)]
    assert all(t is not None for t in tokens)
    # the two oldest were dropped: unknown now; the newest still good
    assert grants.redeem(str(tokens[0]), "vm0", now=10.0) is Verdict.UNKNOWN
    assert grants.redeem(str(tokens[5]), "vm5", now=10.0) is Verdict.OK


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
_DOCUMENTS = _JSON.map(lambda v: json.dumps({"format": 1, "container": v, "signature": v}).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048) | _DOCUMENTS)
def test_fuzz_signed_references_parse_or_are_refused(raw: bytes) -> None:
    try:
        parse(raw)
    except ReferenceError:
        pass
