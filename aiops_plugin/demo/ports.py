"""TCP ports on 127.0.0.1: pick a free one, tell whether one is taken, and by which process.

The demo's agent port is fixed (9108 by default), so a second demo, or an agent left running,
can hold it. Knowing that before anything starts, and knowing that the server answering on the
port is the agent process we started, keeps a stranger's ``/readyz`` from passing for ours.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

_PROC_TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_TCP_LISTEN = "0A"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (a server binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server already holds ``host:port`` (on it or on the wildcard address).

    The probe binds with ``SO_REUSEADDR`` as uvicorn and Prometheus do, so a port whose last
    connection lingers in TIME_WAIT counts as free, as it is for them.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP ``port`` (any address), from ``/proc/net/tcp{,6}``; None
    where the kernel does not publish them (not Linux)."""
    tables = [table for table in _PROC_TCP_TABLES if table.exists()]
    if not tables:
        return None
    inodes = set()
    for table in tables:
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == _TCP_LISTEN:
                inodes.add(fields[9])
    return inodes


def process_listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on TCP ``port``; None where ``/proc``
    cannot tell (not Linux)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = os.listdir(fd_dir)
    except FileNotFoundError:
        return False  # the process is gone
    except PermissionError:
        return None
    sockets = {f"socket:[{inode}]" for inode in inodes}
    for fd in fds:
        try:
            if os.readlink(fd_dir / fd) in sockets:
                return True
        except OSError:
            continue  # closed since the listing
    return False
