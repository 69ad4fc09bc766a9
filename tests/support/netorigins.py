"""Origin servers for the fake internet, runnable as a process inside a namespace::

    python -m tests.support.netorigins --http 1.1.1.1:80 --tls 1.1.1.1:443 \\
        --cert cert.pem --key key.pem --tcp 1.1.1.1:7000

* ``--http IP:PORT``: HTTP/1.1; every request is answered ``200`` with a JSON body
  ``{"host": <Host header>, "sni": null, "local": "IP:PORT", "path": ..., "method": ...}``
  and ``Connection: close``.
* ``--tls IP:PORT``: the same behind TLS (``--cert``/``--key``, one certificate for
  several names); ``sni`` is the server name the ClientHello carried.
* ``--tcp IP:PORT``: raw TCP. The first line picks the behaviour: ``SOURCE n`` sends
  ``n`` bytes and closes, ``RESET n`` sends ``n`` bytes and then resets the connection
  (RST), ``HOLD`` says nothing; anything else is echoed back with everything after it.

Every flag may be repeated. Once every listener is bound the process prints ``ready``;
then one JSON line per accepted connection ``{"event": "accept", "kind": ...,
"local": ..., "peer": ..., "sni": ...}`` so a test can see which origin a tunnel reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import ssl
import struct
import sys
from collections.abc import Sequence
from typing import Any

PATTERN = bytes(range(256))


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _addr(info: Any) -> str:
    if not info:
        return ""
    host, port = info[0], info[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def note(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def payload(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


class Origins:
    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.tls = tls
        self.sni: dict[int, str | None] = {}
        if tls is not None:
            tls.sni_callback = self._on_sni

    def _on_sni(self, sslobj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.sni[id(sslobj)] = name

    def _sni_of(self, writer: asyncio.StreamWriter) -> str | None:
        sslobj = writer.get_extra_info("ssl_object")
        return None if sslobj is None else self.sni.pop(id(sslobj), None)

    async def http(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: str
    ) -> None:
        sni = self._sni_of(writer) if kind == "tls" else None
        local = _addr(writer.get_extra_info("sockname"))
        note(
            event="accept",
            kind=kind,
            local=local,
            peer=_addr(writer.get_extra_info("peername")),
            sni=sni,
        )
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            method, _, rest = lines[0].partition(" ")
            path = rest.rpartition(" ")[0]
            host = ""
            for line in lines[1:]:
                key, _, value = line.partition(":")
                if key.strip().lower() == "host":
                    host = value.strip()
            body = json.dumps(
                {"host": host, "sni": sni, "local": local, "path": path, "method": method}
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    async def tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        note(
            event="accept",
            kind="tcp",
            local=_addr(writer.get_extra_info("sockname")),
            peer=_addr(writer.get_extra_info("peername")),
            sni=None,
        )
        try:
            line = await reader.readline()
            verb, _, arg = line.decode("latin-1").strip().partition(" ")
            if verb == "SOURCE":
                writer.write(payload(int(arg)))
                await writer.drain()
            elif verb == "RESET":
                writer.write(payload(int(arg)))
                await writer.drain()
                await asyncio.sleep(0.2)  # let the bytes leave before the RST
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            elif verb == "HOLD":
                await reader.read()
            else:
                writer.write(line)
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


async def serve(args: argparse.Namespace) -> None:
    tls: ssl.SSLContext | None = None
    if args.tls:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    origins = Origins(tls)
    servers: list[asyncio.Server] = []
    for spec in args.http:
        host, port = split_host_port(spec)
        servers.append(
            await asyncio.start_server(
                lambda r, w: origins.http(r, w, "http"), host, port, reuse_address=True
            )
        )
    for spec in args.tls:
        host, port = split_host_port(spec)
        servers.append(
            await asyncio.start_server(
                lambda r, w: origins.http(r, w, "tls"), host, port, ssl=tls, reuse_address=True
            )
        )
    for spec in args.tcp:
        host, port = split_host_port(spec)
        servers.append(await asyncio.start_server(origins.tcp, host, port, reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.netorigins")
    parser.add_argument("--http", action="append", default=[], metavar="IP:PORT")
    parser.add_argument("--tls", action="append", default=[], metavar="IP:PORT")
    parser.add_argument("--tcp", action="append", default=[], metavar="IP:PORT")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args(argv)
    if args.tls and not (args.cert and args.key):
        parser.error("--tls needs --cert and --key")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
