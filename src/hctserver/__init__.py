"""hctserver: leader/follower replication for SQLite (the hctree hct_testserver)."""

from .client import dbapi
from .client.connect import connect
from .errors import HctError
from .journal.database import Database
from .journal.store import Mode
from .position import Entry, Position, entry_hash, fold
from .version import VERSION

__version__ = VERSION

__all__ = [
    "Database",
    "Entry",
    "HctError",
    "Mode",
    "Position",
    "__version__",
    "connect",
    "dbapi",
    "entry_hash",
    "fold",
]
