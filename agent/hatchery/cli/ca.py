"""``hatchery ca``: make the CA, issue certificates for people, tools and agents, revoke them,
distribute the revocation list (CRL) to agents, and give firmware the CA for HTTPS boot."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from hatchery import efi_sigdb, pki
from hatchery.cli.vm import connection_args
from hatchery.client import AgentClient, Credentials
from hatchery.state import write_atomic

DEFAULT_CA_DIR = Path("/etc/hatchery/ca")


def _init(args: argparse.Namespace) -> int:
    cert = pki.init_ca(args.dir, args.name, force=args.force, rsa_keys=args.rsa)
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
        force=args.force,
    )
    kind = ("server and client" if args.client else "server") if args.server else "client"
    groups = ", ".join(args.group) or "none"
    print(f"{kind} certificate for {args.name} (groups: {groups}): {pair.cert}, key {pair.key}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    entry, crl = pki.revoke(args.dir, args.cert_or_serial, args.reason, days=args.days)
    who = f" ({entry.name})" if entry.name else ""
    print(f"revoked serial {entry.serial:x}{who}: {entry.reason}; CRL {crl}")
    print("push it to every agent: hatchery ca push-crl --agent HOST (or copy it to tls.crl)")
    return 0


def _crl(args: argparse.Namespace) -> int:
    crl = pki.issue_crl(args.dir, days=args.days)
    revoked = pki.read_revoked(args.dir)
    print(f"CRL number {revoked.crl_number} ({len(revoked.entries)} revoked, valid "
          f"{args.days} days): {crl}")  # fmt: skip
    return 0


def _push_crl(args: argparse.Namespace) -> int:
    data = (args.crl or args.dir / pki.CRL_FILE).read_bytes()

    async def go() -> Any:
        creds = Credentials.from_env(args.ca, args.cert, args.key)
        async with AgentClient(args.agent, creds) as client:
            return await client.request("PUT", "/v1/pki/crl", data=data)

    answer = asyncio.run(go())
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        crl = answer["crl"]
        print(f"{args.agent}: CRL number {crl['number']} in force ({crl['revoked']} revoked, "
              f"next update {crl['next_update']})")  # fmt: skip
    return 0


def _cacerts_esl(args: argparse.Namespace) -> int:
    ca = args.ca or args.dir / pki.CA_CERT
    try:
        pem = ca.read_bytes()
    except OSError as exc:
        raise efi_sigdb.SigDbError(f"cannot read {ca}: {exc.strerror}") from exc
    esl = efi_sigdb.cacerts_esl(pem, args.owner)
    write_atomic(args.out, esl, 0o644)  # public: CA certificates only
    count = len(efi_sigdb.parse_esl(esl))
    print(f"{args.out}: {count} CA certificate(s) as EFI signature lists ({len(esl)} bytes); "
          "enrol as the firmware's HTTPS boot CAs (OVMF: -fw_cfg "
          f"name=etc/edk2/https/cacerts,file={args.out})")  # fmt: skip
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ca_command", required=True)
    init = sub.add_parser("init", help="create a certificate authority")
    init.add_argument("--dir", type=Path, default=DEFAULT_CA_DIR)
    init.add_argument("--name", default="Hatchery CA")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument(
        "--rsa",
        action="store_true",
        help="RSA keys instead of ECDSA: for the boot CA (boot.https), which firmware pins and "
        "whose TLS may lack elliptic curves (Debian's OVMF does)",
    )
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
    issue.add_argument("--days", type=int, default=pki.LEAF_DAYS,
                       help=f"lifetime (default {pki.LEAF_DAYS}; renew before)")  # fmt: skip
    issue.add_argument("--out", type=Path, default=None, help="where to write (default: --dir)")
    issue.add_argument("--force", action="store_true",
                       help="replace an existing key and certificate (renewal)")  # fmt: skip
    issue.set_defaults(func=_issue)
    revoke = sub.add_parser("revoke", help="revoke a certificate and issue a new CRL")
    revoke.add_argument("cert_or_serial", metavar="CERT_OR_SERIAL",
                        help="the certificate's PEM file, or its serial in hex "
                        "(as openssl x509 -noout -serial prints it)")  # fmt: skip
    revoke.add_argument("--reason", default="unspecified", choices=sorted(pki.REASONS))
    revoke.add_argument("--dir", type=Path, default=DEFAULT_CA_DIR, help="the CA's folder")
    revoke.add_argument("--days", type=int, default=pki.CRL_DAYS, help="the CRL's lifetime")
    revoke.set_defaults(func=_revoke)
    crl = sub.add_parser("crl", help="(re)issue the CRL from the revoked list")
    crl.add_argument("--dir", type=Path, default=DEFAULT_CA_DIR, help="the CA's folder")
    crl.add_argument("--days", type=int, default=pki.CRL_DAYS,
                     help=f"until nextUpdate (default {pki.CRL_DAYS})")  # fmt: skip
    crl.set_defaults(func=_crl)
    push = sub.add_parser("push-crl", help="install the CRL on an agent (PUT /v1/pki/crl)")
    push.add_argument("--dir", type=Path, default=DEFAULT_CA_DIR, help="the CA's folder")
    push.add_argument("--crl", type=Path, default=None, help="the CRL (default: DIR/crl.pem)")
    connection_args(push)
    push.set_defaults(func=_push_crl)
    esl = sub.add_parser(
        "cacerts-esl", help="the CA certificate(s) as EFI signature lists, for firmware HTTPS boot"
    )
    esl.add_argument("--dir", type=Path, default=DEFAULT_CA_DIR, help="the CA's folder")
    esl.add_argument("--ca", type=Path, default=None,
                     help="PEM certificate(s) to trust (default: DIR/ca.pem)")  # fmt: skip
    esl.add_argument("--out", type=Path, required=True, help="the signature-list file to write")
    esl.add_argument(
        "--owner",
        type=uuid.UUID,
        default=efi_sigdb.HATCHERY_OWNER,
        help=f"the signature owner GUID (default {efi_sigdb.HATCHERY_OWNER})",
    )
    esl.set_defaults(func=_cacerts_esl)
