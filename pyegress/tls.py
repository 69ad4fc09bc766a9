"""TLS contexts from node parameters, generated certificates, and peer identities.

Server side (``-L h2://``, ``tls://``, ``https://``): ``cert``/``key`` name the server
certificate; without them a self-signed one is generated at start (with a loud warning,
as gost does). ``ca`` requires and verifies client certificates (mutual TLS).

Client side (``-F h2://`` and the other TLS dialers): ``cert``/``key`` present a client
certificate; ``ca`` verifies the server against that CA *and* checks its name (gost checks
the chain only; an egress exit is worth the stricter default); ``secure=true`` verifies
against the system store; with neither the server is not verified, as in gost, and
pyegress warns at startup. ``serverName`` sets SNI and the name checked.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

from pyegress.config.nodes import Node
from pyegress.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ClientTLS:
    context: ssl.SSLContext
    server_hostname: str | None
    verified: bool


def generate_self_signed(common_name: str = "pyegress") -> tuple[bytes, bytes]:
    """A fresh RSA-2048 self-signed certificate and key, PEM encoded."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def _load_pem_pair(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="pyegress-") as tmp:
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert_path, key_path)


def _load_chain(ctx: ssl.SSLContext, node: Node, cert: str, key: str | None) -> None:
    try:
        ctx.load_cert_chain(cert, key or None)
    except FileNotFoundError as exc:
        raise ConfigError(f"{node.redacted()}: cannot read {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{node.redacted()}: bad certificate or key {cert!r}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, node: Node, ca: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise ConfigError(f"{node.redacted()}: cannot read ca {ca!r}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{node.redacted()}: bad ca file {ca!r}: {exc}") from None


def server_context(node: Node, alpn: list[str] | None, warn: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = node.param("cert"), node.param("key")
    if cert:
        _load_chain(ctx, node, cert, key)
    else:
        cert_pem, key_pem = generate_self_signed()
        _load_pem_pair(ctx, cert_pem, key_pem)
        warn(
            "self_signed_certificate",
            node=node.redacted(),
            detail="no cert= given: serving a generated self-signed certificate; "
            "clients cannot verify this server",
        )
    ca = node.param("ca")
    if ca:
        _load_ca(ctx, node, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    crl = node.param("crl")
    if crl:
        if not ca:
            raise ConfigError(f"{node.redacted()}: crl= needs ca= (client certificates)")
        _load_crl(ctx, node, crl)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _load_crl(ctx: ssl.SSLContext, node: Node, crl: str) -> None:
    """Refuse client certificates revoked by the CRL in ``crl`` (PEM; re-read on
    SIGHUP with the other TLS files). Only the leaf is checked: the CRL is the issuing
    CA's."""
    try:
        with open(crl, encoding="ascii") as handle:
            text = handle.read()
        if "-----BEGIN X509 CRL-----" not in text:
            raise ConfigError(f"{node.redacted()}: crl {crl!r} holds no PEM X509 CRL")
        ctx.load_verify_locations(cafile=crl)  # OpenSSL's file lookup takes CRLs too
    except (FileNotFoundError, UnicodeDecodeError):
        raise ConfigError(f"{node.redacted()}: cannot read crl {crl!r}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{node.redacted()}: bad crl file {crl!r}: {exc}") from None
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def client_context(node: Node, alpn: list[str] | None) -> ClientTLS:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    server_name = node.param("server_name") or node.host or None
    ca = node.param("ca")
    secure = node.flag("secure", False)
    if ca:
        _load_ca(ctx, node, ca)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif secure:
        ctx.load_default_certs()
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert = node.param("cert")
    if cert:
        _load_chain(ctx, node, cert, node.param("key"))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ClientTLS(ctx, server_name, verified=bool(ca or secure))


def identity_from_peercert(peercert: Any) -> str | None:
    """The client identity of a verified certificate: SAN URI, else SAN DNS, else CN."""
    if not peercert:
        return None
    sans = peercert.get("subjectAltName", ())
    for kind in ("URI", "DNS"):
        for key, value in sans:
            if key == kind:
                return str(value)
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def transport_identity(transport: Any) -> str | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    try:
        return identity_from_peercert(ssl_object.getpeercert())
    except ValueError:
        return None


def handshake_failure(exc: BaseException) -> str:
    """A failed TLS handshake as a ``pyegress_tls_handshakes_total`` result label:
    ``expired``, ``revoked``, ``no_cert``, ``bad_cert``, ``version`` or ``error``."""
    text = f"{getattr(exc, 'reason', '') or ''} {exc}".lower()
    if "expired" in text:
        return "expired"
    if "revoked" in text:
        return "revoked"
    if "did_not_return_a_certificate" in text or "certificate required" in text:
        return "no_cert"
    if "certificate" in text or "unknown ca" in text:
        return "bad_cert"
    if "version" in text or "protocol" in text:
        return "version"
    return "error"
