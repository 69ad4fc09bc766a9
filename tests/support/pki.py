"""The test PKI is the package's own (pyegress.pki): trustme issues no URI SANs."""

from pyegress.pki import CertAuthority, Issued

__all__ = ["CertAuthority", "Issued"]
