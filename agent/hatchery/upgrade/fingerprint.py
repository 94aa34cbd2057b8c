"""What a path is, compared across the running root and images: type, permissions, owner,
and the sha256 of its content (or a symlink's target). Reading archives: ``archive``."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hatchery.cpio import Member


@dataclass(frozen=True, slots=True)
class Fingerprint:
    kind: str  # "file", "symlink", "dir", "other"
    perm: int
    uid: int
    gid: int
    digest: str  # sha256 of a file's content, a symlink's target, "" otherwise

    @property
    def is_file(self) -> bool:
        return self.kind == "file"


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "other"


def of_member(member: Member, data: bytes) -> Fingerprint:
    kind = kind_of(member.mode)
    if kind == "file":
        digest = hashlib.sha256(data).hexdigest()
    elif kind == "symlink":
        digest = data.decode("utf-8", "surrogateescape")
    else:
        digest = ""
    return Fingerprint(kind, stat.S_IMODE(member.mode), member.uid, member.gid, digest)


def of_path(path: Path) -> Fingerprint | None:
    """The running file's fingerprint; None if it does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    kind = kind_of(st.st_mode)
    digest = ""
    if kind == "file":
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
    elif kind == "symlink":
        digest = os.readlink(path)
    return Fingerprint(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, digest)
