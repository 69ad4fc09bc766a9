"""The DMZ's judgement of one tunnel: policy decision, resolution with pinning, and the
decision record.

:func:`judge` runs before anything is dialed. It returns where to dial (a pinned IP for a
direct route; the requested name for a route through the corporate proxy, which
resolves it) or raises :class:`Denied` with the reason code. Either way the tunnel's
decision record is filled in; the service writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pyegress.errors import Denied, LocalProtocolError, PyegressError
from pyegress.observe import metrics
from pyegress.policy.literals import canonical, parse_host_literal
from pyegress.policy.patterns import normalize_name, unmap
from pyegress.policy.resolve import Address, pin, resolve
from pyegress.policy.rules import Decision, Policy, Request
from pyegress.protocols.addresses import join_host_port, split_host_port
from pyegress.tunnel import decision_fields


class PolicyDenied(Denied):
    """Refused by policy; ``reason`` is the audit reason code."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class MalformedTarget(LocalProtocolError):
    close_reason = "malformed"


@dataclass(frozen=True, slots=True)
class Route:
    host: str
    port: int
    via_proxy: bool


def _decision_fields(
    policy: Policy, decision: Decision | None, action: str, reason: str, detail: str
) -> dict[str, Any]:
    rule_id = decision.rule_id if decision is not None else None
    return decision_fields(action, reason, rule_id, policy.version, detail)


async def judge(
    policy: Policy,
    record: dict[str, Any],
    identity: str | None,
    host: str,
    port: int,
    *,
    dns_timeout: float,
    self_endpoints: Iterable[tuple[Address, int]],
    have_proxy: bool,
    answers: Sequence[Address] | None = None,
    orig_dst: str | None = None,
) -> Route:
    """Decide, resolve and pin; fill ``record`` (the decision record) on every path.

    ``answers``, when given, stand in for resolving a name (``policy replay`` passes the
    answers an audit record kept); a literal host and a route through the proxy ignore it.

    ``orig_dst`` (``ip:port``) is a transparent tunnel's original destination: once the
    name is resolved, whether that address is among the answers is recorded
    (``dns.orig_dst_match``) and judged by the policy's ``orig_dst_check``: ``strict``
    refuses a mismatch (``orig_dst_mismatch``), ``log`` reports it (``would_deny``),
    ``route_by_name`` only records it. A route through the corporate proxy is resolved
    here for the check only when ``strict`` or ``log`` asks for it.
    """
    try:
        literal = parse_host_literal(host)
    except LocalProtocolError as exc:
        record["decision"] = _decision_fields(policy, None, "deny", "malformed_request", str(exc))
        raise MalformedTarget(str(exc)) from None
    # The name as the policy judges it (lower case, IDNA A-labels): it is also the
    # name dialed or passed to the corporate proxy.
    name = canonical(literal) if literal is not None else normalize_name(host)
    if name is None:
        detail = f"bad host name {host[:80]!r}"
        record["decision"] = _decision_fields(policy, None, "deny", "malformed_request", detail)
        raise MalformedTarget(detail)
    decision = policy.decide(Request(identity=identity, host=name, port=port))
    if decision.action == "deny":
        record["decision"] = _decision_fields(
            policy, decision, "deny", decision.reason, decision.detail
        )
        raise PolicyDenied(f"{name}:{port} refused by policy ({decision.reason})", decision.reason)
    via_proxy = decision.route == "proxy" and have_proxy
    original = _orig_address(orig_dst)
    checking = original is not None and policy.orig_dst_check != "route_by_name"
    if via_proxy and literal is None and not checking:
        # The corporate proxy resolves the name; the DMZ passes it on unresolved.
        record["decision"] = _decision_fields(
            policy, decision, decision.action, decision.reason, decision.detail
        )
        record["upstream"] = {"via": "proxy"}
        return Route(name, port, True)
    try:
        if literal is not None:
            answers = (literal,)
        elif answers is None:
            answers = await resolve(name, port, dns_timeout)
    except PyegressError as exc:
        reason = "dns_timeout" if exc.close_reason == "dns_timeout" else "dns_error"
        record["decision"] = _decision_fields(policy, decision, "deny", reason, str(exc))
        record["dns"] = {"answers": [], "rejected": [], "result": getattr(exc, "result", "error")}
        raise
    pinned = pin(answers, port, decision.private, self_endpoints)
    record["dns"] = {
        "answers": [canonical(a) for a in pinned.answers],
        "rejected": [{"ip": canonical(v.address), "class": v.category} for v in pinned.rejected],
    }
    mismatch = False
    if original is not None:
        matched = original in {unmap(a) for a in answers}
        record["dns"]["orig_dst_match"] = matched
        mismatch = not matched
        if mismatch and policy.orig_dst_check == "strict":
            detail = f"original destination {orig_dst} is not among the answers for {name}"
            record["decision"] = _decision_fields(
                policy, decision, "deny", "orig_dst_mismatch", detail
            )
            raise PolicyDenied(f"{name}:{port} refused: orig_dst_mismatch", "orig_dst_mismatch")
    if via_proxy and literal is None:
        # Checked above; the corporate proxy still resolves the name itself.
        record["decision"] = _decision_fields(
            policy, decision, decision.action, decision.reason, decision.detail
        )
        _report_mismatch(record, policy, mismatch, orig_dst, name)
        record["upstream"] = {"via": "proxy"}
        return Route(name, port, True)
    for verdict in pinned.rejected:
        metrics.address_denied(verdict.category or "reserved")
    refusal = pinned.refusal
    if refusal is not None or pinned.address is None:
        reason = refusal or "dns_error"
        record["decision"] = _decision_fields(policy, decision, "deny", reason, name)
        raise PolicyDenied(f"{name}:{port} refused: {reason}", reason)
    deny_rule = policy.deny_addresses(identity, pinned.address, port)
    if deny_rule is not None:
        record["decision"] = _decision_fields(policy, decision, "deny", "global_deny", deny_rule)
        record["decision"]["rule_id"] = deny_rule
        raise PolicyDenied(f"{name}:{port} resolves into a denied range", "global_deny")
    record["decision"] = _decision_fields(
        policy, decision, decision.action, decision.reason, decision.detail
    )
    _report_mismatch(record, policy, mismatch, orig_dst, name)
    dialed = canonical(pinned.address)
    record["upstream"] = {
        "via": "proxy" if via_proxy else "direct",
        "dialed": join_host_port(dialed, port),
    }
    return Route(dialed, port, via_proxy)


def _orig_address(orig_dst: str | None) -> Address | None:
    if orig_dst is None:
        return None
    try:
        host, _port = split_host_port(orig_dst)
        address = parse_host_literal(host)
    except LocalProtocolError:
        return None
    return unmap(address) if address is not None else None


def _report_mismatch(
    record: dict[str, Any], policy: Policy, mismatch: bool, orig_dst: str | None, name: str
) -> None:
    """``orig_dst_check: log``: an allowed tunnel whose original destination is not
    among the answers is reported as one strict mode would have refused."""
    if not mismatch or policy.orig_dst_check != "log":
        return
    decision = record["decision"]
    decision.update(
        action="report",
        would_deny=True,
        reason="orig_dst_mismatch",
        detail=f"original destination {orig_dst} is not among the answers for {name}"
        " (orig_dst_check: log, not enforced)",
    )


# Close reasons of tunnels that end before a verdict, mapped to decision reason codes.
_FALLBACK_REASONS = {
    "malformed": "malformed_request",
    "handshake_timeout": "malformed_request",
    "auth_failed": "client_auth",
    "unsupported": "protocol_not_allowed",
    "drain": "draining",
    "limit_exceeded": "limit_exceeded",
}


def policy_fallback(t: Any) -> dict[str, Any]:
    """The decision of a tunnel that ended before it was judged."""
    reason = _FALLBACK_REASONS.get(t.reason or "", "malformed_request")
    return decision_fields("deny", reason, None, t.policy_version, t.error or t.reason or "")
