"""``hatchery container``: sign an OCI archive, check it as the agent will, publish it to an
agent's container store, list them (docs/appliance.md).

``sign`` and ``check`` work on local files; ``publish`` and ``list`` talk to one agent over
mutual TLS. ``check`` runs the very gate the agent runs before a VM gets the image
(``containers.oci.check_image``), so a refusal can be seen before publishing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import aiohttp

from hatchery.api.containers import SIGNED_HEADER
from hatchery.cli.image import _answer, _credentials
from hatchery.cli.vm import connection_args
from hatchery.client import AgentClient, ApiError, agent_url
from hatchery.containers import signed
from hatchery.containers.oci import Archive, check_image, split_reference
from hatchery.errors import HatcheryError


def _sign(args: argparse.Namespace) -> int:
    name, tag = split_reference(args.reference)
    out = signed.sign_archive(args.archive, name, tag, args.key)
    print(f"signed {args.archive} as {name}:{tag}: {out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    _, tag = split_reference(args.reference) if args.reference else (None, None)
    with Archive(args.archive) as archive:
        image = check_image(archive, tag)
    command = [*image.config.entrypoint, *image.config.cmd]
    print(f"{args.archive}: image sha256:{image.manifest[:12]} passes: {len(image.layers)} "
          f"layers, {image.entries} entries, {image.unpacked_bytes / 1e6:.1f} MB unpacked; "
          f"runs {' '.join(command) or '(nothing)'}")  # fmt: skip
    return 0


async def _publish(args: argparse.Namespace) -> Any:
    doc_path = args.archive.with_name(args.archive.name + signed.SUFFIX)
    try:
        raw = doc_path.read_bytes()
    except FileNotFoundError:
        raise HatcheryError(f"{doc_path} does not exist",
                            hint=f"sign it first: hatchery container sign {args.archive} "
                                 "NAME:TAG --key KEY") from None  # fmt: skip
    ref = signed.parse(raw).ref
    base = agent_url(args.agent)
    connector = aiohttp.TCPConnector(ssl=_credentials(args).context())
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    headers = {SIGNED_HEADER: base64.b64encode(raw).decode(),
               "Content-Type": "application/x-tar"}  # fmt: skip
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            with args.archive.open("rb") as f:
                url = f"{base}/v1/containers/{ref.name}/{ref.tag}"
                async with session.put(url, data=f, headers=headers) as resp:
                    return await _answer(resp)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ApiError(f"cannot publish to {base}: {exc or type(exc).__name__}", 0) from exc


def _publish_cmd(args: argparse.Namespace) -> int:
    result = asyncio.run(_publish(args))
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(f"published {result['name']}:{result['tag']} to {args.agent} "
              f"({result['size']} bytes, signed by key {result['key']})")  # fmt: skip
    return 0


def _list_cmd(args: argparse.Namespace) -> int:
    async def call() -> Any:
        async with AgentClient(args.agent, _credentials(args), timeout=60) as client:
            return await client.request("GET", "/v1/containers")

    result = asyncio.run(call())
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    for c in result["containers"] or []:
        print(f"{c['name']}:{c['tag']:<20} {c['archive']['size'] / 1e6:8.1f} MB  "
              f"sha256 {c['archive']['sha256'][:12]}")  # fmt: skip
    if not result["containers"]:
        print("no container images")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="container_command", required=True)
    sign = sub.add_parser("sign", help=f"sign an OCI archive as NAME:TAG: writes *{signed.SUFFIX}")
    sign.add_argument("archive", type=Path)
    sign.add_argument("reference", metavar="NAME[:TAG]")
    sign.add_argument("--key", type=Path, required=True, help="the private image signing key")
    sign.set_defaults(func=_sign)
    check = sub.add_parser("check", help="check an OCI archive as the agent will")
    check.add_argument("archive", type=Path)
    check.add_argument("reference", metavar="NAME[:TAG]", nargs="?")
    check.set_defaults(func=_check)
    publish = sub.add_parser("publish", help="upload a signed OCI archive to an agent")
    publish.add_argument("archive", type=Path)
    connection_args(publish)
    publish.set_defaults(func=_publish_cmd)
    listing = sub.add_parser("list", help="the container images in an agent's store")
    connection_args(listing)
    listing.set_defaults(func=_list_cmd)
