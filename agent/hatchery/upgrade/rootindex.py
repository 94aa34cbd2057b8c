"""A root's index: the fingerprint of every path, computed once when the image is built and
carried inside its root, so an upgrade compares two roots by reading two small files.

Why: without it a live patch hashes both whole roots (the running image's, for the three-way
comparison, and the target's): 9 000 files and 360 MB each, 2.6 s per root on a host and
about ten times that on an emulated node, for a patch that usually changes a few dozen files.
With it, only the files whose fingerprints differ are read, and each one is checked against
its fingerprint as it is read (``archive``): an index that disagrees with its image stops the
patch before anything changes.

The index lists every path of the root but itself (its own fingerprint is taken from its
bytes when it is read). Format: JSON, ``{"format": 1, "paths": {path: [kind, perm, uid,
gid, digest]}}``, sorted, so the same tree always gives the same bytes (reproducible builds).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hatchery.cpio import CpioError, safe_path
from hatchery.errors import HatcheryError
from hatchery.upgrade.fingerprint import Fingerprint, of_member
from hatchery.upgrade.rootimage import iter_tree

INDEX_PATH = "usr/lib/hatchery/root-index.json"
FORMAT = 1
KINDS = ("file", "symlink", "dir", "other")


class RootIndexError(HatcheryError):
    """A root index cannot be read; the message says why."""


def build_index(entries: Iterable[tuple[str, Fingerprint]]) -> bytes:
    """The index of ``entries`` (path, fingerprint), leaving out the index's own path."""
    paths = {
        path: [fp.kind, fp.perm, fp.uid, fp.gid, fp.digest]
        for path, fp in entries
        if path != INDEX_PATH
    }
    text = json.dumps({"format": FORMAT, "paths": paths}, sort_keys=True, separators=(",", ":"))
    return text.encode("utf-8", "surrogateescape") + b"\n"


def index_tree(top: Path) -> bytes:
    """The index of the root unpacked at ``top``, as the image build writes it into the root
    (``hatchery_lab.liveroot``), fingerprinted exactly as upgrades fingerprint a root."""
    return build_index((member.path, of_member(member, data)) for member, data in iter_tree(top))


def parse_index(raw: bytes) -> dict[str, Fingerprint]:
    """The fingerprints an index lists; every path checked to stay inside the root.

    :raise RootIndexError: not an index of this format, or a malformed entry.
    """
    try:
        data: Any = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise RootIndexError(f"the root index is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RootIndexError(f"the root index is not of format {FORMAT}")
    paths = data.get("paths")
    if not isinstance(paths, dict):
        raise RootIndexError("the root index has no paths")
    index: dict[str, Fingerprint] = {}
    for path, entry in paths.items():
        try:
            clean = safe_path(path)
        except CpioError as exc:
            raise RootIndexError(f"the root index names {path!r}: {exc}") from None
        if clean != path or not path or not _valid(entry):
            raise RootIndexError(f"the root index has a malformed entry for {path!r}")
        kind, perm, uid, gid, digest = entry
        index[path] = Fingerprint(kind, perm, uid, gid, digest)
    return index


def _valid(entry: Any) -> bool:
    if not (isinstance(entry, list) and len(entry) == 5):
        return False
    kind, perm, uid, gid, digest = entry
    numbers = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                  for n in (perm, uid, gid))  # fmt: skip
    return kind in KINDS and numbers and perm <= 0o7777 and isinstance(digest, str)
