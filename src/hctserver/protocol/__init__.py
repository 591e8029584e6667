"""The replication protocol and its extensions: messages and session rules,
pure (no sockets, no threads)."""
