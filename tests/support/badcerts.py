"""Client certificates that must be refused: expired ones, and a CRL revoking one.

:class:`tests.support.pki.CertAuthority` issues certificates valid from an hour ago;
these helpers sign with the same authority's key but choose the validity window, and
write a CRL (PEM) naming revoked serial numbers.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.pki import CertAuthority, Issued


def issue_client(
    authority: CertAuthority,
    name: str,
    uri: str,
    *,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> tuple[Issued, int]:
    """A client certificate with SAN URI ``uri`` valid from ``not_before`` to
    ``not_after``; the files and the serial number."""
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(authority.key, hashes.SHA256())
    )
    out = Issued(authority.dir / f"{name}.pem", authority.dir / f"{name}.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    out.key.chmod(0o600)
    return out, serial


def expired_client(authority: CertAuthority, name: str, uri: str) -> Issued:
    """Valid for ten days, ending yesterday."""
    now = datetime.datetime.now(datetime.UTC)
    issued, _ = issue_client(
        authority,
        name,
        uri,
        not_before=now - datetime.timedelta(days=11),
        not_after=now - datetime.timedelta(days=1),
    )
    return issued


def write_crl(authority: CertAuthority, path: Path, revoked: list[int]) -> Path:
    """A CRL from ``authority`` revoking the serial numbers ``revoked``."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=1))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - datetime.timedelta(minutes=1))
            .build()
        )
    crl = builder.sign(authority.key, hashes.SHA256())
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path
