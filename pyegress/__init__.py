"""pyegress: a gost-compatible egress proxy for closed-network Kubernetes."""

__version__ = "0.1.0"
