"""Sockets, TLS, the HTTP endpoint and task groups."""
