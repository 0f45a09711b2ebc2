"""lorakit's temporary files and folders: one exact naming pattern, names that fit NAME_MAX, and removal
of the ones an interrupted (killed) lorakit run left behind.

A temporary name is ``.<stem>.<host>-<pid>-<random>.lorakit-tmp``: ``stem`` is the output's file name
(shortened so that the whole name fits the folder's NAME_MAX), ``host`` is a short hash of the host name
and the PID namespace the writing process runs in, ``pid`` its process id. A later run removes such an
entry only when it matches this pattern exactly, belongs to the same user, carries the same host tag
(so a process in another container or on another machine sharing the folder is never judged by a PID
it cannot see) and that PID no longer runs. Nothing else is ever removed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import sys

TEMP_SUFFIX = ".lorakit-tmp"
DEFAULT_NAME_MAX = 255
_PATTERN = re.compile(r"\..*\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX),
                      re.DOTALL)


def host_tag() -> str:
    """8 hex digits naming this host and PID namespace (PIDs are only comparable within one)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{ns}".encode("utf-8", "surrogateescape")).hexdigest()[:8]


def name_max(folder: str) -> int:
    """The longest file name ``folder``'s filesystem allows (255 where it does not say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return DEFAULT_NAME_MAX


def temp_name(target_name: str, folder: str = ".") -> str:
    """A fresh temporary name for ``target_name`` in ``folder``, at most NAME_MAX bytes long."""
    tail = f".{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
    budget = name_max(folder) - len(os.fsencode(tail)) - 1
    stem = target_name
    while stem and len(os.fsencode(stem)) > budget:
        stem = stem[:-1]
    return "." + stem + tail


def is_temp_name(name: str) -> bool:
    """Whether ``name`` follows lorakit's temporary naming pattern exactly."""
    return _PATTERN.fullmatch(name) is not None


def create_temp_file(folder: str, target_name: str) -> tuple[int, str]:
    """Create (O_EXCL, mode 0600) a temporary file next to ``target_name``; returns (fd, path)."""
    for _ in range(100):
        path = os.path.join(folder, temp_name(target_name, folder))
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", folder)


def create_temp_dir(folder: str, target_name: str) -> str:
    """Create (mode 0700) a temporary folder next to ``target_name``; returns its path."""
    for _ in range(100):
        path = os.path.join(folder, temp_name(target_name, folder))
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", folder)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True           # never judge a PID that cannot be ours
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True           # exists (someone else's) or cannot tell: keep
    return True


def stale_temps(folder: str) -> list[str]:
    """lorakit temporary entries in ``folder`` whose writing process is gone (see the module docstring)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    tag, uid = host_tag(), os.getuid() if hasattr(os, "getuid") else None
    found = []
    for name in sorted(names):
        m = _PATTERN.fullmatch(name)
        if m is None or m["host"] != tag:
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            continue          # never a link, FIFO or device, whatever its name
        if uid is not None and st.st_uid != uid:
            continue
        if not _pid_alive(int(m["pid"])):
            found.append(path)
    return found


def clean_stale_temps(folder: str, *, report: bool = True) -> list[str]:
    """Remove :func:`stale_temps` of ``folder``; one warning line on stderr per entry removed."""
    removed = []
    for path in stale_temps(folder):
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError:
            continue
        removed.append(path)
        if report:
            print(f"lorakit: warning: removed {path!r}, a temporary {'folder' if stat.S_ISDIR(st.st_mode) else 'file'}"
                  " left by an interrupted lorakit run (its process no longer runs).", file=sys.stderr)
    return removed
