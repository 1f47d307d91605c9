"""Free ports to listen on, for the servers that tests and benchmarks start themselves."""

from __future__ import annotations

import random
import socket

#: Below Linux's default ephemeral range (32768-60999), from which the kernel picks the ports of
#: bind(0) and the local ports of outgoing connections.
_LOW, _HIGH = 20000, 32000


def free_port(span: int = 1) -> int:
    """A port P such that P .. P + span - 1 are free on every interface (servers bind 0.0.0.0),
    drawn below the ephemeral range, where a free port stays free until a server binds it. Inside
    the range the kernel soon hands a port out again as the local port of an outgoing connection,
    and a process started a second later fails to listen on it (seen with test runs side by
    side). And bind(0) gets odd ports while connect() takes even ones, so P + 1 of a bind(0) port
    is the next local port of any connection: CI saw local rank 1 of a torchrun fail on it."""
    for _ in range(200):
        port = random.randrange(_LOW, _HIGH - span)
        if all(_bindable(port + i) for i in range(span)):
            return port
    raise RuntimeError(f"no {span} consecutive free port(s) in {_LOW}-{_HIGH}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True
