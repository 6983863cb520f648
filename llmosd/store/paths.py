"""The store's file-system primitives: reaching ``manifests/<name>/<tag>`` one component at a
time without following a link, the errors that name what is in the way, and the last step of
every atomic write (fsync, rename, fsync the directory).

Error messages name models and store entries relative to the store, never absolute paths.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from llmctl.errors import InvalidArgument, LlmosdError, ModelNotFound, StoreCorrupt

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK   # NONBLOCK: a planted FIFO
LINK_HINT = "the store never follows links out of its own directory: remove that entry by hand"


def shown(text: str, limit: int = 100) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters (names can be huge)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def own_dir(path: str, what: str) -> None:
    """Make directory ``path`` (mode 0750) unless it exists; StoreCorrupt when what is there is
    a symbolic link or not a directory (never followed: the daemon stays in its own tree)."""
    try:
        os.mkdir(path, 0o750)
    except FileExistsError:
        pass
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
        kind_ = "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"
        raise StoreCorrupt(f"{what} {path} is {kind_}; llmosd never follows links out of its own tree",
                           hint=f"move {path} aside (its target is left alone) and start again")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(f: BinaryIO, tmp: str, dst: str, *, dir_fd: int | None = None,
                dir_path: str | None = None) -> None:
    """The end of an atomic write: flush, chmod 0640 and fsync the open temp file ``f`` (at
    ``tmp``), close it, rename it to ``dst`` (an entry of ``dir_fd`` when given), then fsync that
    directory (``dir_fd``, or ``dir_path``).  A crash leaves the old file or the new one, never
    half of one.  On failure the temp file is removed and the error raised."""
    try:
        f.flush()
        os.fchmod(f.fileno(), 0o640)
        os.fsync(f.fileno())
        f.close()
        os.rename(tmp, dst, dst_dir_fd=dir_fd)    # replaces a stray link itself, never its target
    except BaseException:
        try:
            f.close()
        except OSError:
            pass
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    if dir_fd is not None:
        os.fsync(dir_fd)
    else:
        fsync_dir(dir_path or os.path.dirname(dst))


def kind(entry: str, dir_fd: int) -> str:
    """What ``entry`` in the directory ``dir_fd`` is: missing, link, dir, file or other."""
    try:
        mode = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return "missing"
    return ("link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else
            "file" if stat.S_ISREG(mode) else "other")


class Blocked(Exception):
    """Component ``index`` of a manifest path is not what it should be (``kind`` as above)."""

    def __init__(self, index: int, kind: str):
        super().__init__(index, kind)
        self.index, self.kind = index, kind


def open_parent(top: str, parts: list[str], create: bool = False) -> int:
    """A descriptor of the directory holding ``top/parts[0]/.../parts[-1]``, entered one
    component at a time without following links (made as needed if ``create``).
    Raises Blocked for the first component that is not a real directory."""
    fd = os.open(top, DIR_FLAGS)
    try:
        for i, part in enumerate(parts[:-1]):
            if create:
                try:
                    os.mkdir(part, 0o750, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                sub = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                raise Blocked(i, kind(part, fd)) from None
            os.close(fd)
            fd = sub
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_entry(top: str, parts: list[str], on_blocked) -> tuple[bytes, float]:
    """The bytes and mtime of the regular file ``top/parts...``, reached as ``open_parent``
    does; a missing, linked or odd component raises ``on_blocked(Blocked)``.  A directory where
    the file should be counts as missing."""
    try:
        dfd = open_parent(top, parts)
    except Blocked as b:
        raise on_blocked(b) from None
    try:
        try:
            fd = os.open(parts[-1], READ_FLAGS, dir_fd=dfd)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                raise
            raise on_blocked(Blocked(len(parts) - 1, kind(parts[-1], dfd))) from None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)                          # a directory: name:tag is others' namespace
        raise on_blocked(Blocked(len(parts) - 1, "missing" if stat.S_ISDIR(st.st_mode) else "other"))
    with os.fdopen(fd, "rb") as f:
        return f.read(), st.st_mtime


def blocked_error(name: str, tag: str, parts: list[str], b: Blocked) -> LlmosdError:
    """The user-facing error for reading ``name:tag`` past a blocked component."""
    if b.kind in ("link", "other"):
        entry = "/".join(parts[:b.index + 1])
        what = "a symbolic link" if b.kind == "link" else "not a regular file or directory"
        return StoreCorrupt(f"the store entry {shown(entry)} (of {name}:{tag}) is {what}", hint=LINK_HINT)
    return ModelNotFound(f"model {name}:{tag} is not in the store")


def clash_error(name: str, tag: str, parts: list[str], b: Blocked) -> LlmosdError:
    """The user-facing error for writing ``name:tag`` over a component in the way."""
    if b.kind == "file" and b.index > 0:      # a directory is needed where a tag file is
        other = "/".join(parts[:b.index]) + ":" + parts[b.index]
        return InvalidArgument(f"model name {name}:{tag} clashes with model {other} "
                               f"(the store cannot hold both)",
                               hint=f"choose another name, or remove {other} first")
    if b.kind == "dir" and b.index == len(parts) - 1:   # a tag where a namespace is
        space = "/".join(parts)
        return InvalidArgument(f"model name {name}:{tag} clashes with the models named "
                               f"{space}:TAG (the store cannot hold both)",
                               hint=f"choose another name or tag, or remove the {space} models first")
    entry = "/".join(parts[:b.index + 1])
    what = "a symbolic link" if b.kind == "link" else f"in the way ({b.kind})"
    return StoreCorrupt(f"the store entry {shown(entry)} (for {name}:{tag}) is {what}", hint=LINK_HINT)
