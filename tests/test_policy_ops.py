"""Operator commands on a policy: ``policy replay`` (and ``check --replay``) and
``policy lint``: exact output, exit codes, and agreement of replay with ``judge``."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyegress.errors import PyegressError
from pyegress.policy.cli import main
from pyegress.policy.enforce import judge
from pyegress.policy.lint import lint
from pyegress.policy.loader import parse_policy
from pyegress.policy.replay import SCHEMA, Counts, Outcome, Replayer, replay_lines
from pyegress.policy.resolve import Address
from pyegress.policy.rules import Policy, Request

ROOT = Path(__file__).resolve().parent.parent
SHOP = "spiffe://c/ns/shop/sa/web"
CI = "spiffe://c/ns/ci/sa/runner"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyegress", "policy", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


# --------------------------------------------------------------------------------------
# lint


def _lint(text: str) -> list[str]:
    return [str(w) for w in lint(parse_policy(text, "policy.yaml"), text, "policy.yaml")]


def test_lint_w001_allow_rule_under_a_deny_rule_in_any_order() -> None:
    text = """\
version: 1
rules:
  - id: b
    allow: [api.corp.example]
  - id: a
    deny: [".corp.example"]
  - id: c
    allow: ["10.0.0.0/8"]
    private: [private]
  - id: d
    deny: ["10.0.0.0/9", "10.128.0.0/9"]
"""
    assert _lint(text) == [
        "policy.yaml:3: W001 rule 'b' is shadowed by deny rule 'a' "
        "(every destination it allows is denied)",
        "policy.yaml:7: W001 rule 'c' is shadowed by deny rule 'd' "
        "(every destination it allows is denied)",
    ]


def test_lint_w001_needs_every_port_and_identity() -> None:
    text = """\
version: 1
groups:
  shop: ["spiffe://c/ns/shop/sa/web"]
rules:
  - id: a
    deny: [".corp.example"]
    identities: [shop]
  - id: b
    allow: [api.corp.example]
  - id: c
    deny: ["api2.corp.example:443"]
  - id: d
    allow: [api2.corp.example]
    ports: [443, 8443]
"""
    # 'b' still allows other identities; 'd' still allows 8443 (that is W008).
    assert _lint(text) == [
        "policy.yaml:13: W008 rule 'd' allows 'api2.corp.example' on ports 443,8443 but "
        "deny rule 'c' closes 443 there",
    ]


def test_lint_w002_unreachable_after_earlier_allow_rules() -> None:
    text = """\
version: 1
groups:
  shop: ["spiffe://c/ns/shop/sa/web"]
rules:
  - id: all
    allow: [".corp.example"]
    ports: [443, 8443]
  - id: shop-api
    allow: ["*.api.corp.example"]
    identities: [shop]
  - id: mixed
    allow: ["x.other.example", "*.corp.example"]
  - id: no-x
    deny: [x.other.example]
  - id: later-covers
    allow: ["y.example"]
  - id: broad
    allow: [".example.net", "y.example"]
"""
    assert _lint(text) == [
        "policy.yaml:8: W002 rule 'shop-api' is shadowed by rule 'all' "
        "(every destination it allows is matched by an earlier allow rule or denied)",
        "policy.yaml:11: W002 rule 'mixed' is shadowed by rules 'all', 'no-x' "
        "(every destination it allows is matched by an earlier allow rule or denied)",
    ]


def test_lint_w003_overlapping_allow_rules_with_other_settings() -> None:
    text = """\
version: 1
groups:
  shop: ["spiffe://c/ns/shop/sa/web"]
  ci: ["spiffe://c/ns/ci/sa/runner"]
rules:
  - id: a
    allow: ["*.corp.example"]
    identities: [shop]
  - id: b
    allow: [".api.corp.example", other.example]
    identities: [shop]
    route: proxy
    private: [private]
  - id: c
    allow: [".api.corp.example"]
    identities: [ci]
    route: proxy
  - id: d
    allow: ["10.1.0.0/16:22"]
    private: [private]
  - id: e
    allow: ["10.1.2.0-10.1.2.9"]
    ports: [22, 443]
    private: [loopback, private]
"""
    assert _lint(text) == [
        "policy.yaml:9: W003 rule 'b' overlaps earlier rule 'a' ('.api.corp.example' and "
        "'*.corp.example') with a different route (direct vs proxy) and private "
        "(none vs private); 'a' decides the overlap",
        "policy.yaml:10: W007 pattern '.api.corp.example' in rule 'b' is shadowed by the "
        "broader '*.corp.example' in rule 'a'",
        "policy.yaml:21: W003 rule 'e' overlaps earlier rule 'd' ('10.1.2.0-10.1.2.9' and "
        "'10.1.0.0/16:22') with a different private (private vs loopback,private); "
        "'d' decides the overlap",
    ]


def test_lint_w004_w005_w006_identities() -> None:
    text = """\
version: 1
groups:
  shop:
    - "spiffe://c/ns/shop/sa/web"
    - "spiffe://c/ns/shop/sa/worker"
    - "spiffe://c/ns/shop/sa/web"
  ops:
    - "spiffe://c/ns/ops/sa/admin"
rules:
  - id: a
    allow: [a.example]
    identities:
      - shop
      - "spiffe://c/ns/shop/sa/worker"
      - shop
      - "spiffe://c/ns/ci/sa/runner"
      - "spiffe://c/ns/ci/sa/runner"
"""
    assert _lint(text) == [
        "policy.yaml:6: W004 identity 'spiffe://c/ns/shop/sa/web' is listed twice in "
        "group 'shop' (first on line 4)",
        "policy.yaml:8: W006 identity 'spiffe://c/ns/ops/sa/admin' in group 'ops' is used "
        "by no rule",
        "policy.yaml:14: W005 identity 'spiffe://c/ns/shop/sa/worker' in rule 'a' is "
        "already in group 'shop'",
        "policy.yaml:15: W005 group 'shop' is listed twice in rule 'a' (first on line 13)",
        "policy.yaml:17: W005 identity 'spiffe://c/ns/ci/sa/runner' is listed twice in "
        "rule 'a' (first on line 16)",
    ]


def test_lint_w007_wildcards_under_a_broader_wildcard() -> None:
    text = """\
version: 1
rules:
  - id: a
    allow:
      - "*.a.corp.example"
      - ".corp.example"
      - "b.corp.example"
      - ".corp.example"
  - id: b
    allow: ["*.x.corp.example", "*.corp.example:8443"]
    ports: [8443]
  - id: c
    deny: [".bad.example"]
  - id: d
    deny: ["*.very.bad.example", "*.bad.example:22"]
    report: true
  - id: e
    deny: ["*.very.bad.example"]
"""
    assert _lint(text) == [
        "policy.yaml:5: W007 pattern '*.a.corp.example' in rule 'a' is shadowed by the "
        "broader '.corp.example' in the same rule",
        "policy.yaml:7: W007 pattern 'b.corp.example' in rule 'a' is shadowed by the "
        "broader '.corp.example' in the same rule",
        "policy.yaml:8: W007 pattern '.corp.example' in rule 'a' is shadowed by the "
        "broader '.corp.example' in the same rule",
        "policy.yaml:10: W007 pattern '*.x.corp.example' in rule 'b' is shadowed by the "
        "broader '*.corp.example:8443' in the same rule",
        "policy.yaml:18: W007 pattern '*.very.bad.example' in rule 'e' is shadowed by the "
        "broader '.bad.example' in rule 'c'",
    ]


def test_lint_w008_ports_a_deny_rule_closes() -> None:
    text = """\
version: 1
groups:
  ci: ["spiffe://c/ns/ci/sa/runner"]
rules:
  - id: git
    allow: [github.com, "*.github.com:22"]
    ports: [22, 443]
    identities: [ci]
  - id: no-ssh
    deny: [".github.com:22"]
  - id: others
    deny: ["github.com:443"]
    identities: ["spiffe://c/ns/other/sa/x"]
"""
    # 'others' does not apply to every identity of 'git': no warning for it.
    assert _lint(text) == [
        "policy.yaml:6: W008 rule 'git' allows 'github.com' on ports 22,443 but deny rule "
        "'no-ssh' closes 22 there",
        "policy.yaml:6: W008 rule 'git' allows '*.github.com:22' on ports 22 but deny rule "
        "'no-ssh' closes 22 there",
    ]


def test_lint_the_shipped_policies_are_clean() -> None:
    for name in ("example.yaml", "report-mode.yaml"):
        out = _run("lint", "-C", str(ROOT / "deploy" / "policy" / name))
        assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_lint_command_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nrules:\n  - id: a\n    deny: [x.example]\n  - id: b\n    allow: [x.example]\n"
    )
    out = _run("lint", "-C", str(path))
    assert out.returncode == 1
    assert out.stdout == (
        f"{path}:5: W001 rule 'b' is shadowed by deny rule 'a' "
        "(every destination it allows is denied)\n"
    )
    path.write_text("version: 1\nrules:\n  - id: a\n    allow: ['*.com']\n")
    out = _run("lint", "-C", str(path))
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr == (
        f"pyegress: error: {path}:4: invalid pattern '*.com': a wildcard over a top-level "
        "domain would match too much\n"
    )


# --------------------------------------------------------------------------------------
# replay

OLD = """\
version: 1
groups:
  shop: ["spiffe://c/ns/shop/sa/web"]
rules:
  - id: pypi
    allow: [pypi.org, files.pythonhosted.org]
    identities: [shop]
  - id: partner
    allow: [".partner.example"]
  - id: internal
    allow: [artifacts.corp.example]
    private: [private]
  - id: no-meta
    deny: ["169.254.0.0/16"]
"""

NEW = """\
version: 1
groups:
  shop: ["spiffe://c/ns/shop/sa/web"]
rules:
  - id: pypi
    allow: [pypi.org, files.pythonhosted.org]
    identities: [shop]
  - id: github
    allow: [github.com]
    identities: [shop]
  - id: internal
    allow: [artifacts.corp.example]
  - id: no-meta
    deny: ["169.254.0.0/16"]
"""


def _live(
    policy: Policy,
    identity: str | None,
    host: str,
    port: int,
    answers: tuple[Address, ...],
    have_proxy: bool = False,
) -> dict[str, Any]:
    """The decision record live traffic gets, with ``answers`` as the lookup's result."""
    record: dict[str, Any] = {}

    async def go() -> None:
        with suppress(PyegressError):
            await judge(
                policy,
                record,
                identity,
                host,
                port,
                dns_timeout=1.0,
                self_endpoints=(),
                have_proxy=have_proxy,
                answers=answers,
            )

    asyncio.run(go())
    return record


def _audit(n: int, identity: str | None, host: str, port: int | str, **fields: Any) -> str:
    record = {
        "schema": SCHEMA,
        "event": "decision",
        "ts": f"2026-11-28T12:00:{n:02d}.000000Z",
        "conn_id": f"c{n}",
        "tier": "dmz",
        "mode": "connect",
        "client": {"addr": "10.1.2.3", "port": 50000 + n, "identity": identity, "user": None},
        "requested": {"host": host, "port": port, "name_source": "connect"},
        **fields,
    }
    return json.dumps(record)


def _ip(*texts: str) -> tuple[Address, ...]:
    return tuple(ipaddress.ip_address(t) for t in texts)


def _write_audit(path: Path) -> None:
    old = parse_policy(OLD)
    lines = [
        json.dumps({"event": "listening", "level": "info", "addr": ":8443"}),
        _audit(1, SHOP, "pypi.org", 443, **_live(old, SHOP, "pypi.org", 443, _ip("151.101.0.223"))),
        _audit(
            2,
            SHOP,
            "api.partner.example",
            443,
            **_live(old, SHOP, "api.partner.example", 443, _ip("93.184.216.34")),
        ),
        json.dumps({"schema": SCHEMA, "event": "close", "conn_id": "c2", "ts": "x"}),
        "Traceback (most recent call last):",
        _audit(3, SHOP, "github.com", 443, **_live(old, SHOP, "github.com", 443, ())),
        _audit(
            4,
            None,
            "artifacts.corp.example",
            443,
            **_live(old, None, "artifacts.corp.example", 443, _ip("10.0.0.7")),
        ),
        _audit(
            5,
            SHOP,
            "pypi.org",
            443,
            decision={"action": "deny", "reason": "sni_mismatch", "rule_id": "pypi"},
        ),
        _audit(6, SHOP, "pypi.org", "443", decision={"action": "allow", "reason": "rule_match"}),
        json.dumps({"schema": "other.audit/v9", "event": "decision"}),
        _audit(7, CI, "169.254.169.254", 80, **_live(old, CI, "169.254.169.254", 80, ())),
        "",
        _audit(
            8,
            SHOP,
            "files.pythonhosted.org",
            443,
            decision={"action": "deny", "reason": "dns_timeout", "rule_id": "pypi"},
        ),
        _audit(9, SHOP, "evil\x1b[2J.example", 443, decision={"action": "deny"}),
        _audit(
            10,
            SHOP,
            "pypi.org",
            443,
            decision={"action": "deny", "reason": "dns_error", "rule_id": "pypi"},
            dns={"answers": [], "rejected": [], "result": "nxdomain"},
        ),
        _audit(
            11,
            None,
            "gone.partner.example",
            443,
            decision={"action": "deny", "reason": "dns_error", "rule_id": "partner"},
            dns={"answers": [], "rejected": [], "result": "nxdomain"},
        ),
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def replay_files(tmp_path: Path) -> tuple[Path, Path]:
    new = tmp_path / "new.yaml"
    new.write_text(NEW)
    audit = tmp_path / "audit.jsonl"
    _write_audit(audit)
    return new, audit


CHANGED = [
    "c2 2026-11-28T12:00:02.000000Z spiffe://c/ns/shop/sa/web api.partner.example:443: "
    "allow(rule_match, partner) -> deny(not_in_allowlist)",
    "c3 2026-11-28T12:00:03.000000Z spiffe://c/ns/shop/sa/web github.com:443: "
    "deny(not_in_allowlist) -> allow(rule_match, github) [rules only: no DNS answers recorded]",
    "c4 2026-11-28T12:00:04.000000Z - artifacts.corp.example:443: "
    "allow(rule_match, internal) -> deny(resolved_private, internal)",
    "c11 2026-11-28T12:00:11.000000Z - gone.partner.example:443: "
    "deny(dns_error, partner) -> deny(not_in_allowlist)",
]
SUMMARY = (
    "8 decisions replayed, 4 would change (2 newly denied, 1 newly allowed), "
    "5 lines skipped, 1 not replayable, 2 malformed"
)


def _stderr(audit: Path) -> str:
    return (
        f"pyegress: warning: {audit}:9: malformed decision record: "
        "requested.port must be an integer\n"
        f"pyegress: warning: {audit}:14: malformed decision record: "
        "decision.reason must be a string\n"
    )


def test_replay_lists_changed_tunnels(
    replay_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    new, audit = replay_files
    assert main(["replay", "-C", str(new), str(audit)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [*CHANGED, SUMMARY]
    assert err == _stderr(audit)


def test_replay_show_unchanged(
    replay_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    new, audit = replay_files
    assert main(["replay", "-C", str(new), "--show-unchanged", str(audit)]) == 1
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        "c1 2026-11-28T12:00:01.000000Z spiffe://c/ns/shop/sa/web pypi.org:443: "
        "allow(rule_match, pypi) (unchanged)",
        *CHANGED[:3],
        "c7 2026-11-28T12:00:07.000000Z spiffe://c/ns/ci/sa/runner 169.254.169.254:80: "
        "deny(global_deny, no-meta) (unchanged)",
        "c8 2026-11-28T12:00:08.000000Z spiffe://c/ns/shop/sa/web files.pythonhosted.org:443: "
        "deny(dns_timeout, pypi) (unchanged)",
        "c10 2026-11-28T12:00:10.000000Z spiffe://c/ns/shop/sa/web pypi.org:443: "
        "deny(dns_error, pypi) (unchanged)",
        CHANGED[3],
        SUMMARY,
    ]


def test_replay_json(replay_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    new, audit = replay_files
    assert main(["replay", "-C", str(new), "--json", str(audit)]) == 1
    out, _ = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0] == {
        "line": 3,
        "conn_id": "c2",
        "ts": "2026-11-28T12:00:02.000000Z",
        "identity": SHOP,
        "host": "api.partner.example",
        "port": 443,
        "was": {"action": "allow", "reason": "rule_match", "rule_id": "partner"},
        "now": {"action": "deny", "reason": "not_in_allowlist", "rule_id": None},
        "change": "newly_denied",
        "rules_only": False,
    }
    assert [(r["conn_id"], r["change"], r["rules_only"]) for r in rows[1:3]] == [
        ("c3", "newly_allowed", True),
        ("c4", "newly_denied", False),
    ]
    assert rows[4] == {
        "summary": {
            "replayed": 8,
            "changed": 4,
            "newly_denied": 2,
            "newly_allowed": 1,
            "skipped": 5,
            "not_replayable": 1,
            "malformed": 2,
        },
        "policy_version": parse_policy(NEW).version,
    }
    assert rows[3]["change"] == "changed"
    assert len(rows) == 5


def test_replay_escapes_client_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path / "new.yaml"
    new.write_text(NEW)
    audit = tmp_path / "audit.jsonl"
    decision = {"action": "allow", "reason": "rule_match", "rule_id": "x"}
    audit.write_text(_audit(1, SHOP, "a\x1b[2J.example", 443, decision=decision) + "\n")
    assert main(["replay", "-C", str(new), str(audit)]) == 1
    out, _ = capsys.readouterr()
    assert out.splitlines()[0] == (
        "c1 2026-11-28T12:00:01.000000Z spiffe://c/ns/shop/sa/web a\\x1b[2J.example:443: "
        "allow(rule_match, x) -> deny(malformed_request)"
    )


def test_replay_under_the_recording_policy_changes_nothing(
    replay_files: tuple[Path, Path], tmp_path: Path
) -> None:
    _, audit = replay_files
    old = tmp_path / "old.yaml"
    old.write_text(OLD)
    out = _run("replay", "-C", str(old), str(audit))
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "8 decisions replayed, 0 would change (0 newly denied, 0 newly allowed), "
        "5 lines skipped, 1 not replayable, 2 malformed\n"
    )


def test_replay_command_and_check_alias(replay_files: tuple[Path, Path]) -> None:
    new, audit = replay_files
    for argv in (
        ("replay", "-C", str(new), str(audit)),
        ("check", "-C", str(new), "--replay", str(audit)),
    ):
        out = _run(*argv)
        assert out.returncode == 1
        assert out.stdout.splitlines() == [*CHANGED, SUMMARY]
        assert out.stderr == _stderr(audit)


def test_replay_reads_stdin(replay_files: tuple[Path, Path]) -> None:
    new, audit = replay_files
    out = subprocess.run(
        [sys.executable, "-m", "pyegress", "policy", "replay", "-C", str(new), "-"],
        input=audit.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 1
    assert out.stdout.splitlines()[-1] == SUMMARY


def test_replay_usage_and_config_errors(replay_files: tuple[Path, Path], tmp_path: Path) -> None:
    new, audit = replay_files
    missing = tmp_path / "missing.jsonl"
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\nrules: []\n")
    cases = [
        (
            ("replay", "-C", str(new), str(missing)),
            f"pyegress: error: {missing}: cannot read audit file: No such file or directory\n",
        ),
        (
            ("replay", "-C", str(bad), str(audit)),
            f"pyegress: error: {bad}:1: version must be 1, got int '2'\n",
        ),
        (
            ("replay", "-C", str(new)),
            "pyegress: error: the following arguments are required: AUDIT.jsonl\n",
        ),
        (
            ("check", "-C", str(new), "--replay", str(audit), "--dest", "a.example:443"),
            "pyegress: error: policy check: --replay does not take --dest or --resolve\n",
        ),
        (
            ("check", "-C", str(new)),
            "pyegress: error: policy check: one of --dest HOST:PORT or --replay AUDIT.jsonl\n",
        ),
    ]
    for argv, err in cases:
        out = _run(*argv)
        assert (out.returncode, out.stdout, out.stderr) == (2, "", err), argv


def test_replay_through_the_proxy_keeps_the_proxy() -> None:
    # Recorded via the proxy (no dns): a rule with route: proxy is judged without answers.
    policy = parse_policy(
        "version: 1\nrules:\n  - id: p\n    allow: [a.example]\n    route: proxy\n"
    )
    record = _live(policy, None, "a.example", 443, (), have_proxy=True)
    assert "dns" not in record
    assert record["upstream"] == {"via": "proxy"}
    counts = Counts()
    with Replayer(policy) as replayer:
        (outcome,) = replay_lines(replayer, [_audit(1, None, "a.example", 443, **record)], counts)
    assert isinstance(outcome, Outcome)
    assert (outcome.change, outcome.rules_only) == ("unchanged", False)


# --------------------------------------------------------------------------------------
# replay agrees with judge

_CANDIDATE_A = """\
version: 1
groups:
  shop: ["spiffe://c/ns/shop/sa/web"]
  ci: ["spiffe://c/ns/ci/sa/runner"]
rules:
  - id: api
    allow: [".api.example", "10.0.0.0/8"]
    identities: [shop]
    private: [private]
  - id: web
    allow: ["*.web.example", "web.example:80"]
    ports: [443, 8443]
  - id: git
    allow: [git.example]
    identities: [ci]
    route: proxy
    ports: [22, 443]
  - id: no-nets
    deny: ["10.9.0.0/16", "192.168.0.0/16"]
  - id: try
    deny: [x.web.example]
    report: true
"""

_CANDIDATE_B = """\
version: 1
default: report
groups:
  shop: ["spiffe://c/ns/shop/sa/web"]
rules:
  - id: api
    allow: [".api.example"]
    route: proxy
  - id: web
    allow: [".web.example", "10.0.0.0/8"]
    ports: [80, 443]
    private: [private, loopback]
    identities: [shop]
  - id: git
    allow: [git.example]
    private: [private]
    ports: [22]
  - id: no-lo
    deny: ["127.0.0.0/8", "10.9.0.0/16"]
  - id: no-x
    deny: [x.web.example:8443]
"""

_POLICIES = (parse_policy(_CANDIDATE_A, "a.yaml"), parse_policy(_CANDIDATE_B, "b.yaml"))
_HOSTS = (
    "a.api.example",
    "api.example",
    "x.web.example",
    "y.web.example",
    "web.example",
    "git.example",
    "GIT.example.",
    "other.example",
    "10.9.1.1",
    "10.1.2.3",
    "127.0.0.1",
    "169.254.169.254",
    "::1",
    "a..b",
)
_ANSWERS = (
    "93.184.216.34",
    "10.9.0.5",
    "10.1.1.1",
    "192.168.1.1",
    "127.0.0.1",
    "169.254.169.254",
    "2001:db8::1",
    "2606:4700::1",
    "::ffff:10.9.0.5",
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recorded_by=st.sampled_from(_POLICIES),
    candidate=st.sampled_from(_POLICIES),
    identity=st.sampled_from((None, SHOP, CI, "spiffe://c/ns/other/sa/x")),
    host=st.sampled_from(_HOSTS),
    port=st.sampled_from((22, 80, 443, 8443, 0)),
    answers=st.lists(st.sampled_from(_ANSWERS), max_size=3, unique=True),
    have_proxy=st.booleans(),
)
def test_replay_agrees_with_judge(
    recorded_by: Policy,
    candidate: Policy,
    identity: str | None,
    host: str,
    port: int,
    answers: list[str],
    have_proxy: bool,
) -> None:
    resolved = _ip(*answers)
    then = _live(recorded_by, identity, host, port, resolved, have_proxy)
    now = _live(candidate, identity, host, port, resolved, have_proxy)
    line = _audit(1, identity, host, port, **then)
    counts = Counts()
    with Replayer(candidate, have_proxy=have_proxy) as replayer:
        items = list(replay_lines(replayer, [line], counts))
    if then["decision"]["reason"] == "malformed_request":
        assert (items, counts.not_replayable) == ([], 1)
        return
    (outcome,) = items
    assert isinstance(outcome, Outcome)
    got = (outcome.verdict.action, outcome.verdict.reason, outcome.verdict.rule_id)
    if outcome.rules_only:
        # Recorded without answers, judged direct now: the rules' verdict.
        assert "dns" not in then
        assert "dns" in now
        d = candidate.decide(Request(identity, host.lower().rstrip("."), port))
        assert got == (d.action, d.reason, d.rule_id)
    else:
        live = now["decision"]
        assert got == (live["action"], live["reason"], live["rule_id"])
    if recorded_by is candidate:
        assert outcome.change == "unchanged"
