"""The command line: gost's grammar, one-line errors, warnings, ``-O`` output.

Most tests run ``python -m pyegress`` as a subprocess (with a timeout) and look only at
its exit code, stdout and stderr; the node-URL table and the property test call
:func:`pyegress.config.nodes.parse_node` directly.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyegress.config.nodes import Node, parse_node
from pyegress.errors import ConfigError
from tests.conftest import PyegressFactory
from tests.support.clients import http_connect, recv_exact
from tests.support.origins import TcpOrigin
from tests.support.ports import free_port
from tests.support.procs import ROOT


def run(args: Sequence[str], timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "pyegress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def config_of(args: Sequence[str], fmt: str = "json") -> subprocess.CompletedProcess[str]:
    result = run([*args, "-O", fmt])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def json_config(*args: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(config_of(args).stdout)
    return value


# --------------------------------------------------------------------------- -V


def test_version_prints_one_line_and_exits_0() -> None:
    result = run(["-V"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("pyegress "), lines
    assert any(ch.isdigit() for ch in lines[0])
    assert result.stderr == ""


# --------------------------------------------------------------------------- errors


def _error_cases() -> list[Any]:
    p = free_port()
    local = f"127.0.0.1:{p}"
    cases = [
        ("unknown_scheme", ["-L", "foo://:8080"], "foo"),
        ("unknown_scheme_on_F", ["-L", f"http://{local}", "-F", "bar://h:1"], "bar"),
        ("unknown_transport", ["-L", "http+quux://:8080"], "quux"),
        ("missing_port", ["-L", "http://host"], "http://host"),
        ("bad_port", ["-L", "http://:99999"], "99999"),
        ("unicode_digit_port", ["-L", "http://:\u00b2"], "\u00b2"),
        ("port_not_number", ["-L", "http://:http"], "http"),
        ("unclosed_bracket", ["-L", "http://[::1:80"], "[::1:80"),
        ("F_with_path", ["-L", f"http://{local}", "-F", "http://proxy:3128/extra:22"], "extra"),
        ("bad_duration", ["-L", f"http://{local}?timeout=abc"], "abc"),
        ("bad_duration_unit", ["-L", f"http://{local}?idleTimeout=5x"], "5x"),
        ("negative_duration", ["-L", f"http://{local}?readTimeout=-3"], "-3"),
        ("bad_duration_on_F", ["-L", f"http://{local}", "-F", "http://h:1?timeout=soon"], "soon"),
        ("bad_retries", ["-L", f"http://{local}?retries=many"], "many"),
        ("bad_port_with_O", ["-L", "socks5://:65536", "-O", "json"], "65536"),
    ]
    return [pytest.param(args, bad, id=name) for name, args, bad in cases]


@pytest.mark.parametrize(("args", "bad"), _error_cases())
def test_bad_command_line_is_one_line_on_stderr(args: list[str], bad: str) -> None:
    result = run(args)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert bad in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    # The process stopped before serving: nothing announced a listener.
    assert '"listening"' not in result.stdout


def test_port_already_in_use() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run(["-L", f"http://127.0.0.1:{port}"])
    assert result.returncode != 0, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_same_port_twice_on_the_command_line() -> None:
    port = free_port()
    result = run(["-L", f"http://127.0.0.1:{port}", "-L", f"socks5://127.0.0.1:{port}"])
    assert result.returncode != 0, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


# --------------------------------------------------------------------------- warnings


def test_unknown_parameter_is_warned_about_once(pyegress: PyegressFactory) -> None:
    proc = pyegress(
        [
            "-L",
            "http://127.0.0.1:{0}?foo=1",
            "-L",
            "socks5://127.0.0.1:{1}?foo=2",
            "-F",
            "http://127.0.0.1:9?foo=3",
        ]
    )
    # The warning comes before the listeners are announced.
    proc.wait_records("listening", 2)
    warnings = proc.records("unknown_parameter")
    assert len(warnings) == 1, warnings
    assert warnings[0]["param"] == "foo"
    assert warnings[0].get("level") == "warning", warnings[0]
    assert proc.proc.poll() is None, proc.output()
    time.sleep(0.2)
    assert len(proc.records("unknown_parameter")) == 1
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert "Traceback" not in proc.output()


# --------------------------------------------------------------------------- -O


def _service(config: Mapping[str, Any], i: int = 0) -> dict[str, Any]:
    service: dict[str, Any] = config["services"][i]
    return service


def _hop_node(config: Mapping[str, Any], i: int = 0) -> dict[str, Any]:
    node: dict[str, Any] = config["chains"][0]["hops"][i]["nodes"][0]
    return node


@pytest.mark.parametrize(
    ("url", "addr", "handler", "listener"),
    [
        ("http://:8080", ":8080", "http", "tcp"),
        ("https://:443", ":443", "http", "tls"),
        ("http+tls://:443", ":443", "http", "tls"),
        ("h2://:443", ":443", "auto", "h2"),
        ("h2c://:8080", ":8080", "auto", "h2c"),
        ("tls://:443", ":443", "auto", "tls"),
        (":8080", ":8080", "auto", "tcp"),
        ("auto://:8080", ":8080", "auto", "tcp"),
        ("socks5+h2://:443", ":443", "socks5", "h2"),
        ("socks://:1080", ":1080", "socks5", "tcp"),
        ("socks4a://127.0.0.1:1080", "127.0.0.1:1080", "socks4a", "tcp"),
        ("http://[::1]:3128", "[::1]:3128", "http", "tcp"),
    ],
)
def test_O_json_service_shape(url: str, addr: str, handler: str, listener: str) -> None:
    config = json_config("-L", url)
    assert len(config["services"]) == 1
    service = _service(config)
    assert service["addr"] == addr
    assert service["handler"]["type"] == handler
    assert service["listener"]["type"] == listener
    assert "chains" not in config
    assert "chain" not in service["handler"]


def test_O_json_port_forward() -> None:
    config = json_config("-L", "tcp://:2222/10.0.0.1:22")
    service = _service(config)
    assert service["addr"] == ":2222"
    assert service["handler"]["type"] == "tcp"
    assert service["listener"]["type"] == "tcp"
    assert [n["addr"] for n in service["forwarder"]["nodes"]] == ["10.0.0.1:22"]


def test_O_json_port_forward_round_robin_targets() -> None:
    config = json_config("-L", "tcp://:2222/10.0.0.1:22,10.0.0.2:22")
    nodes = _service(config)["forwarder"]["nodes"]
    assert [n["addr"] for n in nodes] == ["10.0.0.1:22", "10.0.0.2:22"]


@pytest.mark.parametrize(
    ("url", "addr", "connector", "dialer"),
    [
        ("h2://dmz:443", "dmz:443", "http", "h2"),
        ("http://proxy:3128", "proxy:3128", "http", "tcp"),
        ("https://proxy:443", "proxy:443", "http", "tls"),
        ("socks5://gw:1080", "gw:1080", "socks5", "tcp"),
        ("socks5+h2://gw:443", "gw:443", "socks5", "h2"),
        ("tls://gw:443", "gw:443", "http", "tls"),
        ("gw:8080", "gw:8080", "http", "tcp"),
    ],
)
def test_O_json_chain_shape(url: str, addr: str, connector: str, dialer: str) -> None:
    config = json_config("-L", ":8080", "-F", url)
    assert _service(config)["handler"]["chain"] == config["chains"][0]["name"]
    node = _hop_node(config)
    assert node["addr"] == addr
    assert node["connector"]["type"] == connector
    assert node["dialer"]["type"] == dialer


def test_O_json_hops_in_order() -> None:
    config = json_config("-L", ":8080", "-F", "http://a:1", "-F", "socks5://b:2", "-F", "h2://c:3")
    hops = config["chains"][0]["hops"]
    assert [h["nodes"][0]["addr"] for h in hops] == ["a:1", "b:2", "c:3"]
    assert [h["nodes"][0]["connector"]["type"] for h in hops] == ["http", "socks5", "http"]


SECRET_ARGS = [
    "-L",
    "http://alice:s%33cret@:8080?readTimeout=5",
    "-L",
    "socks5://:1080?auth=" + base64.b64encode(b"dave:Pa55-dave").decode(),
    "-F",
    "socks5://bob:hunter2@gw:1080",
    "-F",
    "http://gw2:3128?auth=" + base64.urlsafe_b64encode(b"carol:c4r0l?pw").decode(),
]
SECRETS = [
    "s3cret",
    "s%33cret",
    "Pa55-dave",
    "hunter2",
    "c4r0l?pw",
    base64.b64encode(b"dave:Pa55-dave").decode(),
    base64.urlsafe_b64encode(b"carol:c4r0l?pw").decode(),
]


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_O_masks_every_password(fmt: str) -> None:
    result = config_of(SECRET_ARGS, fmt)
    for secret in SECRETS:
        assert secret not in result.stdout, secret
        assert secret not in result.stderr, secret
    for user in ("alice", "dave", "bob", "carol"):
        assert user in result.stdout, user
    assert "***" in result.stdout


def test_O_json_auth_shape() -> None:
    config = json_config(*SECRET_ARGS)
    assert _service(config, 0)["handler"]["auth"] == {"username": "alice", "password": "***"}
    assert _service(config, 1)["handler"]["auth"] == {"username": "dave", "password": "***"}
    assert _hop_node(config, 0)["connector"]["auth"] == {"username": "bob", "password": "***"}
    assert _hop_node(config, 1)["connector"]["auth"] == {"username": "carol", "password": "***"}


def _parse_yaml(text: str) -> Any:
    """Just enough YAML for ``-O yaml``: block mappings, block sequences, scalars."""
    lines = [
        (len(raw) - len(raw.lstrip(" ")), raw.strip())
        for raw in text.splitlines()
        if raw.strip() and not raw.strip().startswith("#")
    ]

    def scalar(token: str) -> Any:
        if token.startswith('"') and token.endswith('"'):
            return token[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        if token.startswith("'") and token.endswith("'"):
            return token[1:-1].replace("''", "'")
        if token == "{}":
            return {}
        if token == "[]":
            return []
        return token

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            seq: list[Any] = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
                rest = lines[i][1][1:].strip()
                if ":" in rest and not rest.startswith('"'):
                    lines[i] = (indent + 2, rest)
                    item, i = block(i, indent + 2)
                else:
                    item, i = scalar(rest), i + 1
                seq.append(item)
            return seq, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
            key, _, rest = lines[i][1].partition(":")
            rest = rest.strip()
            i += 1
            if rest:
                mapping[key.strip()] = scalar(rest)
            elif i < len(lines) and lines[i][0] > indent:
                mapping[key.strip()], i = block(i, lines[i][0])
            elif i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                mapping[key.strip()], i = block(i, indent)
            else:
                mapping[key.strip()] = None
        return mapping, i

    value, end = block(0, lines[0][0])
    assert end == len(lines), f"unparsed YAML from line {end}: {text}"
    return value


def _strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strings(v) for v in value]
    return str(value)


@pytest.mark.parametrize(
    "args",
    [
        SECRET_ARGS,
        ["-L", "tcp://:2222/10.0.0.1:22,10.0.0.2:22", "-L", "h2://:443", "-F", "h2://dmz:443"],
        ["-L", ":8080?proxyAgent=x: y&readTimeout=1m30s"],
    ],
    ids=["auth", "forward_and_chain", "odd_values"],
)
def test_O_yaml_says_what_O_json_says(args: list[str]) -> None:
    as_json = json.loads(config_of(args, "json").stdout)
    as_yaml = _parse_yaml(config_of(args, "yaml").stdout)
    assert as_yaml == _strings(as_json)


# --------------------------------------------------------------------------- -L=


def test_gost_style_equals_is_accepted_in_O() -> None:
    config = json_config("-L=:8080", "-F=socks5://gw:1080")
    assert _service(config)["addr"] == ":8080"
    assert _service(config)["handler"]["type"] == "auto"
    assert _hop_node(config)["addr"] == "gw:1080"


def test_gost_style_equals_serves(pyegress: PyegressFactory, tcp_origin: TcpOrigin) -> None:
    proc = pyegress(["-L=http://127.0.0.1:{0}"])
    port = proc.ports[0]
    sock, head = http_connect(("127.0.0.1", port), f"127.0.0.1:{tcp_origin.port}", timeout=5)
    with sock:
        assert head.startswith(b"HTTP/1.1 200 "), head
        sock.sendall(b"ECHO\nhi")
        assert recv_exact(sock, 2) == b"hi"


# --------------------------------------------------------------------------- parse_node

B64_UP = base64.b64encode(b"u:p").decode()

# (kind, transport, host, port, user, targets, params)
Expected = tuple[str, str, str, int, str | None, tuple[str, ...], dict[str, str]]

# (url, role, expected): gost-compat 1.3's table, plus the URL grammar of 1.2.
NODE_TABLE: list[tuple[str, str, Expected]] = [
    ("http://:8080", "listen", ("http", "tcp", "", 8080, None, (), {})),
    ("http://proxy:3128", "forward", ("http", "tcp", "proxy", 3128, None, (), {})),
    ("https://:443", "listen", ("http", "tls", "", 443, None, (), {})),
    ("https://gw:443", "forward", ("http", "tls", "gw", 443, None, (), {})),
    ("http+tls://:443", "listen", ("http", "tls", "", 443, None, (), {})),
    ("socks5://:1080", "listen", ("socks5", "tcp", "", 1080, None, (), {})),
    ("socks://:1080", "listen", ("socks5", "tcp", "", 1080, None, (), {})),
    ("socks://gw:1080", "forward", ("socks5", "tcp", "gw", 1080, None, (), {})),
    ("socks5+h2://:443", "listen", ("socks5", "h2", "", 443, None, (), {})),
    ("socks5+h2://gw:443", "forward", ("socks5", "h2", "gw", 443, None, (), {})),
    ("http+h2://:443", "listen", ("http", "h2", "", 443, None, (), {})),
    ("h2://:443", "listen", ("auto", "h2", "", 443, None, (), {})),
    ("h2://dmz:443", "forward", ("http", "h2", "dmz", 443, None, (), {})),
    ("h2c://:80", "listen", ("auto", "h2c", "", 80, None, (), {})),
    ("h2c://dmz:80", "forward", ("http", "h2c", "dmz", 80, None, (), {})),
    ("http2://:443", "listen", ("http2", "http2", "", 443, None, (), {})),
    ("http2://gw:443", "forward", ("http2", "http2", "gw", 443, None, (), {})),
    ("tls://:443", "listen", ("auto", "tls", "", 443, None, (), {})),
    ("tls://gw:443", "forward", ("http", "tls", "gw", 443, None, (), {})),
    ("relay+tls://:443", "listen", ("relay", "tls", "", 443, None, (), {})),
    ("relay+tls://gw:443", "forward", ("relay", "tls", "gw", 443, None, (), {})),
    ("red://:12345", "listen", ("redirect", "redirect", "", 12345, None, (), {})),
    ("redirect://:12345", "listen", ("redirect", "redirect", "", 12345, None, (), {})),
    ("tcp://:8080/10.0.0.1:22", "listen", ("tcp", "tcp", "", 8080, None, ("10.0.0.1:22",), {})),
    (
        "tcp://:8080/a:1,b:2",
        "listen",
        ("tcp", "tcp", "", 8080, None, ("a:1", "b:2"), {}),
    ),
    (":2222/10.0.0.1:22", "listen", ("tcp", "tcp", "", 2222, None, ("10.0.0.1:22",), {})),
    (":8080", "listen", ("auto", "tcp", "", 8080, None, (), {})),
    ("auto://:8080", "listen", ("auto", "tcp", "", 8080, None, (), {})),
    ("gw:8080", "forward", ("http", "tcp", "gw", 8080, None, (), {})),
    ("HTTP://:8080", "listen", ("http", "tcp", "", 8080, None, (), {})),
    ("http://[::1]:8080", "listen", ("http", "tcp", "::1", 8080, None, (), {})),
    ("http://127.0.0.1:8080", "listen", ("http", "tcp", "127.0.0.1", 8080, None, (), {})),
    ("socks5://u:p@:1080", "listen", ("socks5", "tcp", "", 1080, "u", (), {})),
    ("socks5://u%40x:p@gw:1080", "forward", ("socks5", "tcp", "gw", 1080, "u@x", (), {})),
    ("http://:8080?auth=" + B64_UP, "listen", ("http", "tcp", "", 8080, "u", (), {"auth": B64_UP})),
    (
        "http://:8080?readTimeout=5s&IdleTimeout=1m&timeout=3",
        "listen",
        (
            "http",
            "tcp",
            "",
            8080,
            None,
            (),
            {"handshake_timeout": "5s", "idle_timeout": "1m", "timeout": "3"},
        ),
    ),
    (
        "socks5://:1080?handler.readTimeout=2&proxyAgent=x",
        "listen",
        ("socks5", "tcp", "", 1080, None, (), {"handshake_timeout": "2", "proxy_agent": "x"}),
    ),
    ("socks5://:1080?foo=1", "listen", ("socks5", "tcp", "", 1080, None, (), {})),
]


@pytest.mark.parametrize(
    ("url", "role", "expected"), NODE_TABLE, ids=[f"{r}:{u}" for u, r, _ in NODE_TABLE]
)
def test_parse_node_table(
    url: str,
    role: str,
    expected: Expected,
) -> None:
    node = parse_node(url, "listen" if role == "listen" else "forward")
    got = (
        node.kind,
        node.transport,
        node.host,
        node.port,
        node.user,
        node.forward_targets,
        dict(node.params),
    )
    assert got == expected


def test_parse_node_passwords_and_unknown_params() -> None:
    node = parse_node("socks5://u%40x:p%3Aw@gw:1080?foo=1&Bar=2", "forward")
    assert (node.user, node.password) == ("u@x", "p:w")
    assert node.unknown_params == ("foo", "Bar")
    assert "p:w" not in node.redacted()
    assert "p:w" not in repr(node)
    auth = parse_node("http://:8080?auth=" + B64_UP, "listen")
    assert (auth.user, auth.password) == ("u", "p")
    assert B64_UP not in auth.redacted()


@pytest.mark.parametrize(
    ("url", "role", "bad"),
    [
        ("foo://:8080", "listen", "foo"),
        ("foo://gw:1", "forward", "foo"),
        ("http+quux://:8080", "listen", "quux"),
        ("http://host", "listen", "http://host"),
        ("http://:99999", "listen", "99999"),
        ("http://:0", "listen", "0"),
        ("http://:-1", "listen", "-1"),
        ("http://[::1:80", "listen", "[::1:80"),
        ("http://::1:80", "listen", "::1:80"),
        ("http://proxy:3128/x:1", "forward", "proxy:3128/x:1"),
        ("tcp://:8080/nohostport", "listen", "nohostport"),
        ("", "listen", ""),
        ("ht tp://:80", "listen", "ht tp"),
    ],
)
def test_parse_node_errors_name_the_bad_part(url: str, role: str, bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_node(url, "listen" if role == "listen" else "forward")
    assert bad in str(info.value)
    assert "\n" not in str(info.value)


def _check_parse(url: str, role: str) -> None:
    message: str | None = None
    try:
        node = parse_node(url, "listen" if role == "listen" else "forward")
    except ConfigError as exc:
        message = str(exc)
    else:
        assert isinstance(node, Node)
        assert 0 < node.port < 65536
        node.redacted()
    if message is not None:
        assert "\n" not in message, message


_SCHEMES = [
    "",
    "http://",
    "https://",
    "socks5://",
    "socks4://",
    "tcp://",
    "h2://",
    "red://",
    "x://",
]
_DIGITS = "0123456789\u00b2\u00b3\u00b9\u0663\u06f5\u0966\uff11"


@st.composite
def _url_like(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(_SCHEMES))
    user = draw(st.sampled_from(["", "u:p@", "u@", ":@", "a%zz:b@"]))
    host = draw(st.sampled_from(["", "h", "127.0.0.1", "[::1]", "[::1", "a,b", "h h"]))
    port = draw(st.text(alphabet=_DIGITS + ":-+ ", max_size=8))
    path = draw(st.sampled_from(["", "/", "/a:1", "/a:1,b:2", "/[::1]:5", "/x"]))
    query = draw(st.text(alphabet="abc=&%?#:tim eouT0123456789", max_size=20))
    return f"{scheme}{user}{host}:{port}{path}?{query}"


@settings(max_examples=400, deadline=None)
@given(url=st.text(max_size=60), role=st.sampled_from(["listen", "forward"]))
@example(url="http://:\u00b2", role="listen")
@example(url="http://:" + "9" * 5000, role="listen")
def test_parse_node_random_text_parses_or_raises_config_error(url: str, role: str) -> None:
    _check_parse(url, role)


@settings(max_examples=600, deadline=None)
@given(url=_url_like(), role=st.sampled_from(["listen", "forward"]))
def test_parse_node_url_like_text_parses_or_raises_config_error(url: str, role: str) -> None:
    _check_parse(url, role)
