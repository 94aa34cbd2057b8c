"""Our newc writer checked by GNU cpio, a reader no one here wrote."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from hatchery_lab.cpio_writer import Entry, write_newc


def test_gnu_cpio_unpacks_what_we_write(tmp_path: Path, require_tool: Callable[[str], str]) -> None:
    cpio = require_tool("cpio")
    archive = write_newc(
        [
            Entry.directory("etc"),
            Entry.file("etc/hello", b"hello world\n"),
            Entry.file("init", b"#!/bin/sh\n", 0o755),
            Entry.symlink("etc/link", "hello"),
            Entry.file("odd", b"x" * 5),
        ]
    )
    assert len(archive) % 512 == 0
    out = tmp_path / "root"
    out.mkdir()
    subprocess.run([cpio, "-idm", "--quiet", "--no-absolute-filenames"],
                   input=archive, cwd=out, check=True)  # fmt: skip
    assert (out / "etc/hello").read_bytes() == b"hello world\n"
    assert (out / "init").stat().st_mode & 0o777 == 0o755
    assert (out / "etc/link").readlink() == Path("hello")
    assert (out / "odd").read_bytes() == b"xxxxx"


def test_same_entries_same_bytes() -> None:
    entries = [Entry.directory("a"), Entry.file("a/b", b"data")]
    assert write_newc(entries) == write_newc(entries)
