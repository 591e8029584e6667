"""hctserver: leader/follower replication for SQLite (the hctree hct_testserver)."""

from .errors import HctError
from .journal import Database, Mode
from .position import Entry, Position, entry_hash, fold

__version__ = "0.1.0"

__all__ = ["Database", "Entry", "HctError", "Mode", "Position", "__version__", "entry_hash", "fold"]
