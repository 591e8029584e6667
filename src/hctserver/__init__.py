"""hctserver: leader/follower replication for SQLite (the hctree hct_testserver)."""

from .errors import HctError
from .journal.database import Database, connect
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
    "entry_hash",
    "fold",
]
