"""``hatchery logs``: the node's journal (or the agent's own recent lines) over the API.

``GET /v1/logs`` streams newline-delimited ``wire.LogEntry`` lines; ``--follow`` keeps the
answer open. A followed answer the agent ends at its line cap is asked for again from the
last line's time, so a follow runs until the operator stops it (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from urllib.parse import urlencode

from hatchery.cli.vm import connection_args
from hatchery.client import AgentClient, Credentials
from hatchery.wire import LogEntry


def _line(entry: LogEntry) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.time))
    return f"{stamp} {entry.unit or '-'} {entry.level.upper()} {entry.source}: {entry.message}"


async def show(client: AgentClient, args: argparse.Namespace) -> None:
    query: dict[str, str] = {"lines": str(args.lines)}
    if args.unit:
        query["unit"] = args.unit
    if args.since:
        query["since"] = args.since
    if args.follow:
        query["follow"] = "1"
    last: LogEntry | None = None
    while True:
        async for raw in client.lines(f"/v1/logs?{urlencode(query)}"):
            try:
                entry = LogEntry.from_json(json.loads(raw))
            except ValueError:
                entry = None
            if entry is None:
                continue
            if last is not None and entry == last:
                continue  # the line the answer before ended on, asked again
            last = entry
            print(json.dumps(entry.to_json()) if args.json else _line(entry), flush=True)
        if not args.follow or last is None:
            return
        query["since"] = f"@{int(last.time)}"  # the agent ended a long follow: go on from here


def _run(args: argparse.Namespace) -> int:
    async def go() -> None:
        creds = Credentials.from_env(args.ca, args.cert, args.key)
        async with AgentClient(args.agent, creds, timeout=None if args.follow else 300) as client:
            if not args.follow:
                await show(client, args)
                return
            # Ctrl-C ends a follow at once, whatever the stream is waiting for: our own
            # handler, not the cancellation asyncio.run would send into aiohttp's reads.
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            following = asyncio.create_task(show(client, args), name="logs-follow")
            stopping = asyncio.create_task(stop.wait(), name="logs-stop")
            try:
                await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (following, stopping):
                    task.cancel()
                await asyncio.gather(following, stopping, return_exceptions=True)
                loop.remove_signal_handler(signal.SIGINT)
                loop.remove_signal_handler(signal.SIGTERM)
            if not following.cancelled():
                following.result()  # it ended by itself: its error, if it had one

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130 if not args.follow else 0
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unit", help="systemd unit (default: the agent's); needs a journal")
    parser.add_argument("--since", help="10m, 2h, 1d, @EPOCH or 2026-12-02T08:00:00 (UTC)")
    parser.add_argument("--lines", "-n", type=int, default=200, help="last N lines (1..10000)")
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    connection_args(parser)
    parser.set_defaults(func=_run)
