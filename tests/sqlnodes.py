"""Nodes in this process that serve SQL clients over HTTP (``POST /v2/pipeline``
on a loopback ``--http`` endpoint), for the driver's and the dialect's tests."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

from hctserver.node.config import HttpOptions, NodeConfig
from hctserver.node.testserver import Node

from helpers import wait_until

CONFIG = dataclasses.replace(NodeConfig(), http=HttpOptions("127.0.0.1:0"))


def url_of(node: Node) -> str:
    url = node.http_url
    assert url is not None, "the node has no HTTP endpoint"
    return url


@contextlib.contextmanager
def leader(path: str | os.PathLike[str]) -> Iterator[Node]:
    """A leader node on a new database at ``path``, its HTTP endpoint on a
    free loopback port; stopped (database closed) when the block ends."""
    node = Node(path, port=0, config=CONFIG)
    try:
        node.start()
        yield node
    finally:
        node.close()


def caught_up(follower: Node, lead: Node) -> bool:
    """Whether ``follower`` has applied everything ``lead`` committed."""
    return os.path.exists(follower.db.path) and follower.db.snapshot() >= lead.db.snapshot()


@contextlib.contextmanager
def cluster(directory: Path, followers: int = 2) -> Iterator[tuple[Node, list[Node]]]:
    """A leader and ``followers`` followers of it (each a new database in
    ``directory``), once every follower has caught up and learned where the
    leader serves SQL clients (so that it can forward writes)."""
    nodes: list[Node] = []
    try:
        lead = Node(directory / "leader.db", port=0, config=CONFIG)
        nodes.append(lead)
        lead.start()
        for i in range(followers):
            f = Node(
                directory / f"follower{i}.db",
                follower=True,
                port=lead.port,
                config=CONFIG,
                once=False,
            )
            nodes.append(f)
            f.start()
        fs = nodes[1:]

        def ready() -> bool:
            for f in fs:
                st = f.db.gate.state()
                if st is None or not st.client or not caught_up(f, lead):
                    return False
            return True

        wait_until(ready, 30, "the followers to catch up and learn the leader's client URL")
        yield lead, fs
    finally:
        for node in reversed(nodes):
            node.close()
