"""Where the archive's objects live: a small object-store interface, the
directory backend (``file:///path``) and a registry of URL schemes.

A backend for another scheme registers a factory with :func:`register_scheme`;
:func:`open_store` finds it. ``s3://`` is registered here, and its module
(:mod:`hctserver.journal.archive_s3`, boto3) imported only when one is opened.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Protocol
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
from .archive_format import ObjectMissingError, check_name
from .snapshot import fsync_dir


class ObjectStore(Protocol):
    """What the archive needs of an object store. Names are relative paths
    with ``/`` separators; ``put`` replaces an object whole or not at all."""

    url: str

    def put(self, name: str, data: bytes) -> None: ...

    def get(self, name: str) -> bytes:
        """The object's bytes; ObjectMissingError if there is none."""
        ...

    def list(self, prefix: str) -> list[str]:
        """The names that start with ``prefix``, sorted."""
        ...

    def delete(self, name: str) -> None:
        """Remove the object; one that is not there is not an error."""
        ...


StoreFactory = Callable[[str], ObjectStore]
_schemes: dict[str, StoreFactory] = {}
_schemes_lock = threading.Lock()


def register_scheme(scheme: str, factory: StoreFactory) -> None:
    """Let :func:`open_store` open ``scheme://...`` URLs with ``factory(url)``."""
    with _schemes_lock:
        _schemes[scheme.lower()] = factory


def open_store(url: str) -> ObjectStore:
    """The object store at ``url`` (``file:///abs/dir``, or a registered scheme)."""
    scheme = urlsplit(url).scheme.lower()
    with _schemes_lock:
        factory = _schemes.get(scheme)
        known = ", ".join(f"{s}://" for s in sorted(_schemes))
    if factory is None:
        what = f"the scheme {scheme}://" if scheme else "a plain path"
        raise ConfigError(
            f"archive URL {url!r}: {what} is not supported (use one of {known};"
            " a directory is file:///absolute/path)"
        )
    return factory(url)


class DirStore:
    """Objects as files under a directory. ``put`` writes a temporary file in
    ``ROOT/.tmp``, syncs it, renames it into place and syncs the directory,
    so an object is whole or absent after a crash; names starting with a dot
    are never listed."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root

    @classmethod
    def from_url(cls, url: str) -> DirStore:
        u = urlsplit(url)
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise ConfigError(f"archive URL {url!r}: write a directory as file:///absolute/path")
        return cls(unquote(u.path))

    def _path(self, name: str) -> str:
        check_name(name)
        return os.path.join(self.root, *name.split("/"))

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        tmpdir = os.path.join(self.root, ".tmp")
        _makedirs(tmpdir)
        _makedirs(os.path.dirname(path))
        fd, tmp = tempfile.mkstemp(dir=tmpdir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        fsync_dir(path)

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectMissingError("no such object in the archive", name) from None

    def list(self, prefix: str) -> list[str]:
        # walk only the folder the prefix names
        folder = prefix.rpartition("/")[0]
        top = os.path.join(self.root, *folder.split("/")) if folder else self.root
        names: list[str] = []
        for dirpath, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            base = "" if rel == "." else rel + "/"
            names.extend(
                base + f for f in files if not f.startswith(".") and (base + f).startswith(prefix)
            )
        return sorted(names)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            os.remove(path)
        except FileNotFoundError:
            return
        fsync_dir(path)


def _makedirs(path: str) -> None:
    if os.path.isdir(path):
        return
    _makedirs(os.path.dirname(path))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    fsync_dir(path)  # the new folder's entry survives a crash


def _open_s3(url: str) -> ObjectStore:
    from .archive_s3 import S3Store  # only now: it imports boto3 (an optional extra)

    return S3Store.from_url(url)


register_scheme("file", DirStore.from_url)
register_scheme("s3", _open_s3)
