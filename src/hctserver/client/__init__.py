"""Clients of a node: the DB-API 2.0 driver, its local and network backends,
the SQLAlchemy dialect and write forwarding from a follower to its leader."""
