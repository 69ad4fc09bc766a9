"""Sans-IO wire-format parsers and renderers: HTTP/1.x heads and body framing, SOCKS4/4a,
SOCKS5 and host:port text. Pure functions over bytes; no sockets, no event loop."""
