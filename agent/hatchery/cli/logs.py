"""``hatchery logs``: the node's journal (or the agent's own recent lines) over the API.

``GET /v1/logs`` streams newline-delimited ``wire.LogEntry`` lines; ``--follow`` keeps the
answer open. A followed answer the agent ends (at its line cap, or because it is stopping)
is asked for again from the last line's time, so a follow runs until the operator stops it
(Ctrl-C): through the agent's restarts too (a live patch, a reboot upgrade), when it asks
every ``RETRY_SECONDS`` and says once on stderr that it waits. Only a follow that has been
answered waits so: a wrong address or a refusal ends it at once.
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
from hatchery.client import AgentClient, ApiError, Credentials
from hatchery.wire import MAX_LOG_LINES, LogEntry

#: How often a follow asks an agent that went away (restarting, rebooting) again.
RETRY_SECONDS = 2.0


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
    shown: set[LogEntry] = set()  # the lines of the last second shown: asked again after
    last: LogEntry | None = None
    answered = waiting = False
    while True:
        new = False
        try:
            async for raw in client.lines(f"/v1/logs?{urlencode(query)}"):
                answered = True
                try:
                    entry = LogEntry.from_json(json.loads(raw))
                except ValueError:
                    entry = None
                if entry is None or entry in shown:
                    continue  # a line of the second the answer before ended in, asked again
                if waiting:
                    sys.stderr.write("hatchery logs: the agent answers again\n")
                    waiting = False
                if last is not None and int(entry.time) != int(last.time):
                    shown.clear()
                shown.add(entry)
                last, new = entry, True
                print(json.dumps(entry.to_json()) if args.json else _line(entry), flush=True)
        except ApiError as exc:
            if not (args.follow and answered and exc.status == 0):
                raise
            if not waiting:
                sys.stderr.write(f"hatchery logs: {exc.message}; asking again every "
                                 f"{RETRY_SECONDS:g} s (Ctrl-C to stop)\n")  # fmt: skip
                waiting = True
            await asyncio.sleep(RETRY_SECONDS)
        else:
            answered = True
            if not args.follow:
                return
            if not new:  # ended with nothing new: an agent that does not follow, say
                await asyncio.sleep(RETRY_SECONDS)
        if last is not None:  # the agent ended the answer: go on from that line's second on
            query["since"] = f"@{int(last.time)}"
            query["lines"] = str(MAX_LOG_LINES)  # every line since then, not the last few


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
