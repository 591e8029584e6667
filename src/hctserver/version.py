"""The package version (one place; the status endpoint reports it)."""

VERSION = "0.3.0"
