"""The journaled database: capture, commit, apply, entry formats, retention,
snapshots and the commit gate. No networking."""
