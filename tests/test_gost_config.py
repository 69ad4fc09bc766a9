"""``-C`` with a gost configuration file: v2 JSON and the v3 YAML/JSON subset.

Unit tests load files with :func:`pyegress.config.gostfile.load_gost_file` and compare
the resulting nodes with what the equivalent command line parses into; every refusal is
checked with its exact one-line message. The ``test_live_*`` tests run pyegress with
``-C`` as its own process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pyegress.config.gostfile import GostFile, load_gost_file
from pyegress.config.nodes import Node, parse_node
from pyegress.config.render import effective_config, to_yaml
from pyegress.errors import ConfigError
from tests.conftest import PyegressFactory
from tests.support.clients import http_connect, recv_exact
from tests.support.origins import TcpOrigin
from tests.support.ports import free_port, wait_port
from tests.support.procs import ROOT


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, name: str, text: str) -> GostFile:
    gost = load_gost_file(write(tmp_path, name, text))
    assert gost is not None
    return gost


def refusal(tmp_path: Path, name: str, text: str) -> str:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        load_gost_file(path)
    message = str(info.value)
    assert "\n" not in message
    prefix = f"{path}"
    assert message.startswith(prefix), message
    return message[len(str(tmp_path)) + 1 :]


def same(node: Node, url: str) -> None:
    """``node`` is what ``url`` parses into; the scheme spelling may differ."""
    expected = parse_node(url, node.role)
    assert replace(node, scheme="") == replace(expected, scheme=""), (node, url)
    assert node.password == expected.password


# --------------------------------------------------------------------------- gost v2


def test_v2_serve_nodes_chain_nodes_retries_debug(tmp_path: Path) -> None:
    gost = load(
        tmp_path,
        "gost.json",
        json.dumps(
            {
                "Debug": True,
                "Retries": 3,
                "Mark": 0,
                "Interface": "",
                "ServeNodes": ["http://:18080", "socks5://u:p@127.0.0.1:1080?retry=5"],
                "ChainNodes": ["h2://dmz.example:443?ping=30", "socks5://gw:1080"],
            }
        ),
    )
    assert gost.source == "v2"
    assert gost.debug is True
    assert len(gost.listen) == 2
    assert len(gost.forward) == 2
    # Retries goes on every serve node; a node's own retry= wins, as in gost v2.
    same(gost.listen[0], "http://:18080?retries=3")
    same(gost.listen[1], "socks5://u:p@127.0.0.1:1080?retry=5")
    assert gost.listen[1].user == "u"
    assert gost.listen[1].password == "p"
    same(gost.forward[0], "h2://dmz.example:443?ping=30")
    same(gost.forward[1], "socks5://gw:1080")
    assert (gost.forward[0].kind, gost.forward[0].transport) == ("http", "h2")


def test_v2_defaults_and_case_insensitive_keys(tmp_path: Path) -> None:
    gost = load(tmp_path, "gost.json", '{"servenodes": [":8080"], "retries": 0}')
    assert gost.source == "v2"
    assert gost.debug is False
    assert gost.forward == []
    same(gost.listen[0], ":8080")
    assert "retries" not in gost.listen[0].params


def test_v2_one_route_is_mapped(tmp_path: Path) -> None:
    text = json.dumps(
        {
            "Debug": False,
            "Routes": [
                {
                    "Retries": 2,
                    "ServeNodes": ["red://:15001"],
                    "ChainNodes": ["h2://dmz:443"],
                }
            ],
        }
    )
    gost = load(tmp_path, "gost.json", text)
    assert len(gost.listen) == 1
    same(gost.listen[0], "red://:15001?retries=2")
    assert len(gost.forward) == 1
    same(gost.forward[0], "h2://dmz:443")


def test_v2_json_in_a_file_not_named_json(tmp_path: Path) -> None:
    gost = load(tmp_path, "gost.conf", '{\n\t"ServeNodes": ["http://:1"]\n}\n')
    same(gost.listen[0], "http://:1")


def test_v2_unknown_url_parameters_stay_warnings_like_on_the_command_line(
    tmp_path: Path,
) -> None:
    gost = load(tmp_path, "gost.json", '{"ServeNodes": ["http://:1?foo=1"]}')
    assert gost.listen[0].unknown_params == ("foo",)


# --------------------------------------------------------------------------- gost v3

FULL_V3 = """\
services:
- name: sidecar-http
  addr: "127.0.0.1:18080"
  bypass: bp-0
  handler:
    type: http
    chain: chain-0
    retries: 2
    auth: {username: u, password: "p@ss:w/rd"}
    metadata: {proxyAgent: pyegress-test, readTimeout: 10s}
  listener:
    type: tls
    tls: {certFile: c.pem, keyFile: k.pem, caFile: ca.pem}
    metadata: {backlog: 0, tproxy: false}
  metadata: {idleTimeout: 60s}
- name: ssh
  addr: ":2222"
  handler: {type: tcp, chain: chain-0}
  listener: {type: tcp}
  forwarder:
    selector: {strategy: round}
    nodes: [{name: t0, addr: "10.0.0.1:22"}, {name: t1, addr: "10.0.0.2:22"}]
chains:
- name: chain-0
  hops:
  - name: hop-0
    selector: {strategy: fifo, maxFails: 3, failTimeout: 30s}
    bypass: bp-direct
    nodes:
    - name: dmz-a
      addr: dmz-a.example:443
      connector: {type: http, auth: {username: cu, password: cp}}
      dialer:
        type: h2
        tls: {secure: true, serverName: dmz.example, caFile: ca.pem}
        metadata: {ping: 30, host: dmz.example}
    - name: dmz-b
      addr: dmz-b.example:443
      connector: {type: http, auth: {username: cu, password: cp}}
      dialer:
        type: h2
        tls: {secure: true, serverName: dmz.example, caFile: ca.pem}
        metadata: {ping: 30, host: dmz.example}
  - name: corp
hops:
- name: corp
  nodes:
  - addr: "corp-proxy:3128"
    connector: {type: socks5}
    bypass: bp-corp
bypasses:
- name: bp-0
  whitelist: true
  matchers: [".example.com", "api.partner.net:443", "10.0.0.0/8"]
- name: bp-direct
  matchers: [internal.corp]
- name: bp-corp
  reverse: true
  matchers: [".corp"]
"""


def test_v3_services_chains_hops_bypasses(tmp_path: Path) -> None:
    gost = load(tmp_path, "gost.yaml", FULL_V3)
    assert gost.source == "v3"
    assert gost.debug is False
    assert len(gost.listen) == 2
    same(
        gost.listen[0],
        "http+tls://u:p%40ss%3Aw%2Frd@127.0.0.1:18080?retries=2&proxyAgent=pyegress-test"
        "&readTimeout=10s&cert=c.pem&key=k.pem&ca=ca.pem&idleTimeout=60s"
        "&bypass=~.example.com,api.partner.net:443,10.0.0.0/8",
    )
    assert gost.listen[0].password == "p@ss:w/rd"
    same(gost.listen[1], "tcp://:2222/10.0.0.1:22,10.0.0.2:22")
    assert len(gost.forward) == 2
    same(
        gost.forward[0],
        "http+h2://cu:cp@dmz-a.example:443,dmz-b.example:443?strategy=fifo&max_fails=3"
        "&fail_timeout=30s&bypass=internal.corp&secure=true&serverName=dmz.example"
        "&ca=ca.pem&ping=30&host=dmz.example",
    )
    assert gost.forward[0].group == (("dmz-b.example", 443),)
    same(gost.forward[1], "socks5://corp-proxy:3128?bypass=~.corp")


def test_v3_defaults_auto_tcp_and_http_tcp(tmp_path: Path) -> None:
    text = """\
services:
- {name: s, addr: ":8080", handler: {chain: c}}
chains:
- {name: c, hops: [{name: h, nodes: [{name: n, addr: "gw:3128"}]}]}
"""
    gost = load(tmp_path, "gost.yml", text)
    same(gost.listen[0], "auto://:8080")
    same(gost.forward[0], "http://gw:3128")


def test_v3_json_file(tmp_path: Path) -> None:
    config = {
        "services": [
            {
                "name": "s",
                "addr": ":1080",
                "handler": {"type": "socks5", "retries": 3, "metadata": {"notls": False}},
                "listener": {"type": "tcp"},
            }
        ]
    }
    gost = load(tmp_path, "gost.json", json.dumps(config))
    assert gost.source == "v3"
    same(gost.listen[0], "socks5://:1080?retries=3")


def test_v3_keys_are_case_insensitive(tmp_path: Path) -> None:
    text = """\
Services:
- Name: s
  Addr: ":443"
  Handler: {Type: HTTP}
  Listener: {Type: tls, TLS: {certfile: c.pem, KeyFile: k.pem}}
"""
    same(load(tmp_path, "gost.yaml", text).listen[0], "https://:443?cert=c.pem&key=k.pem")


def test_v3_chain_without_services_is_the_chain_for_command_line_services(
    tmp_path: Path,
) -> None:
    text = "chains:\n- {name: c, hops: [{nodes: [{addr: 'gw:1080', connector: {type: socks5}}]}]}\n"
    gost = load(tmp_path, "gost.yaml", text)
    assert gost.listen == []
    same(gost.forward[0], "socks5://gw:1080")


@pytest.mark.parametrize(
    ("bypasses", "refs", "expected"),
    [
        ("[{name: a, whitelist: true, matchers: [x.test, y.test]}]", "bypass: a", "~x.test,y.test"),
        ("[{name: a, reverse: true, matchers: [x.test]}]", "bypass: a", "~x.test"),
        ("[{name: a, matchers: ['*.x.test', '10.0.0.0/8']}]", "bypass: a", "*.x.test,10.0.0.0/8"),
        ("[{name: a, whitelist: true}]", "bypass: a", "~"),
        (
            "[{name: a, whitelist: true, matchers: [x.test]}, "
            "{name: b, whitelist: true, matchers: [y.test]}]",
            "bypasses: [a, b]",
            "~x.test,y.test",
        ),
        (
            "[{name: a, matchers: [x.test]}, {name: b, matchers: [y.test]}]",
            "bypasses: [a, b]",
            "x.test,y.test",
        ),
    ],
)
def test_v3_service_bypass_as_gost_string(
    tmp_path: Path, bypasses: str, refs: str, expected: str
) -> None:
    text = f"services:\n- addr: ':1'\n  {refs}\nbypasses: {bypasses}\n"
    assert load(tmp_path, "gost.yaml", text).listen[0].params["bypass"] == expected


def test_v3_empty_sections_of_unsupported_kinds_are_accepted(tmp_path: Path) -> None:
    text = """\
services:
- addr: ":1"
  interface: ""
  listener: {type: tcp, metadata: {tproxy: false, backlog: 0}}
  metadata: {}
admissions: []
log: {}
limiters:
"""
    same(load(tmp_path, "gost.yaml", text).listen[0], ":1")


# --------------------------------------------------------------------------- round trip


ROUND_TRIPS: list[tuple[list[str], list[str]]] = [
    (["http://:18080"], ["h2://dmz.example:443?ping=30"]),
    (
        [
            "https://127.0.0.1:8443?cert=/c.pem&key=/k.pem&ca=/ca.pem",
            "socks5+h2://:443?path=/tun&max_streams=50",
            ":8080",
            "h2c://:8081",
            "http2://:8082",
            "socks4a://127.0.0.1:1080",
            "tcp://:2222/10.0.0.1:22,10.0.0.2:22",
            "http://[::1]:3128?bypass=~.example.com,10.0.0.0/8&retries=3",
        ],
        [
            "socks5://gw:1080?strategy=fifo&max_fails=2&fail_timeout=5s&timeout=3s",
            "http+tls://gw2:443?ip=10.1.1.1,10.1.1.2:444&secure=true&serverName=gw.test",
            "http2://c:443",
        ],
    ),
    (["socks5://:1080?idle_timeout=30s&readTimeout=5s&proxyAgent=x%20y"], []),
    (["http://:1"], ["socks5://gw:1080?bypass=~internal.test"]),
]


def _roundtrip_nodes(listen_urls: list[str], forward_urls: list[str]) -> tuple[list[Node], ...]:
    listen = [parse_node(u, "listen") for u in listen_urls]
    forward = [parse_node(u, "forward") for u in forward_urls]
    return listen, forward


def _check_roundtrip(gost: GostFile, listen: list[Node], forward: list[Node]) -> None:
    assert len(gost.listen) == len(listen)
    assert len(gost.forward) == len(forward)
    for got, want in zip([*gost.listen, *gost.forward], [*listen, *forward], strict=True):
        assert replace(got, scheme="") == replace(want, scheme=""), (got, want)
        assert (got.kind, got.transport) == (want.kind, want.transport)


@pytest.mark.parametrize(("listen_urls", "forward_urls"), ROUND_TRIPS)
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_roundtrip_of_O_output(
    tmp_path: Path, listen_urls: list[str], forward_urls: list[str], fmt: str
) -> None:
    listen, forward = _roundtrip_nodes(listen_urls, forward_urls)
    config = effective_config(listen, forward)
    text = to_yaml(config) if fmt == "yaml" else json.dumps(config, indent=2)
    _check_roundtrip(load(tmp_path, f"gost.{fmt}", text), listen, forward)


def test_roundtrip_of_O_yaml_from_the_command_line(tmp_path: Path) -> None:
    listen_urls, forward_urls = ROUND_TRIPS[1]
    argv = [a for u in listen_urls for a in ("-L", u)] + [
        a for u in forward_urls for a in ("-F", u)
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pyegress", *argv, "-O", "yaml"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    listen, forward = _roundtrip_nodes(listen_urls, forward_urls)
    _check_roundtrip(load(tmp_path, "gost.yaml", result.stdout), listen, forward)


def test_password_printed_as_stars_by_O_is_refused(tmp_path: Path) -> None:
    listen = [parse_node("http://u:secret@:8080", "listen")]
    text = to_yaml(effective_config(listen, []))
    assert refusal(tmp_path, "gost.yaml", text) == (
        "gost.yaml: services[0].handler.auth.password: is the '***' that -O prints "
        "instead of a password; write the password"
    )


def test_node_auth_with_special_characters(tmp_path: Path) -> None:
    text = """\
services:
- addr: ":1"
  handler: {chain: c}
chains:
- name: c
  hops:
  - nodes:
    - addr: "gw:1080"
      connector: {type: socks5, auth: {username: "us er@x", password: "p:w/?&#%"}}
"""
    gost = load(tmp_path, "gost.yaml", text)
    assert gost.forward[0].user == "us er@x"
    assert gost.forward[0].password == "p:w/?&#%"


# --------------------------------------------------------------------------- not gost


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\nrules: []\n",
        "version: 1\ndefault: deny\ngroups: {Web: [a], web: [b]}\nrules: []\n",
        "rules: []\n",
        "",
        "- a\n- b\n",
        "just text\n",
        "foo: 1\n",
    ],
)
def test_not_a_gost_file_is_left_to_the_policy_loader(tmp_path: Path, text: str) -> None:
    assert load_gost_file(write(tmp_path, "policy.yaml", text)) is None


# --------------------------------------------------------------------------- refusals

V3_CHAIN = "chains:\n- {name: c, hops: [{name: h, nodes: [{name: n, addr: 'gw:1'}]}]}\n"
SVC = "services:\n- addr: ':1'\n"
SVC_C = "services:\n- addr: ':1'\n  handler: {chain: c}\n"

REFUSALS: list[tuple[str, str, str]] = [
    # malformed files: file and line
    (
        "gost.json",
        '{"ServeNodes": [":1"],\n "Debug": tru}',
        "gost.json:2: invalid JSON: Expecting value",
    ),
    (
        "gost.yaml",
        "services:\n- addr: ':1' : x\n",
        "gost.yaml:2: invalid YAML: mapping values are not allowed in this context",
    ),
    (
        "gost.yaml",
        "services: [\n",
        "gost.yaml:2: invalid YAML: did not find expected node content",
    ),
    # gost v2
    (
        "gost.json",
        '{"ServeNodes": [":1"], "Routes": [{}, {}]}',
        (
            "gost.json: Routes: 2 routes: pyegress runs one route (one chain for every "
            "service); run one pyegress per route"
        ),
    ),
    (
        "gost.json",
        '{"ServeNodes": [":1"], "Routes": [{"ServeNodes": [":2"]}]}',
        (
            "gost.json: ServeNodes: with Routes this is a second route: pyegress runs one; "
            "move it into Routes[0]"
        ),
    ),
    (
        "gost.json",
        '{"Retries": 2, "Routes": [{"ServeNodes": [":2"]}]}',
        (
            "gost.json: Retries: with Routes this is a second route: pyegress runs one; move "
            "it into Routes[0]"
        ),
    ),
    (
        "gost.json",
        '{"Routes": [{"ServeNodes": [":2"], "Debug": true}]}',
        "gost.json: Routes[0].Debug: unknown key",
    ),
    (
        "gost.json",
        '{"ServeNodes": [":1"], "Mark": 100}',
        "gost.json: Mark: not supported",
    ),
    (
        "gost.json",
        '{"ServeNodes": [":1"], "Interface": "eth0"}',
        "gost.json: Interface: not supported",
    ),
    (
        "gost.json",
        '{"ServeNodes": [":1"], "Foo": 1}',
        "gost.json: Foo: unknown key",
    ),
    (
        "gost.json",
        '{"ServeNodes": [":1"], "servenodes": [":2"]}',
        "gost.json: servenodes: duplicate key; keys are case-insensitive",
    ),
    (
        "gost.json",
        '{"ServeNodes": ["foo://:1"]}',
        "gost.json: ServeNodes[0]: unknown scheme 'foo' in -L 'foo://:1'",
    ),
    (
        "gost.json",
        '{"ChainNodes": ["socks5://gw:1/x"]}',
        "gost.json: ChainNodes[0]: a -F node takes no path: 'socks5://gw:1/x'",
    ),
    (
        "gost.json",
        '{"ServeNodes": [1]}',
        "gost.json: ServeNodes[0]: must be a string, got 1",
    ),
    (
        "gost.json",
        '{"ServeNodes": ":1"}',
        "gost.json: ServeNodes: must be a list, got ':1'",
    ),
    (
        "gost.json",
        '{"ServeNodes": [":1"], "Retries": -1}',
        "gost.json: Retries: must not be negative, got -1",
    ),
    (
        "gost.json",
        '{"ServeNodes": [":1"], "Retries": "x"}',
        "gost.json: Retries: must be a whole number, got 'x'",
    ),
    (
        "gost.json",
        '{"ServeNodes": [":1"], "Debug": "yes"}',
        "gost.json: Debug: must be true or false, got 'yes'",
    ),
    (
        "gost.json",
        '{"ServeNodes": [":1"], "services": []}',
        "gost.json: services: a gost v3 section in a gost v2 file (it has ServeNodes)",
    ),
    # gost v3: top level
    (
        "gost.yaml",
        SVC + "foo: 1\n",
        "gost.yaml: foo: unknown key",
    ),
    (
        "gost.yaml",
        SVC + "metrics: {addr: ':9000'}\n",
        "gost.yaml: metrics: not supported; use the -metrics flag",
    ),
    (
        "gost.yaml",
        SVC + "log: {level: debug}\n",
        "gost.yaml: log: not supported; use -D for debug logging",
    ),
    (
        "gost.yaml",
        SVC + "tls: {certFile: c.pem}\n",
        "gost.yaml: tls: not supported; set listener.tls on the service",
    ),
    (
        "gost.yaml",
        SVC + "authers: [{name: a}]\n",
        "gost.yaml: authers: not supported; use handler.auth",
    ),
    (
        "gost.yaml",
        SVC + "recorders: [{name: r}]\n",
        "gost.yaml: recorders: not supported; pyegress writes its own audit records",
    ),
    (
        "gost.yaml",
        SVC + "admissions: [{name: x}]\n",
        "gost.yaml: admissions: not supported",
    ),
    (
        "gost.yaml",
        SVC + "resolvers: [{name: x}]\n",
        "gost.yaml: resolvers: not supported",
    ),
    (
        "gost.yaml",
        SVC + "hosts: [{name: x}]\n",
        "gost.yaml: hosts: not supported",
    ),
    (
        "gost.yaml",
        SVC + "ingresses: [{name: x}]\n",
        "gost.yaml: ingresses: not supported",
    ),
    (
        "gost.yaml",
        SVC + "limiters: [{name: x}]\n",
        "gost.yaml: limiters: not supported",
    ),
    (
        "gost.yaml",
        SVC + "climiters: [{name: x}]\n",
        "gost.yaml: climiters: not supported",
    ),
    (
        "gost.yaml",
        SVC + "rlimiters: [{name: x}]\n",
        "gost.yaml: rlimiters: not supported",
    ),
    (
        "gost.yaml",
        SVC + "routers: [{name: x}]\n",
        "gost.yaml: routers: not supported",
    ),
    (
        "gost.yaml",
        SVC + "observers: [{name: x}]\n",
        "gost.yaml: observers: not supported",
    ),
    (
        "gost.yaml",
        SVC + "sds: [{name: x}]\n",
        "gost.yaml: sds: not supported",
    ),
    (
        "gost.yaml",
        SVC + "api: {addr: ':1'}\n",
        "gost.yaml: api: not supported",
    ),
    (
        "gost.yaml",
        SVC + "profiling: {addr: ':1'}\n",
        "gost.yaml: profiling: not supported",
    ),
    (
        "gost.yaml",
        "services: 3\n",
        "gost.yaml: services: must be a list, got '3'",
    ),
    (
        "gost.yaml",
        "services: [3]\n",
        "gost.yaml: services[0]: must be a mapping, got '3'",
    ),
    # services
    (
        "gost.yaml",
        "services:\n- name: s\n",
        "gost.yaml: services[0].addr: missing",
    ),
    (
        "gost.yaml",
        SVC + "  Addr: ':2'\n",
        ("gost.yaml: services[0].Addr: duplicate key (first on line 2); keys are case-insensitive"),
    ),
    (
        "gost.yaml",
        SVC + "  limiter: lim-0\n",
        "gost.yaml: services[0].limiter: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  admission: adm-0\n",
        "gost.yaml: services[0].admission: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  sockopts: {mark: 100}\n",
        "gost.yaml: services[0].sockopts: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  frobnicate: 1\n",
        "gost.yaml: services[0].frobnicate: unknown key",
    ),
    (
        "gost.yaml",
        "services:\n- addr: 'unix:/tmp/x.sock'\n",
        "gost.yaml: services[0].addr: bad address 'unix:/tmp/x.sock' (host:port or :port)",
    ),
    (
        "gost.yaml",
        "services:\n- addr: ':8000-8010'\n",
        "gost.yaml: services[0]: bad port '8000-8010' in 'auto://:8000-8010'",
    ),
    (
        "gost.yaml",
        SVC + "  handler: {type: http, limiter: lim-0}\n",
        "gost.yaml: services[0].handler.limiter: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  handler: {type: http, authers: [a]}\n",
        "gost.yaml: services[0].handler.authers: not supported; use handler.auth",
    ),
    (
        "gost.yaml",
        SVC + "  handler: {type: http, chainGroup: {chains: [a]}}\n",
        "gost.yaml: services[0].handler.chainGroup: not supported; use chain",
    ),
    (
        "gost.yaml",
        SVC + "  handler: {type: ss}\n",
        (
            "gost.yaml: services[0].handler.type: handler 'ss' not supported (auto, forward, "
            "http, http2, red, redir, redirect, relay, sni, socks, socks4, socks4a, socks5, "
            "tcp)"
        ),
    ),
    (
        "gost.yaml",
        SVC + "  listener: {type: kcp}\n",
        (
            "gost.yaml: services[0].listener.type: listener 'kcp' not supported (h2, h2c, "
            "http2, mtls, red, redir, redirect, tcp, tls)"
        ),
    ),
    (
        "gost.yaml",
        SVC + "  listener: {type: tls, tls: {secure: true}}\n",
        "gost.yaml: services[0].listener.tls.secure: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  listener: {type: tls, tls: {options: {minVersion: VersionTLS13}}}\n",
        "gost.yaml: services[0].listener.tls.options: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  listener: {type: tcp, chain: c}\n",
        "gost.yaml: services[0].listener.chain: not supported; use handler.chain",
    ),
    (
        "gost.yaml",
        SVC + "  handler: {auth: {username: u, password: '***'}}\n",
        (
            "gost.yaml: services[0].handler.auth.password: is the '***' that -O prints instead "
            "of a password; write the password"
        ),
    ),
    (
        "gost.yaml",
        SVC + "  handler: {auth: {password: p}}\n",
        "gost.yaml: services[0].handler.auth.username: missing",
    ),
    (
        "gost.yaml",
        SVC + "  handler: {auth: {username: u, password: p, realm: r}}\n",
        "gost.yaml: services[0].handler.auth.realm: unknown key",
    ),
    (
        "gost.yaml",
        SVC + "  handler: {retries: 2, metadata: {retries: 3}}\n",
        (
            "gost.yaml: services[0].handler.metadata.retries: '3' contradicts "
            "services[0].handler.retries: '2'"
        ),
    ),
    (
        "gost.yaml",
        SVC + "  handler: {retries: two}\n",
        "gost.yaml: services[0].handler.retries: must be a whole number, got 'two'",
    ),
    (
        "gost.yaml",
        SVC + "  handler: {auth: {username: u}, metadata: {auth: dTpw}}\n",
        (
            "gost.yaml: services[0].handler.metadata.auth: contradicts handler.auth; give one "
            "of them"
        ),
    ),
    (
        "gost.yaml",
        SVC + "  metadata: {knock: k.example}\n",
        "gost.yaml: services[0].metadata.knock: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  metadata: {probeResist: 'code:404'}\n",
        "gost.yaml: services[0].metadata.probeResist: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  listener: {metadata: {backlog: 128}}\n",
        "gost.yaml: services[0].listener.metadata.backlog: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  handler: {metadata: {header: {X-A: b}}}\n",
        "gost.yaml: services[0].handler.metadata.header: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  metadata: {timeout: [1, 2]}\n",
        "gost.yaml: services[0].metadata.timeout: must be a single value, got ['1', '2']",
    ),
    (
        "gost.yaml",
        SVC + "  metadata: {auth: '***'}\n",
        (
            "gost.yaml: services[0].metadata.auth: is the '***' that -O prints; write "
            "base64(user:pass)"
        ),
    ),
    (
        "gost.yaml",
        SVC + "  metadata: {timeout: 5s, Timeout: 6s}\n",
        (
            "gost.yaml: services[0].metadata.Timeout: duplicate key (first on line 3); keys "
            "are case-insensitive"
        ),
    ),
    (
        "gost.yaml",
        SVC + "  handler: {type: http}\n  forwarder: {nodes: [{addr: 'a:1'}]}\n",
        (
            "gost.yaml: services[0].forwarder: not supported with handler 'http' (only tcp, "
            "forward, relay)"
        ),
    ),
    (
        "gost.yaml",
        SVC + "  handler: {type: tcp}\n  forwarder: {nodes: []}\n",
        "gost.yaml: services[0].forwarder.nodes: missing: name the forward targets",
    ),
    (
        "gost.yaml",
        (
            SVC
            + "  handler: {type: tcp}\n  forwarder: {selector: {strategy: hash}, nodes: [{addr: "
            "'a:1'}]}\n"
        ),
        (
            "gost.yaml: services[0].forwarder.selector.strategy: 'hash' not supported (targets "
            "are used round-robin)"
        ),
    ),
    (
        "gost.yaml",
        SVC + "  handler: {type: tcp}\n  forwarder: {nodes: [{addr: 'a:1', http: {host: x}}]}\n",
        "gost.yaml: services[0].forwarder.nodes[0].http: not supported",
    ),
    # bypasses
    (
        "gost.yaml",
        SVC + "  bypass: nope\n",
        "gost.yaml: services[0].bypass: no bypass named 'nope' in bypasses",
    ),
    (
        "gost.yaml",
        SVC + "bypasses: [{name: b, matchers: [x]}]\n",
        "gost.yaml: bypasses[0]: bypass 'b' is not used",
    ),
    (
        "gost.yaml",
        SVC + "  bypass: b\nbypasses: [{name: b, matchers: [x]}, {name: b}]\n",
        "gost.yaml: bypasses[1].name: bypass 'b' is defined twice",
    ),
    (
        "gost.yaml",
        SVC + "  bypass: b\nbypasses: [{matchers: [x]}]\n",
        "gost.yaml: bypasses[0].name: missing",
    ),
    (
        "gost.yaml",
        SVC + "  bypass: b\nbypasses: [{name: b, file: {path: /x}}]\n",
        "gost.yaml: bypasses[0].file: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  bypass: b\nbypasses: [{name: b, network: udp}]\n",
        "gost.yaml: bypasses[0].network: not supported",
    ),
    (
        "gost.yaml",
        SVC + "  bypass: b\nbypasses: [{name: b, matchers: ['a,b']}]\n",
        "gost.yaml: bypasses[0].matchers[0]: bad matcher 'a,b'",
    ),
    (
        "gost.yaml",
        SVC + "  bypass: b\nbypasses: [{name: b, whitelist: maybe}]\n",
        "gost.yaml: bypasses[0].whitelist: must be true or false, got 'maybe'",
    ),
    (
        "gost.yaml",
        SVC + "  bypasses: [a, b]\nbypasses: [{name: a, whitelist: true}, {name: b}]\n",
        (
            "gost.yaml: services[0].bypasses[1]: mixes whitelist and blacklist bypasses; "
            "pyegress takes one kind per object"
        ),
    ),
    (
        "gost.yaml",
        SVC + "  bypass: a\n  metadata: {bypass: x}\nbypasses: [{name: a}]\n",
        "gost.yaml: services[0].bypass: '' contradicts services[0].metadata.bypass: 'x'",
    ),
    # chains: one for every service
    (
        "gost.yaml",
        SVC_C,
        "gost.yaml: services[0].handler.chain: no chain named 'c'",
    ),
    (
        "gost.yaml",
        SVC + V3_CHAIN,
        "gost.yaml: chains[0]: chain 'c' is not used",
    ),
    (
        "gost.yaml",
        (
            SVC_C + "- addr: ':2'\nchains:\n- {name: c, hops: [{name: h, nodes: [{name: n, addr: "
            "'gw:1'}]}]}\n"
        ),
        (
            "gost.yaml: services[1].handler.chain: missing: pyegress runs one chain for every "
            "service (services[0] uses 'c')"
        ),
    ),
    (
        "gost.yaml",
        (
            SVC_C
            + "- addr: ':2'\n  handler: {chain: d}\nchains:\n- {name: c, hops: [{name: h, nodes: "
            "[{name: n, addr: 'gw:1'}]}]}\n"
        ),
        (
            "gost.yaml: services[1].handler.chain: 'd' differs from 'c' (services[0]): "
            "pyegress runs one chain for every service"
        ),
    ),
    (
        "gost.yaml",
        V3_CHAIN + "- {name: d, hops: [{nodes: [{addr: 'x:1'}]}]}\n",
        "gost.yaml: chains[1]: a second chain: pyegress runs one chain for every service",
    ),
    (
        "gost.yaml",
        SVC_C + V3_CHAIN + "- {name: c, hops: []}\n",
        "gost.yaml: chains[1].name: chain 'c' is defined twice",
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{hops: []}]\n",
        "gost.yaml: chains[0].name: missing",
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: []}]\n",
        "gost.yaml: chains[0].hops: missing: a chain needs at least one hop",
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, selector: {strategy: round}, hops: []}]\n",
        "gost.yaml: chains[0].selector: not supported",
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: [{name: h}]}]\n",
        "gost.yaml: chains[0].hops[0].name: no nodes and no hop named 'h' in hops",
    ),
    (
        "gost.yaml",
        SVC_C + V3_CHAIN + "hops: [{name: spare, nodes: [{addr: 'x:1'}]}]\n",
        "gost.yaml: hops[0]: hop 'spare' is not used",
    ),
    # hops
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: [{name: h, nodes: []}]}]\n",
        "gost.yaml: chains[0].hops[0].nodes: missing: a hop needs at least one node",
    ),
    (
        "gost.yaml",
        (
            SVC_C + "chains: [{name: c, hops: [{selector: {strategy: hash}, nodes: [{addr: 'a:1'}, "
            "{addr: 'b:1'}]}]}]\n"
        ),
        (
            "gost.yaml: chains[0].hops[0].selector.strategy: 'hash' not supported (round, "
            "random or fifo)"
        ),
    ),
    (
        "gost.yaml",
        (
            SVC_C
            + "chains: [{name: c, hops: [{selector: {strategy: lowest, maxLatency: 1s}, nodes: "
            "[{addr: 'a:1'}]}]}]\n"
        ),
        "gost.yaml: chains[0].hops[0].selector.maxLatency: not supported",
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: [{resolver: r, nodes: [{addr: 'a:1'}]}]}]\n",
        "gost.yaml: chains[0].hops[0].resolver: not supported",
    ),
    (
        "gost.yaml",
        (
            SVC_C
            + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1'}, {addr: 'b:1', connector: {type: "
            "socks5}}]}]}]\n"
        ),
        (
            "gost.yaml: chains[0].hops[0].nodes[1]: differs from chains[0].hops[0].nodes[0] in "
            "connector/dialer type: the nodes of a hop share everything but addr in pyegress"
        ),
    ),
    (
        "gost.yaml",
        (
            SVC_C
            + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1'}, {addr: 'b:1', connector: {auth: "
            "{username: u}}}]}]}]\n"
        ),
        (
            "gost.yaml: chains[0].hops[0].nodes[1]: differs from chains[0].hops[0].nodes[0] in "
            "connector.auth: the nodes of a hop share everything but addr in pyegress"
        ),
    ),
    (
        "gost.yaml",
        (
            SVC_C
            + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1'}, {addr: 'b:1', metadata: {ping: "
            "30}}]}]}]\n"
        ),
        (
            "gost.yaml: chains[0].hops[0].nodes[1]: differs from chains[0].hops[0].nodes[0] in "
            "parameters: the nodes of a hop share everything but addr in pyegress"
        ),
    ),
    (
        "gost.yaml",
        (
            SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', bypass: b}, {addr: "
            "'b:1'}]}]}]\nbypasses: [{name: b}]\n"
        ),
        (
            "gost.yaml: chains[0].hops[0].nodes[0].bypass: not supported on one node of "
            "several; set it on the hop"
        ),
    ),
    (
        "gost.yaml",
        (
            SVC_C + "chains: [{name: c, hops: [{bypass: b, nodes: [{addr: 'a:1', bypass: "
            "b}]}]}]\nbypasses: [{name: b}]\n"
        ),
        (
            "gost.yaml: chains[0].hops[0].nodes[0].bypass: the hop has a bypass already "
            "(chains[0].hops[0].bypass)"
        ),
    ),
    # chain nodes
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: [{nodes: [{name: n}]}]}]\n",
        "gost.yaml: chains[0].hops[0].nodes[0].addr: missing",
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', connector: {type: ss}}]}]}]\n",
        (
            "gost.yaml: chains[0].hops[0].nodes[0].connector.type: connector 'ss' not "
            "supported (auto, direct, forward, http, http2, relay, socks, socks4, socks4a, "
            "socks5)"
        ),
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', dialer: {type: wss}}]}]}]\n",
        (
            "gost.yaml: chains[0].hops[0].nodes[0].dialer.type: dialer 'wss' not supported "
            "(h2, h2c, http2, mtls, tcp, tls)"
        ),
    ),
    (
        "gost.yaml",
        (
            SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', dialer: {type: tls, tls: "
            "{options: {alpn: [h2]}}}}]}]}]\n"
        ),
        "gost.yaml: chains[0].hops[0].nodes[0].dialer.tls.options: not supported",
    ),
    (
        "gost.yaml",
        (
            SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', dialer: {type: tls, tls: "
            "{secure: sometimes}}}]}]}]\n"
        ),
        (
            "gost.yaml: chains[0].hops[0].nodes[0].dialer.tls.secure: must be true or false, "
            "got 'sometimes'"
        ),
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', tls: {secure: true}}]}]}]\n",
        "gost.yaml: chains[0].hops[0].nodes[0].tls: not supported; use dialer.tls",
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', interface: eth0}]}]}]\n",
        "gost.yaml: chains[0].hops[0].nodes[0].interface: not supported",
    ),
    (
        "gost.yaml",
        (
            SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', connector: {tls: {secure: "
            "true}}}]}]}]\n"
        ),
        "gost.yaml: chains[0].hops[0].nodes[0].connector.tls: not supported; use dialer.tls",
    ),
    (
        "gost.yaml",
        (
            SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', dialer: {auth: {username: "
            "u}}}]}]}]\n"
        ),
        ("gost.yaml: chains[0].hops[0].nodes[0].dialer.auth: not supported; use connector.auth"),
    ),
    (
        "gost.yaml",
        (
            SVC_C
            + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', dialer: {metadata: {keepalive: "
            "true}}}]}]}]\n"
        ),
        "gost.yaml: chains[0].hops[0].nodes[0].dialer.metadata.keepalive: not supported",
    ),
    (
        "gost.yaml",
        (
            SVC_C
            + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1', connector: {auth: {username: u, "
            "password: '***'}}}]}]}]\n"
        ),
        (
            "gost.yaml: chains[0].hops[0].nodes[0].connector.auth.password: is the '***' that "
            "-O prints instead of a password; write the password"
        ),
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a:1/x'}]}]}]\n",
        ("gost.yaml: chains[0].hops[0].nodes[0].addr: bad address 'a:1/x' (host:port or :port)"),
    ),
    (
        "gost.yaml",
        SVC_C + "chains: [{name: c, hops: [{nodes: [{addr: 'a'}]}]}]\n",
        "gost.yaml: chains[0].hops[0]: missing port in 'http://a'",
    ),
]


@pytest.mark.parametrize(("name", "text", "message"), REFUSALS)
def test_refusal_names_file_and_key(tmp_path: Path, name: str, text: str, message: str) -> None:
    assert refusal(tmp_path, name, text) == message


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read: No such file"):
        load_gost_file(missing)
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"services:\n- addr: '\xe9:1'\n")
    with pytest.raises(ConfigError) as info:
        load_gost_file(path)
    assert str(info.value) == f"{path}:2: not UTF-8"


# --------------------------------------------------------------------------- live


def _start(pyegress: PyegressFactory, config: Path, *ports: int) -> Any:
    proc = pyegress(["-C", str(config)], nports=0)
    for port in ports:
        try:
            wait_port("127.0.0.1", port, 15)
        except TimeoutError:
            raise AssertionError(f"pyegress -C did not start:\n{proc.output()}") from None
    return proc


def _echo_through(port: int, target: str) -> None:
    sock, head = http_connect(("127.0.0.1", port), target, timeout=5)
    with sock:
        assert head.startswith(b"HTTP/1.1 200 "), head
        sock.sendall(b"ECHO\nhello")
        assert recv_exact(sock, 5) == b"hello"


def _refused_status(port: int, target: str) -> bytes:
    sock, head = http_connect(("127.0.0.1", port), target, timeout=10)
    sock.close()
    return head.split(b"\r\n", 1)[0]


def test_live_gost_v2_json_file(
    pyegress: PyegressFactory, tcp_origin: TcpOrigin, tmp_path: Path
) -> None:
    hop = pyegress(["-L", "socks5://hu:hp@127.0.0.1:{0}"])
    entry_port = free_port()
    config = write(
        tmp_path,
        "gost.json",
        json.dumps(
            {
                "Debug": True,
                "Retries": 2,
                "ServeNodes": [f"http://127.0.0.1:{entry_port}"],
                "ChainNodes": [f"socks5://hu:hp@127.0.0.1:{hop.ports[0]}"],
            }
        ),
    )
    entry = _start(pyegress, config, entry_port)
    target = f"127.0.0.1:{tcp_origin.port}"
    _echo_through(entry_port, target)
    # The tunnel went through the file's chain: without the hop it fails.
    hop.stop()
    assert not _refused_status(entry_port, target).startswith(b"HTTP/1.1 200"), entry.output()
    assert entry.proc.poll() is None, entry.output()


def test_live_gost_v3_yaml_file(
    pyegress: PyegressFactory, tcp_origin: TcpOrigin, tmp_path: Path
) -> None:
    hop = pyegress(["-L", "http://hu:hp@127.0.0.1:{0}"])
    http_port, forward_port = free_port(), free_port()
    config = write(
        tmp_path,
        "gost.yaml",
        f"""\
services:
- name: sidecar
  addr: "127.0.0.1:{http_port}"
  bypass: blocked
  handler:
    type: http
    chain: chain-0
    metadata: {{proxyAgent: gost-file-test}}
  listener: {{type: tcp}}
- name: origin-forward
  addr: "127.0.0.1:{forward_port}"
  handler: {{type: tcp, chain: chain-0}}
  listener: {{type: tcp}}
  forwarder:
    nodes: [{{name: origin, addr: "127.0.0.1:{tcp_origin.port}"}}]
chains:
- name: chain-0
  hops:
  - name: hop-0
    nodes:
    - name: exit
      addr: "127.0.0.1:{hop.ports[0]}"
      connector: {{type: http, auth: {{username: hu, password: hp}}}}
      dialer: {{type: tcp}}
bypasses:
- name: blocked
  matchers: [blocked.test, "*.blocked.test"]
""",
    )
    entry = _start(pyegress, config, http_port, forward_port)
    target = f"127.0.0.1:{tcp_origin.port}"
    _echo_through(http_port, target)
    # The service bypass (a blacklist) refuses before dialing.
    assert _refused_status(http_port, "blocked.test:443").startswith(b"HTTP/1.1 403"), (
        entry.output()
    )
    # The forwarder service reaches its target through the same chain.
    with socket.create_connection(("127.0.0.1", forward_port), timeout=5) as sock:
        sock.sendall(b"ECHO\nabc")
        assert recv_exact(sock, 3) == b"abc"
    hop.stop()
    assert not _refused_status(http_port, target).startswith(b"HTTP/1.1 200"), entry.output()


def test_live_gost_file_refusal_is_one_line_on_stderr(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "gost.yaml",
        "services:\n- addr: ':0'\n  handler: {type: http, limiter: lim-0}\n",
    )
    result = subprocess.run(
        [sys.executable, "-m", "pyegress", "-C", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 2, result
    assert result.stderr == (
        f"pyegress: error: {config}: services[0].handler.limiter: not supported\n"
    )


def test_a_pyegress_policy_with_tls_and_limits_sections_is_not_a_gost_file() -> None:
    from pyegress.config.gostfile import parse_gost_config

    text = "version: 1\ntls: {sni: strict}\nlimits: {max_tunnels: 5}\nrules: []\n"
    assert parse_gost_config(text, "policy.yaml") is None
