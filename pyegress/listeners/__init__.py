"""Listeners: one module per protocol a ``-L`` node can speak to its clients."""
