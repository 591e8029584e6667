"""``hctserver top``: a live view of running nodes, from their ``/status``.

:func:`view` turns status documents into one table (the demo draws the
same table from its leader's document); :func:`run_top` polls URLs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..errors import AuthError, HctError
from ..net.httpserver import fetch


class Rates:
    """Commits (or applied entries) per second, from successive documents."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}

    def rate(self, key: str, value: int, now: float) -> float | None:
        prev = self._last.get(key)
        self._last[key] = (now, value)
        if prev is None or now <= prev[0]:
            return None
        return max(0.0, (value - prev[1]) / (now - prev[0]))


def _n(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def view(
    docs: Sequence[tuple[str, dict[str, Any] | str]], rates: Rates, title: str = "hctserver top"
) -> Table:
    """One row per node (a string instead of a document: why it is missing),
    then one row per follower its leader reports (lag from the leader's view)."""
    now = time.monotonic()
    t = Table(title=title)
    for col in ("node", "role", "state", "cid", "commits/s", "lag (cids)", "lag (ms)", "note"):
        t.add_column(col, justify="left" if col in ("node", "role", "state", "note") else "right")
    for name, doc in docs:
        if isinstance(doc, str):
            t.add_row(name, "?", "unreachable", "", "", "", "", escape(doc))
            continue
        role = doc["role"]
        if "version" not in doc:  # a cluster node between roles (an election)
            t.add_row(name, role, doc.get("cluster", {}).get("role", ""), "", "", "", "",
                      "neither leading nor following")  # fmt: skip
            continue
        if role == "leader":
            counter, lag_c, lag_ms = "commits", None, None
            reporting = sum(1 for f in doc["followers"] if f["feedback"])
            note = f"{len(doc['followers'])} follower(s), {reporting} reporting"
        else:
            counter, lag_c, lag_ms = "applied_entries", doc["lag_cids"], doc["lag_ms"]
            c = doc["catchup"]
            note = f"leader {doc['leader']}"
            if doc["state"] == "catching up" and c["total"]:
                eta = f", ETA {c['eta_s']:.0f} s" if c["eta_s"] is not None else ""
                note = f"catch-up {c['done']:,}/{c['total']:,}{eta}"
        r = rates.rate(name, doc[counter], now)
        t.add_row(name, role, doc["state"], _n(doc["snapshot"]), _n(r), _n(lag_c), _n(lag_ms), note)
        for f in doc["followers"] if role == "leader" else ():
            t.add_row(
                f"  └ {escape(f['name'] or f['address'])}",  # a peer's text: not markup
                "follower",
                "reporting" if f["feedback"] else "no feedback",
                _n(f["applied_cid"]),
                "",
                _n(f["lag_cids"]),
                _n(f["lag_ms"]),
                f"streams {len(f['streams'])}, queued {f['queued_bytes']:,} B",
            )
    return t


def _status_url(url: str) -> str:
    base = url if "://" in url else f"http://{url}"
    return base.rstrip("/") + ("" if base.rstrip("/").endswith("/status") else "/status")


def read_status(
    url: str, timeout: float = 5.0, token: bytes | None = None, ca: str | None = None
) -> dict[str, Any]:
    """A running node's ``/status`` (``url``: its HTTP address; ``token``:
    its bearer token; ``ca``: the CA that signed an https endpoint's certificate)."""
    code, body = fetch(_status_url(url), timeout, token, ca)
    if code == 401:
        raise AuthError(f"{url}: HTTP 401: give the node's bearer token (--token-file)")
    if code == 429:
        raise AuthError(
            f"{url}: HTTP 429: too many wrong tokens from this address; wait a minute and"
            " retry with the right --token-file"
        )
    if code != 200:
        raise HctError(f"{url}: HTTP {code}: {body[:200].decode(errors='replace')}")
    doc: dict[str, Any] = json.loads(body)
    return doc


def _short(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def _poll(
    urls: Sequence[str], token: bytes | None, ca: str | None
) -> list[tuple[str, dict[str, Any] | str]]:
    out: list[tuple[str, dict[str, Any] | str]] = []
    for u in urls:
        try:
            out.append((_short(u), read_status(u, 2.0, token, ca)))
        except (HctError, ValueError) as e:
            out.append((_short(u), str(e)))
    return out


def run_top(
    urls: Sequence[str],
    interval: float = 1.0,
    count: int = 0,
    token: bytes | None = None,
    ca: str | None = None,
) -> int:
    """Refresh every ``interval`` seconds, ``count`` times (0: until Ctrl-C).
    Exits 0, or 6 if no node could be read at the last refresh."""
    console = Console()
    if not console.is_terminal:  # a log or a pipe: do not squeeze the columns
        console = Console(width=200)
    rates = Rates()
    n = 0
    docs = _poll(urls, token, ca)
    live = (
        Live(view(docs, rates), console=console, auto_refresh=False)
        if console.is_terminal
        else None
    )
    try:
        if live is not None:
            live.start()
        while True:
            n += 1
            table = view(docs, rates)
            if live is not None:
                live.update(table, refresh=True)
            else:
                console.print(table)
            if count and n >= count:
                break
            time.sleep(interval)
            docs = _poll(urls, token, ca)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return 0 if any(not isinstance(d, str) for _, d in docs) else 6
