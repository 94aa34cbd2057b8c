"""``GET /v1/logs``: the node's journal, or the agent's own recent lines, as they come.

Query: ``unit`` (a systemd unit name, checked against ``logs.UNIT``; default the agent's),
``since`` (``10m``, ``@EPOCH`` or ISO 8601: parsed here, never handed to a command as
given), ``lines`` (the last N to start with, 1..10000, default 200), ``follow`` (``1``: keep
the answer open and send new lines). The answer is newline-delimited JSON, one
``wire.LogEntry`` a line; ``X-Hatchery-Log-Source`` says which source answered (``journal``
or ``agent``, see ``hatchery.logs``). Bounded: at most ``MAX_STREAMS`` answers at once per
agent, at most ``MAX_FOLLOW_LINES`` lines per followed answer (then it ends; the CLI asks
again from the last line's time), each journal line cut at ``logs.MAX_LINE`` bytes. A
followed answer also ends when the agent begins to stop, so it never holds a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from aiohttp import web

from hatchery.api.http import Unavailable, caller, require, until_stopping
from hatchery.api.validate import BadRequest
from hatchery.listener import client_left
from hatchery.logs import LogSource, check_unit, parse_since
from hatchery.wire import MAX_LOG_LINES

log = logging.getLogger(__name__)
MAX_LINES = MAX_LOG_LINES
MAX_FOLLOW_LINES = 100_000
MAX_STREAMS = 8
SOURCE_HEADER = "X-Hatchery-Log-Source"
_SOURCE: web.AppKey[LogSource] = web.AppKey("log_source")
_OPEN: web.AppKey[list[int]] = web.AppKey("log_streams")


def _query(request: web.Request) -> tuple[str | None, float | None, int, bool]:
    q = request.query
    unit = q.get("unit") or None
    try:
        if unit is not None:
            check_unit(unit)
    except ValueError as exc:
        raise BadRequest(str(exc), "unit") from exc
    since = None
    if q.get("since"):
        try:
            since = parse_since(q["since"], time.time())
        except ValueError as exc:
            raise BadRequest(str(exc), "since") from exc
    try:
        lines = int(q.get("lines", "200"))
    except ValueError as exc:
        raise BadRequest("lines must be an integer", "lines") from exc
    if not 1 <= lines <= MAX_LINES:
        raise BadRequest(f"lines must be within 1..{MAX_LINES}", "lines")
    follow = q.get("follow", "0")
    if follow not in ("0", "1", "true", "false"):
        raise BadRequest("follow must be 1 or 0", "follow")
    return unit, since, lines, follow in ("1", "true")


async def _cancel_when_gone(request: web.Request, task: asyncio.Task[object]) -> None:
    """aiohttp does not cancel a handler whose client left; a follow would hold its
    ``journalctl`` until the next line. Look every second, and cancel the handler."""
    while not client_left(request):
        await asyncio.sleep(1.0)
    task.cancel()


@require("node.logs.read")
async def get_logs(request: web.Request) -> web.StreamResponse:
    unit, since, lines, follow = _query(request)
    source, streams = request.app[_SOURCE], request.app[_OPEN]
    source.check(unit)
    if streams[0] >= MAX_STREAMS:
        raise Unavailable(f"{streams[0]} log answers are open already, as many as this agent "
                          "serves at once", hint="try again later")  # fmt: skip
    streams[0] += 1
    log.info("%s reads the node's logs (unit %s%s)", caller(request).name,
             unit or "of the agent", ", following" if follow else "")  # fmt: skip
    entries = source.entries(unit, since, lines, follow)
    handler = asyncio.current_task()
    assert handler is not None
    watch = asyncio.create_task(_cancel_when_gone(request, handler), name="logs-client")
    try:
        async with contextlib.aclosing(entries):
            response = web.StreamResponse(headers={SOURCE_HEADER: source.name})
            response.content_type = "application/x-ndjson"
            await response.prepare(request)
            sent, cap = 0, MAX_FOLLOW_LINES if follow else lines
            # A follow ends, complete, when the agent begins to stop (the CLI asks the next).
            stream = until_stopping(request, entries) if follow else entries
            async with contextlib.aclosing(stream):
                async for entry in stream:
                    await response.write(json.dumps(entry.to_json()).encode() + b"\n")
                    sent += 1
                    if sent >= cap:
                        break
            await response.write_eof()
            return response
    finally:
        streams[0] -= 1
        watch.cancel()


def add_routes(app: web.Application, source: LogSource) -> None:
    app[_SOURCE] = source
    app[_OPEN] = [0]
    app.router.add_get("/v1/logs", get_logs)
