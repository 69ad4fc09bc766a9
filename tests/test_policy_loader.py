"""The policy file loader and the gost bypass mapping (pyegress.policy.loader)."""

from __future__ import annotations

import hashlib
import textwrap
from ipaddress import ip_address
from pathlib import Path

import pytest

from pyegress.errors import ConfigError
from pyegress.policy.loader import from_gost_bypass, load_policy, parse_policy
from pyegress.policy.rules import PRIVATE_CATEGORIES, Policy, Request

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
version: 1                 # required, must be 1
default: deny
groups:
  shop: ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/worker"]
rules:
  - id: pypi
    allow: [pypi.org, files.pythonhosted.org, ".pythonhosted.org"]
    ports: [443]
    identities: [shop, "spiffe://cluster.local/ns/ci/sa/runner"]
    report: false
    route: direct
    private: [loopback, private]
  - id: no-meta
    deny: ["169.254.169.254", "10.0.0.0/8"]
    report: false
  - id: trial/2024:q1_x.y-z
    deny: [new.example]
    report: yes
"""


def test_full_grammar_example_loads() -> None:
    p = parse_policy(GOOD, "good.yaml")
    assert [r.id for r in p.rules] == ["pypi", "no-meta", "trial/2024:q1_x.y-z"]
    pypi, meta, trial = p.rules
    assert pypi.action == "allow"
    assert [x.text for x in pypi.patterns] == [
        "pypi.org",
        "files.pythonhosted.org",
        ".pythonhosted.org",
    ]
    assert pypi.identities == frozenset(
        {
            "spiffe://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/worker",
            "spiffe://cluster.local/ns/ci/sa/runner",
        }
    )
    assert pypi.private == frozenset({"loopback", "private"})
    assert (meta.action, meta.report, meta.identities, meta.ports) == ("deny", False, None, None)
    assert trial.report is True
    assert p.default == "deny"
    d = p.decide(Request("spiffe://cluster.local/ns/shop/sa/worker", "files.pythonhosted.org", 443))
    assert (d.action, d.rule_id, d.private) == ("allow", "pypi", frozenset({"loopback", "private"}))


def test_version_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    data = GOOD.replace("\n", "\r\n").encode()
    path.write_bytes(data)
    p = load_policy(path)
    assert p.version == "sha256:" + hashlib.sha256(data).hexdigest()
    assert load_policy(str(path)).version == p.version
    assert parse_policy(GOOD).version == "sha256:" + hashlib.sha256(GOOD.encode()).hexdigest()
    assert parse_policy(GOOD + "\n").version != parse_policy(GOOD).version


def test_minimal_policy_and_defaults() -> None:
    p = parse_policy("version: 1\nrules: []\n")
    assert p.default == "deny"
    assert p.rules == ()
    for default in ("allow", "report", "deny"):
        assert parse_policy(f"version: 1\ndefault: {default}\nrules: []\n").default == default


def test_ports_forms() -> None:
    p = parse_policy(
        "version: 1\nrules:\n  - id: r\n    allow: [h.test]\n"
        "    ports: [22, '80', 8000-8999, '443-443', 0x1bb]\n"
    )
    assert str(p.rules[0].ports) == "22,80,443,8000-8999"


@pytest.mark.parametrize("path", sorted((ROOT / "deploy" / "policy").glob("*.yaml")))
def test_deploy_examples_load(path: Path) -> None:
    p = load_policy(path)
    assert p.rules
    assert p.version.startswith("sha256:")


def test_deploy_example_has_examples() -> None:
    assert (ROOT / "deploy" / "policy" / "example.yaml").is_file()


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read policy"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\nrules:\n  - id: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml:3: policy is not UTF-8"):
        load_policy(bad)


def _rule(body: str) -> str:
    """A policy whose only rule (starting on line 3) has ``body`` after its id line."""
    return "version: 1\nrules:\n  - id: r\n" + textwrap.indent(textwrap.dedent(body), "    ")


# (policy text, expected line, fragment of the message)
BAD: list[tuple[str, int, str]] = [
    # YAML itself
    ("version: 1\nrules: [\n", 3, "invalid YAML"),
    ("version: 1\n  rules: []\n", 2, "invalid YAML"),
    ("", 1, "empty policy"),
    ("# only a comment\n", 1, "empty policy"),
    ("- a\n- b\n", 1, "the policy must be a mapping"),
    ("version: 1\nrules: []\n---\nversion: 1\n", 3, "invalid YAML"),
    # top level
    ("rules: []\n", 1, "missing 'version: 1'"),
    ("version: 2\nrules: []\n", 1, "version must be 1, got int '2'"),
    ("version: '1'\nrules: []\n", 1, "version must be 1, got str '1'"),
    ("version: 1\n", 1, "missing 'rules:'"),
    ("version: 1\nrules: []\nrulez: []\n", 3, "unknown key 'rulez' in the policy"),
    (
        "version: 1\nversion: 1\nrules: []\n",
        2,
        "duplicate key 'version' in the policy (first on line 1)",
    ),
    ("version: 1\n1: x\nrules: []\n", 2, "keys must be strings"),
    ("version: 1\ndefault: block\nrules: []\n", 2, "invalid default 'block'"),
    ("version: 1\ndefault: [deny]\nrules: []\n", 2, "default must be a string"),
    ("version: 1\nrules:\n", 2, "rules must be a list"),
    ("version: 1\nrules: {a: 1}\n", 2, "rules must be a list"),
    ("version: 1\nrules:\n  - just-a-string\n", 3, "a rule must be a mapping"),
    # groups
    ("version: 1\ngroups: [a]\nrules: []\n", 2, "groups must be a mapping"),
    ("version: 1\ngroups:\n  shop.web: [a:b]\nrules: []\n", 3, "invalid group name 'shop.web'"),
    ("version: 1\ngroups:\n  'a:b': [a:b]\nrules: []\n", 3, "invalid group name 'a:b'"),
    ("version: 1\ngroups:\n  shop: []\nrules: []\n", 3, "group 'shop' is empty"),
    ("version: 1\ngroups:\n  shop: a:b\nrules: []\n", 3, "group 'shop' must be a list"),
    ("version: 1\ngroups:\n  shop:\n    - 42\nrules: []\n", 4, "must be a string, got int '42'"),
    ("version: 1\ngroups:\n  shop: ['']\nrules: []\n", 3, "empty identity"),
    ("version: 1\ngroups:\n  a: [x:y]\n  a: [x:z]\nrules: []\n", 4, "duplicate key 'a' in groups"),
    # rule keys
    ("version: 1\nrules:\n  - allow: [x.test]\n", 3, "rule without 'id'"),
    (_rule("allow: [x.test]\nport: [443]\n"), 5, "unknown key 'port' in a rule"),
    (
        _rule("allow: [x.test]\nallow: [y.test]\n"),
        5,
        "duplicate key 'allow' in a rule (first on line 4)",
    ),
    (
        "version: 1\nrules:\n  - id: no\n    allow: [x.test]\n",
        3,
        "id must be a string, got bool 'no' (quote it",
    ),
    ("version: 1\nrules:\n  - id: 'a b'\n    allow: [x.test]\n", 3, "invalid rule id 'a b'"),
    ("version: 1\nrules:\n  - id: ''\n    allow: [x.test]\n", 3, "invalid rule id ''"),
    (
        "version: 1\nrules:\n  - id: r\n    allow: [x.test]\n  - id: r\n    deny: [y.test]\n",
        5,
        "duplicate rule id 'r' (first on line 3)",
    ),
    (_rule("allow: [x.test]\ndeny: [y.test]\n"), 5, "has both 'allow' and 'deny'"),
    (_rule("deny: [y.test]\nallow: [x.test]\n"), 5, "has both 'allow' and 'deny'"),
    (_rule("ports: [443]\n"), 3, "needs 'allow' or 'deny'"),
    # patterns, with the offending entry's own line
    (_rule("allow: []\n"), 4, "allow is empty"),
    (_rule("allow: x.test\n"), 4, "allow must be a list"),
    (_rule("allow:\n  - ok.test\n  - '*'\n"), 6, "invalid pattern '*': would match every host"),
    (_rule("allow: ['*.']\n"), 4, "invalid pattern '*.'"),
    (_rule("allow: ['.']\n"), 4, "invalid pattern '.'"),
    (_rule("allow: ['*.test']\n"), 4, "top-level domain"),
    (_rule("allow: ['*.com']\n"), 4, "top-level domain"),
    (_rule("allow: ['.com']\n"), 4, "top-level domain"),
    (_rule("allow: ['a.*.test']\n"), 4, "leftmost label"),
    (_rule("allow: ['a*b.com']\n"), 4, "leftmost label"),
    (_rule("allow: ['*example.com']\n"), 4, "leftmost label"),
    (_rule("deny:\n  - a..b.test\n"), 5, "empty label"),
    (_rule(f"deny:\n  - {'x' * 64}.test\n"), 5, "label longer than 63"),
    (_rule(f"deny:\n  - {'.'.join(['abcdefghij'] * 24)}\n"), 5, "longer than 253"),
    (_rule("deny: ['10.0.0.1/8']\n"), 4, "host bits set (the network is 10.0.0.0/8)"),
    (_rule("deny: ['example.test:70000']\n"), 4, "out of range 1-65535"),
    (_rule("deny: ['example.test:90-80']\n"), 4, "empty (low end above high end)"),
    (_rule("deny: [42]\n"), 4, "a deny pattern must be a string, got int '42'"),
    (_rule("deny: [[a.test]]\n"), 4, "must be a string, got a list"),
    # ports
    (_rule("allow: [x.test]\nports: []\n"), 5, "ports is empty"),
    (_rule("allow: [x.test]\nports: 443\n"), 5, "ports must be a list"),
    (
        _rule("allow: [x.test]\nports:\n  - 443\n  - 0\n"),
        7,
        "invalid port '0': port 0 is out of range",
    ),
    (_rule("allow: [x.test]\nports: [65536]\n"), 5, "out of range 1-65535"),
    (_rule("allow: [x.test]\nports: ['443-80']\n"), 5, "empty (low end above high end)"),
    (_rule("allow: [x.test]\nports: [https]\n"), 5, "is not a number"),
    (_rule("allow: [x.test]\nports: [true]\n"), 5, "a port must be a number or 'lo-hi', got bool"),
    (_rule("allow: [x.test]\nports: [1.5]\n"), 5, "got float"),
    (_rule("allow: [x.test]\nports: [-1]\n"), 5, "out of range"),
    # identities
    (_rule("allow: [x.test]\nidentities: [shop]\n"), 5, "unknown group 'shop'"),
    (_rule("allow: [x.test]\nidentities: []\n"), 5, "identities is empty"),
    (_rule("allow: [x.test]\nidentities: spiffe://a/b\n"), 5, "identities must be a list"),
    (_rule("allow: [x.test]\nidentities:\n"), 5, "identities must be a list, e.g. "),
    # report, route, private
    (
        _rule("allow: [x.test]\nreport: true\n"),
        5,
        "report applies to deny rules; use 'default: report'",
    ),
    (_rule("deny: [x.test]\nreport: 'true'\n"), 5, "report must be true or false"),
    (_rule("deny: [x.test]\nroute: proxy\n"), 5, "route applies to allow rules"),
    (_rule("allow: [x.test]\nroute: corp\n"), 5, "invalid route 'corp'"),
    (_rule("allow: [x.test]\nprivate: [metadata]\n"), 5, "'metadata' can never be allowed"),
    (
        _rule("allow: [x.test]\nprivate:\n  - loopback\n  - lan\n"),
        7,
        "unknown address category 'lan'",
    ),
    (_rule("allow: [x.test]\nprivate: loopback\n"), 5, "private must be a list"),
    (_rule("deny: [x.test]\nprivate: [loopback]\n"), 5, "private applies to allow rules"),
]


@pytest.mark.parametrize(("text", "line", "fragment"), BAD)
def test_bad_policies(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "p.yaml")
    message = str(info.value)
    assert message.startswith(f"p.yaml:{line}: "), message
    assert fragment in message, message
    assert "\n" not in message


def test_private_categories_are_one_constant() -> None:
    assert PRIVATE_CATEGORIES == ("private", "loopback", "link_local", "cgnat", "ula", "site_local")
    assert "metadata" not in PRIVATE_CATEGORIES
    for category in PRIVATE_CATEGORIES:
        p = parse_policy(_rule(f"allow: [x.test]\nprivate: [{category}]\n"))
        assert p.rules[0].private == frozenset({category})


def test_undefined_identity_like_references_are_identities() -> None:
    p = parse_policy(
        _rule("allow: [x.test]\nidentities: [web.shop.svc, 'spiffe://a/b', 'CN=x:y', a/b]\n")
    )
    assert p.rules[0].identities == frozenset({"web.shop.svc", "spiffe://a/b", "CN=x:y", "a/b"})


# --------------------------------------------------------------------------------------
# gost bypass


def _verdict(p: Policy, host: str, port: int = 443) -> tuple[str, str, str]:
    d = p.decide(Request(None, host, port))
    return d.action, d.reason, d.route


def test_gost_whitelist_on_a_service() -> None:
    p = from_gost_bypass("~example.com, .ok.test,*.w.test,10.0.0.0/8", service_level=True)
    assert p.default == "deny"
    assert _verdict(p, "example.com") == ("allow", "rule_match", "direct")
    assert _verdict(p, "example.com", 22) == ("allow", "rule_match", "direct")  # any port
    assert _verdict(p, "ok.test", 8080)[0] == "allow"
    assert _verdict(p, "a.ok.test")[0] == "allow"
    assert _verdict(p, "badok.test")[:2] == ("deny", "not_in_allowlist")
    assert _verdict(p, "w.test")[0] == "deny"
    assert _verdict(p, "a.w.test")[0] == "allow"
    assert _verdict(p, "10.1.2.3", 80)[0] == "allow"
    assert _verdict(p, "11.1.2.3")[0] == "deny"


def test_gost_blacklist_on_a_service() -> None:
    p = from_gost_bypass(
        "169.254.169.254,10.0.0.1-10.0.0.9,.internal.test:80-443,ssh.test:22",
        service_level=True,
    )
    assert p.default == "allow"
    assert _verdict(p, "169.254.169.254", 80)[:2] == ("deny", "global_deny")
    assert _verdict(p, "10.0.0.5", 22)[:2] == ("deny", "global_deny")
    assert _verdict(p, "10.0.0.10", 22)[:2] == ("allow", "default_allow")
    assert _verdict(p, "internal.test", 80)[0] == "deny"
    assert _verdict(p, "a.internal.test", 8080)[0] == "allow"  # port outside the range
    assert _verdict(p, "ssh.test", 22)[0] == "deny"
    assert _verdict(p, "ssh.test", 443)[0] == "allow"
    assert p.deny_addresses(None, ip_address("10.0.0.3"), 1) is not None


def test_gost_empty_lists() -> None:
    # pyegress fails closed where gost fails open: an empty whitelist denies everything.
    for value in ("~", "~ , ,", " ~"):
        p = from_gost_bypass(value, service_level=True)
        assert _verdict(p, "example.com")[:2] == ("deny", "not_in_allowlist")
    # An empty blacklist blocks nothing (as in gost).
    assert _verdict(from_gost_bypass("", service_level=True), "example.com")[0] == "allow"
    for value in ("", "~"):
        with pytest.raises(ConfigError, match="empty"):
            from_gost_bypass(value, service_level=False)


def test_gost_hop_level_bypass_routes() -> None:
    # a,b on a hop: matching targets skip the hop (direct), the rest goes through it.
    p = from_gost_bypass(".corp.test,10.0.0.0/8", service_level=False)
    assert _verdict(p, "git.corp.test") == ("allow", "rule_match", "direct")
    assert _verdict(p, "10.1.1.1") == ("allow", "rule_match", "direct")
    assert _verdict(p, "example.com") == ("allow", "default_allow", "proxy")
    # ~a,b on a hop: only matching targets go through the hop.
    p = from_gost_bypass("~.partner.test", service_level=False)
    assert _verdict(p, "api.partner.test") == ("allow", "rule_match", "proxy")
    assert _verdict(p, "example.com") == ("allow", "default_allow", "direct")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("~*", "'*': would match every host"),
        ("a.test,*example.com", "'*example.com'"),
        ("~*.com", "top-level domain"),
        ("10.0.0.1/8", "host bits set"),
        ("~a.test:0", "out of range"),
        ("ex?mple.com", "glob"),
    ],
)
def test_gost_bad_patterns(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_gost_bypass(value, service_level=True)
    assert str(info.value).startswith("bypass: invalid pattern ")
    assert fragment in str(info.value)


def test_gost_versions_differ_by_value_and_level() -> None:
    a = from_gost_bypass("~a.test", service_level=True).version
    b = from_gost_bypass("~a.test", service_level=False).version
    c = from_gost_bypass("a.test", service_level=True).version
    assert len({a, b, c}) == 3
    assert a.startswith("sha256:")
