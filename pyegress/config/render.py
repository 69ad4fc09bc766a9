"""The effective configuration in gost v3's shape, for ``pyegress -O json|yaml``.

Passwords are replaced by ``***``: the output is meant to be pasted into tickets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyegress.config.nodes import Node


def _auth(node: Node) -> dict[str, str] | None:
    if node.user is None:
        return None
    return {"username": node.user, "password": "***"}


def _metadata(node: Node) -> dict[str, str]:
    return {k: ("***" if k == "auth" else v) for k, v in sorted(node.params.items())}


def effective_config(listen: Sequence[Node], forward: Sequence[Node]) -> dict[str, Any]:
    services: list[dict[str, Any]] = []
    for i, node in enumerate(listen):
        handler: dict[str, Any] = {"type": node.kind}
        if forward:
            handler["chain"] = "chain-0"
        auth = _auth(node)
        if auth:
            handler["auth"] = auth
        service: dict[str, Any] = {
            "name": f"service-{i}",
            "addr": node.address,
            "handler": handler,
            "listener": {"type": node.transport},
        }
        if node.forward_targets:
            service["forwarder"] = {
                "nodes": [
                    {"name": f"target-{j}", "addr": t} for j, t in enumerate(node.forward_targets)
                ]
            }
        meta = _metadata(node)
        if meta:
            service["metadata"] = meta
        services.append(service)
    config: dict[str, Any] = {"services": services}
    if forward:
        hops = []
        for i, node in enumerate(forward):
            connector: dict[str, Any] = {"type": node.kind}
            auth = _auth(node)
            if auth:
                connector["auth"] = auth
            entry: dict[str, Any] = {
                "name": f"node-{i}",
                "addr": node.address,
                "connector": connector,
                "dialer": {"type": node.transport},
            }
            meta = _metadata(node)
            if meta:
                entry["metadata"] = meta
            hops.append({"name": f"hop-{i}", "nodes": [entry]})
        config["chains"] = [{"name": "chain-0", "hops": hops}]
    return config


def _scalar(value: Any) -> str:
    text = str(value)
    if text == "" or text[0] in "-?:,[]{}#&*!|>'\"%@`" or ": " in text or text != text.strip():
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def to_yaml(value: Any, indent: int = 0) -> str:
    """A small YAML emitter for the nested dicts and lists ``effective_config`` builds."""
    pad = "  " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                out.append(f"{pad}{key}:\n{to_yaml(item, indent + 1)}")
            else:
                out.append(f"{pad}{key}: {_scalar(item)}\n")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                body = to_yaml(item, indent + 1)
                out.append(f"{pad}- {body.lstrip()}")
            else:
                out.append(f"{pad}- {_scalar(item)}\n")
    else:
        out.append(f"{pad}{_scalar(value)}\n")
    return "".join(out)
