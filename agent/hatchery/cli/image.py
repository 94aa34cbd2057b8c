"""``hatchery image``: signing keys, signing a build, publishing to an agent, listing, fetching.

``keygen`` and ``sign`` work on local files; ``publish``, ``list`` and ``fetch`` talk to one
agent over mutual TLS (see docs/images-store.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from hatchery import host
from hatchery.cli.vm import connection_args as _connection_args
from hatchery.client import AgentClient, ApiError, Credentials, agent_url, error_from_answer
from hatchery.errors import CommandError, HatcheryError
from hatchery.images.manifest import (
    SIGNED_NAME,
    Role,
    SignedManifest,
    parse_signed,
    sha256_file,
)
from hatchery.images.running_root import MAX_SENT
from hatchery.images.signing import (
    DEFAULT_KEY_NAME,
    DEFAULT_KEYS_DIR,
    KeyDirectory,
    generate_key,
    sign_build_dir,
)
from hatchery.upgrade.archive import root_image_range


def _emit(args: argparse.Namespace, result: Any, text: str) -> None:
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else text)


# --- local: keys and signing -------------------------------------------------------------------
def _keygen(args: argparse.Namespace) -> int:
    pair = generate_key(args.out, args.name, force=args.force)
    print(f"signing key {pair.private} (mode 0600: keep it off the nodes)")
    print(f"public key  {pair.public} (key id {pair.key_id}): copy it to each node's "
          f"{DEFAULT_KEYS_DIR}/")  # fmt: skip
    return 0


def _sign(args: argparse.Namespace) -> int:
    path, signed = sign_build_dir(args.build_dir, args.key)
    m = signed.manifest
    roles = ", ".join(f"{r} {a.name}" for r, a in sorted(m.artefacts.items()))
    print(f"signed {m.image} {m.version} with key {signed.key_id}: {path} ({roles})")
    return 0


def _read_signed(build_dir: Path) -> tuple[bytes, SignedManifest]:
    path = build_dir / SIGNED_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise HatcheryError(
            f"{path} does not exist", hint=f"sign the build first: hatchery image sign {build_dir}"
        ) from None
    return raw, parse_signed(raw)


def _check_files(build_dir: Path, signed: SignedManifest) -> None:
    for artefact in signed.manifest.artefacts.values():
        digest, size = sha256_file(build_dir / artefact.name)
        if digest != artefact.sha256 or size != artefact.size:
            raise HatcheryError(
                f"{build_dir / artefact.name} is not the file that was signed",
                hint=f"sign again: hatchery image sign {build_dir}",
            )


def _verify(args: argparse.Namespace) -> int:
    _, signed = _read_signed(args.build_dir)
    KeyDirectory(args.keys).trusted().verify(signed)
    _check_files(args.build_dir, signed)
    print(f"{signed.manifest.image} {signed.manifest.version}: signature by key "
          f"{signed.key_id} verifies, artefacts match")  # fmt: skip
    return 0


# --- remote: publish, list, fetch --------------------------------------------------------------
def _credentials(args: argparse.Namespace) -> Credentials:
    return Credentials.from_env(args.ca, args.cert, args.key)


async def _answer(resp: aiohttp.ClientResponse) -> Any:
    body: Any = await resp.json() if resp.content_type == "application/json" else await resp.text()
    if resp.status >= 400:
        raise error_from_answer(resp.status, body)
    return body


async def _runs(session: aiohttp.ClientSession, base: str, version: str) -> bool:
    """Whether the agent's node runs ``version`` (its ``/healthz``; False if it cannot say)."""
    try:
        async with session.get(f"{base}/healthz") as resp:
            health = await resp.json() if resp.status == 200 else None
    except (aiohttp.ClientError, ValueError):
        return False
    return isinstance(health, dict) and health.get("version") == version


async def _put_around_running_root(session: aiohttp.ClientSession, url: str, path: Path) -> bool:
    """Upload ``path`` (a live initrd) without its root image, which the node that runs it
    puts back from its own (``images.running_root``); False if the node cannot (it runs
    another image, an older agent): then the caller uploads it whole."""
    with path.open("rb") as f:
        where = root_image_range(f)
        if where is None:
            return False
        offset, size = where
        f.seek(0)
        head = f.read(offset)
        f.seek(offset + size)
        rest = head + f.read()
    query = {"running_root_at": str(offset), "running_root_size": str(size)}
    return await _put_with_root(session, url, query, rest, size)


async def _put_with_root(
    session: aiohttp.ClientSession, url: str, query: dict[str, str], body: bytes, size: int
) -> bool:
    """One upload the node completes with its running root image (``size`` bytes); whether
    it did. Any refusal is a False: the caller uploads the object whole."""
    try:
        async with session.put(url, params=query, data=body) as resp:
            if resp.status in (200, 201):
                answer = await resp.json()
                return isinstance(answer, dict) and answer.get("from_running_root") == size
            return False
    except (aiohttp.ClientError, ValueError):  # a refusal may close the connection mid-body
        return False


async def _patch_on_root(base_initrd: Path, path: Path) -> tuple[bytes, int] | None:
    """``path`` as a zstd patch against the root image of ``base_initrd`` (``zstd
    --patch-from``, here: python-zstandard cannot make one), and that image's size; None
    when either is no live initrd, this host has no ``zstd``, or the patch is larger than
    the node takes (``MAX_SENT``: then the object goes whole)."""
    zstd = shutil.which("zstd")
    with base_initrd.open("rb") as f:
        where = root_image_range(f)
        if zstd is None or where is None:
            return None
        offset, size = where
        with tempfile.TemporaryDirectory(prefix="hatchery-patch-") as tmp:
            root = Path(tmp) / "root.squashfs"
            with root.open("wb") as out:
                f.seek(offset)
                shutil.copyfileobj(f, out, length=1 << 20)
                out.truncate(size)
            patch = Path(tmp) / "patch.zst"
            try:
                await host.run_async([zstd, "-q", "-f", "-3", f"--patch-from={root}", str(path),
                                      "-o", str(patch)], timeout=600)  # fmt: skip
            except CommandError:
                return None
            if patch.stat().st_size > MAX_SENT:
                return None
            return patch.read_bytes(), size


async def _put_patched(
    session: aiohttp.ClientSession, url: str, path: Path, base_initrd: Path
) -> bool:
    """Upload ``path`` (the next version's live initrd) as a patch against the root image
    of ``base_initrd``, the build the node runs, which the node decodes with its own
    (``images.running_root``); False if the patch cannot be made or the node cannot apply
    it: then the caller uploads the object whole."""
    made = await _patch_on_root(base_initrd, path)
    if made is None:
        return False
    patch, size = made
    return await _put_with_root(session, url, {"patched_on_running_root": str(size)}, patch, size)


def _base_initrd(base_dir: Path | None) -> tuple[str, Path] | None:
    """``--base``: the version of that signed build and its initrd."""
    if base_dir is None:
        return None
    _, signed = _read_signed(base_dir)
    _check_files(base_dir, signed)
    initrd = signed.manifest.artefacts.get(Role.INITRD)
    return (signed.manifest.version, base_dir / initrd.name) if initrd is not None else None


#: How an object reached the node, by the key its build's answer lists it under.
HOW = ("uploaded", "already_there", "from_running_root", "patched_on_running_root")


class _Publisher:
    """Publishes signed builds into one agent at once. Each object goes once, whichever
    build names it (builds of one image share their kernel); each build's manifest goes
    when its own objects are there. Two at once take 0.70x the time of one after the
    other into an emulated node, whose own hashing and writing is then what is left
    (docs/benchmarks.md)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: str,
        on: tuple[str, Path] | None,
        group: asyncio.TaskGroup,
    ) -> None:
        self._session = session
        self._base = base
        self._on = on
        self._group = group  # a failure anywhere cancels the rest
        self._sending: dict[str, asyncio.Task[str]] = {}
        self._runs: dict[str, asyncio.Task[bool]] = {}

    def _node_runs(self, version: str) -> asyncio.Task[bool]:
        if version not in self._runs:
            self._runs[version] = self._group.create_task(_runs(self._session, self._base,
                                                                version))  # fmt: skip
        return self._runs[version]

    async def _send(self, role: Role, sha: str, path: Path, version: str) -> str:
        """The object to the node unless it has it: around or as a patch on its running root
        image where it can, else whole. Which of ``HOW`` it was."""
        url = f"{self._base}/v1/objects/{sha}"
        async with self._session.head(url) as resp:
            if resp.status == 200:
                return "already_there"
            if resp.status != 404:
                await _answer(resp)
        if role is Role.INITRD:
            if await self._node_runs(version) and await _put_around_running_root(
                self._session, url, path
            ):
                return "from_running_root"
            # the initrd the node booted, when it runs --base: patches are made against it
            if (self._on and await self._node_runs(self._on[0])
                    and await _put_patched(self._session, url, path, self._on[1])):  # fmt: skip
                return "patched_on_running_root"
        with path.open("rb") as f:
            async with self._session.put(url, data=f) as resp:
                await _answer(resp)
        return "uploaded"

    async def publish(self, build_dir: Path, raw: bytes, signed: SignedManifest) -> dict[str, Any]:
        result: dict[str, Any] = {how: [] for how in HOW}
        sends = []
        for role, artefact in sorted(signed.manifest.artefacts.items()):
            if artefact.sha256 not in self._sending:
                self._sending[artefact.sha256] = self._group.create_task(self._send(
                    role, artefact.sha256, build_dir / artefact.name, signed.manifest.version
                ))  # fmt: skip
            sends.append((artefact.name, self._sending[artefact.sha256]))
        for name, sending in sends:
            result[await sending].append(name)
        headers = {"Content-Type": "application/json"}
        async with self._session.post(f"{self._base}/v1/images", data=raw,
                                      headers=headers) as resp:  # fmt: skip
            return {**await _answer(resp), **result}


async def _publish(args: argparse.Namespace) -> list[dict[str, Any]]:
    builds = []
    for build_dir in args.build_dirs:
        raw, signed = _read_signed(build_dir)
        _check_files(build_dir, signed)
        builds.append((build_dir, raw, signed))
    on = _base_initrd(args.base)
    base = agent_url(args.agent)
    connector = aiohttp.TCPConnector(ssl=_credentials(args).context())
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            try:
                async with asyncio.TaskGroup() as group:
                    publisher = _Publisher(session, base, on, group)
                    tasks = [group.create_task(publisher.publish(*b)) for b in builds]
            except BaseExceptionGroup as failed:  # the first failure, as one build's would be
                raise failed.exceptions[0] from None
        return [task.result() for task in tasks]
    except aiohttp.ClientConnectorCertificateError as exc:
        raise ApiError(f"{base}: the agent's certificate is not trusted: {exc}", 0) from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ApiError(f"cannot publish to {base}: {exc or type(exc).__name__}", 0) from exc


def _publish_cmd(args: argparse.Namespace) -> int:
    results = asyncio.run(_publish(args))
    if args.json:  # one build: its answer, as ever; several: the list of them
        _emit(args, results[0] if len(results) == 1 else results, "")
        return 0
    for result in results:
        print(f"published {result['image']} {result['version']} to {args.agent}: "
              f"uploaded {', '.join(result['uploaded']) or 'nothing'}"
              + (f"; already there: {', '.join(result['already_there'])}"
                 if result["already_there"] else "")
              + (f"; around the root image the node runs: "
                 f"{', '.join(result['from_running_root'])}"
                 if result["from_running_root"] else "")
              + (f"; as a patch on the root image the node runs: "
                 f"{', '.join(result['patched_on_running_root'])}"
                 if result["patched_on_running_root"] else ""))  # fmt: skip
    return 0


async def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    async with AgentClient(args.agent, _credentials(args), timeout=3600) as client:
        return await client.request(method, path, json=body)


def _list_cmd(args: argparse.Namespace) -> int:
    result = asyncio.run(_call(args, "GET", "/v1/images"))
    if args.json:
        _emit(args, result, "")
        return 0
    if not result["images"]:
        print("no images")
    for image in result["images"]:
        mark = {result["current"]: "current", result["previous"]: "previous"}.get(
            image["version"], ""
        )
        if "error" in image:
            print(f"{image['version']:<24} error: {image['error']}")
            continue
        size = f"{image['size'] / 1e6:.1f} MB"
        print(f"{image['version']:<24} {image['image']:<14} {size:>10}  key {image['key']}"
              f"{'  ' + mark if mark else ''}")  # fmt: skip
    return 0


def _fetch_cmd(args: argparse.Namespace) -> int:
    body = {"peer": args.peer, "version": args.version}
    r = asyncio.run(_call(args, "POST", "/v1/images/fetch", body))
    text = (
        f"{args.agent} fetched {r['version']} from {r['peer']}: {r['fetched_objects']} objects "
        f"({r['downloaded_bytes']} bytes, {r['resumed_bytes']} resumed), "
        f"{r['present_objects']} already there"
    )
    _emit(args, r, text)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="image_command", required=True)
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair for signing images")
    keygen.add_argument("--out", type=Path, required=True, help="directory for the key pair")
    keygen.add_argument("--name", default=DEFAULT_KEY_NAME, help="file name (.key and .pub)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(func=_keygen)
    sign = sub.add_parser("sign", help=f"sign a build (make images): writes {SIGNED_NAME}")
    sign.add_argument("--key", type=Path, required=True, help="the private signing key")
    sign.add_argument(
        "build_dir", type=Path, metavar="BUILD_DIR", help="e.g. build/images/hypervisor"
    )
    sign.set_defaults(func=_sign)
    verify = sub.add_parser("verify", help="check a signed build against trusted public keys")
    verify.add_argument("--keys", type=Path, default=DEFAULT_KEYS_DIR, help="directory of *.pub")
    verify.add_argument("build_dir", type=Path, metavar="BUILD_DIR")
    verify.set_defaults(func=_verify)
    publish = sub.add_parser(
        "publish",
        help="upload signed builds' artefacts, then their "
        "manifests (several builds go at once, shared objects once)",
    )
    publish.add_argument("build_dirs", type=Path, nargs="+", metavar="BUILD_DIR")
    publish.add_argument("--base", type=Path, metavar="BASE_DIR",
                         help="a signed build of the version the node runs: the initrd goes "
                              "as a zstd patch against its root image (a few MB instead of "
                              "~100), when the node runs it and this host has zstd")  # fmt: skip
    _connection_args(publish)
    publish.set_defaults(func=_publish_cmd)
    listing = sub.add_parser("list", help="the images in an agent's store")
    _connection_args(listing)
    listing.set_defaults(func=_list_cmd)
    fetch = sub.add_parser("fetch", help="make an agent fetch an image from a peer agent")
    fetch.add_argument("--peer", required=True, help="the peer agent HOST[:PORT] to fetch from")
    fetch.add_argument("version", help="the image version")
    _connection_args(fetch)
    fetch.set_defaults(func=_fetch_cmd)
