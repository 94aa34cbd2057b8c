"""``hatchery ca``: make the CA and issue certificates for people, tools and agents."""

from __future__ import annotations

import argparse
from pathlib import Path

from hatchery import pki

DEFAULT_CA_DIR = Path("/etc/hatchery/ca")


def _init(args: argparse.Namespace) -> int:
    cert = pki.init_ca(args.dir, args.name, force=args.force)
    print(f"CA certificate: {cert} (key beside it, mode 0600: keep it offline if you can)")
    return 0


def _issue(args: argparse.Namespace) -> int:
    pair = pki.issue(
        args.dir,
        args.name,
        args.out or args.dir,
        groups=tuple(args.group),
        server_names=tuple(args.server),
        client=args.client or not args.server,
        days=args.days,
    )
    kind = ("server and client" if args.client else "server") if args.server else "client"
    groups = ", ".join(args.group) or "none"
    print(f"{kind} certificate for {args.name} (groups: {groups}): {pair.cert}, key {pair.key}")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ca_command", required=True)
    init = sub.add_parser("init", help="create a certificate authority")
    init.add_argument("--dir", type=Path, default=DEFAULT_CA_DIR)
    init.add_argument("--name", default="Hatchery CA")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(func=_init)
    issue = sub.add_parser("issue", help="issue a certificate signed by the CA")
    issue.add_argument("--dir", type=Path, default=DEFAULT_CA_DIR, help="the CA's folder")
    issue.add_argument("--name", required=True, help="the identity (certificate CN)")
    issue.add_argument("--group", action="append", default=[], help="a group (repeatable)")
    issue.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a server certificate for this DNS name or IP (repeatable): for agents",
    )
    issue.add_argument(
        "--client",
        action="store_true",
        help="with --server, a client certificate too: an agent's, which is its identity "
        "(--group node) when it fetches images from peers",
    )
    issue.add_argument("--days", type=int, default=pki.LEAF_DAYS)
    issue.add_argument("--out", type=Path, default=None, help="where to write (default: --dir)")
    issue.set_defaults(func=_issue)
