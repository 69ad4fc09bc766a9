"""Observability: structured logs (and, later, audit records and metrics)."""
