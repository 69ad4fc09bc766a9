"""``make run``: a sidecar and a DMZ on loopback, joined by mutual-TLS HTTP/2, with a
small origin behind the DMZ. Needs no internet.

    python -m pyegress.demo            # run until Ctrl-C, printing curl commands
    python -m pyegress.demo --check    # start, send a request each way, stop (exit 0/1)

Certificates come from a CA generated into a temporary directory at start.
"""

from __future__ import annotations

import argparse
import http.server
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from pyegress.pki import CertAuthority

IDENTITY = "spiffe://demo.local/ns/default/sa/app"

# The demo's origins live on loopback, so the rule that reaches them says so
# (private: [loopback]); everything else is refused, and the DMZ says why.
_POLICY = """\
version: 1
default: deny
rules:
  - id: demo/origin
    allow: ["localhost:{origin}", "localhost:{tls}", "127.0.0.1:{origin}"]
    identities: ["{identity}"]
    private: [loopback]
  - id: no-metadata
    deny: ["169.254.0.0/16"]
"""


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-origin"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = f"hello from the origin behind the DMZ (you asked for {self.path})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(server: http.server.ThreadingHTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _pump(stream: IO[bytes], prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{prefix} {line.decode(errors='replace')}")
        sys.stdout.flush()


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"demo: nothing listens on 127.0.0.1:{port}")


def _check(http_port: int, socks_port: int, origin_port: int, tls_port: int, ca: Path) -> bool:
    """Go through both tiers three ways and ask for one refused destination, with plain
    sockets (no curl needed)."""
    ok = True
    # 1. Absolute-URI GET through the HTTP listener.
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
        sock.sendall(
            f"GET http://127.0.0.1:{origin_port}/plain HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{origin_port}\r\nConnection: close\r\n\r\n".encode()
        )
        reply = _read_all(sock)
    ok &= _report("HTTP absolute-URI", reply)
    # 2. CONNECT, then TLS to the origin verified with the demo CA.
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
        target = f"localhost:{tls_port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        ctx = ssl.create_default_context(cafile=str(ca))
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(b"GET /tls HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            reply = _read_all(tls)
    ok &= _report("HTTP CONNECT + TLS", reply)
    # 3. SOCKS5 with a domain name.
    with socket.create_connection(("127.0.0.1", socks_port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        sock.recv(2)
        name = b"localhost"
        port = origin_port.to_bytes(2, "big")
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port)
        sock.recv(10)
        sock.sendall(
            f"GET /socks HTTP/1.1\r\nHost: localhost:{origin_port}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        reply = _read_all(sock)
    ok &= _report("SOCKS5", reply)
    # 4. A destination the policy does not allow: 403 from the DMZ, nothing dialed.
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
        sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        reply = _read_all(sock)
    refused = reply.startswith(b"HTTP/1.1 403")
    print(f"demo check: policy refusal: {'ok' if refused else 'FAILED'}", flush=True)
    return ok and refused


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _report(what: str, reply: bytes) -> bool:
    good = reply.startswith(b"HTTP/1.1 200") and b"hello from the origin" in reply
    print(f"demo check: {what}: {'ok' if good else 'FAILED'}", flush=True)
    return good


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyegress.demo")
    parser.add_argument("--check", action="store_true", help="send test requests, then stop")
    parser.add_argument("--base-port", type=int, default=18080)
    args = parser.parse_args(argv)
    base = args.base_port
    http_port, socks_port, dmz_port, admin_port = base, base + 1, base + 2, base + 3
    origin_port, tls_port = base + 10, base + 11

    workdir = Path(tempfile.mkdtemp(prefix="pyegress-demo-"))
    authority = CertAuthority(workdir, "pyegress demo CA")
    dmz_cert = authority.issue("dmz", dns=("localhost", "dmz.local"), ips=("127.0.0.1",))
    app_cert = authority.issue("app", uris=(IDENTITY,), client=True)
    origin_cert = authority.issue("origin", dns=("localhost",), ips=("127.0.0.1",))

    origin = http.server.ThreadingHTTPServer(("127.0.0.1", origin_port), _Origin)
    tls_origin = http.server.ThreadingHTTPServer(("127.0.0.1", tls_port), _Origin)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(origin_cert.cert, origin_cert.key)
    tls_origin.socket = ctx.wrap_socket(tls_origin.socket, server_side=True)
    _serve(origin)
    _serve(tls_origin)

    ca = authority.path
    policy = workdir / "policy.yaml"
    policy.write_text(_POLICY.format(identity=IDENTITY, origin=origin_port, tls=tls_port))
    dmz_url = f"h2://127.0.0.1:{dmz_port}?cert={dmz_cert.cert}&key={dmz_cert.key}&ca={ca}"
    side_url = (
        f"h2://127.0.0.1:{dmz_port}?cert={app_cert.cert}&key={app_cert.key}&ca={ca}"
        "&serverName=localhost&ping=30"
    )
    python = sys.executable
    children = [
        (
            "[dmz]    ",
            [
                python, "-m", "pyegress", "-L", dmz_url, "-C", str(policy),
                "-metrics", f"127.0.0.1:{admin_port}",
            ],
        ),
        (
            "[sidecar]",
            [
                python, "-m", "pyegress",
                "-L", f"http://127.0.0.1:{http_port}",
                "-L", f"socks5://127.0.0.1:{socks_port}",
                "-F", side_url,
            ],
        ),
    ]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for prefix, argv_ in children:
            proc = subprocess.Popen(argv_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(proc)
            assert proc.stdout is not None
            threading.Thread(target=_pump, args=(proc.stdout, prefix), daemon=True).start()
        for port in (dmz_port, http_port, socks_port):
            _wait_port(port)
        if args.check:
            return 0 if _check(http_port, socks_port, origin_port, tls_port, ca) else 1
        print(
            f"""
pyegress demo: app -> sidecar (127.0.0.1:{http_port} HTTP, :{socks_port} SOCKS5)
               -> mutual-TLS HTTP/2 -> DMZ (127.0.0.1:{dmz_port}) -> origin
certificates in {workdir}; the sidecar's identity is {IDENTITY}

try, in another terminal:
  curl -x http://127.0.0.1:{http_port} http://127.0.0.1:{origin_port}/hello
  curl -p -x http://127.0.0.1:{http_port} --cacert {ca} https://localhost:{tls_port}/over-tls
  curl --socks5-hostname 127.0.0.1:{socks_port} http://localhost:{origin_port}/via-socks

and one the DMZ's policy ({policy}) refuses, with its decision record:
  curl -p -x http://127.0.0.1:{http_port} https://example.com/

each tunnel prints a decision and a close record at each tier, joined by conn_id
(docs/audit.md); the DMZ's metrics and readiness:
  curl http://127.0.0.1:{admin_port}/metrics
  curl http://127.0.0.1:{admin_port}/readyz

Ctrl-C stops everything.
""",
            flush=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.is_set() and all(p.poll() is None for p in procs):
            stop.wait(0.5)
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        origin.shutdown()
        tls_origin.shutdown()


if __name__ == "__main__":
    sys.exit(main())
