"""Transparent mode (redirect listener, original destination, firewall rules): to come."""
