"""Destination address policy: the special-purpose address table and IP literal parsing."""
