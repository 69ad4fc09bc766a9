"""Two tasks may sleep on one endpoint at once (a body copier drains while another
task reads): data arriving wakes the reader even while a drain is pending."""

from __future__ import annotations

import asyncio
import socket

from pyegress.endpoint import TcpEndpoint
from tests.conftest import PyegressFactory
from tests.support.clients import http_connect


async def test_read_and_drain_pending_together() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    _, endpoint = await loop.create_connection(TcpEndpoint, sock=ours)
    endpoint.pause_writing()  # as if the peer stopped reading
    reader = asyncio.ensure_future(endpoint.read())
    drainer = asyncio.ensure_future(endpoint.drain())
    await asyncio.sleep(0.05)
    theirs.sendall(b"hello")
    assert await asyncio.wait_for(reader, 5) == b"hello"
    assert not drainer.done()
    endpoint.resume_writing()
    await asyncio.wait_for(drainer, 5)
    endpoint.close()
    theirs.close()


def test_a_label_over_63_octets_is_a_dial_failure_not_a_bug(pyegress: PyegressFactory) -> None:
    proxy = pyegress(["-L", "http://127.0.0.1:{0}"])
    target = "a" * 64 + ".example.com:443"
    sock, head = http_connect(("127.0.0.1", proxy.ports[0]), target)
    sock.close()
    assert head.startswith(b"HTTP/1.1 502"), head
    assert proxy.record(target=target)["reason"] == "resolve_failed"
    assert "handler_bug" not in proxy.output()
