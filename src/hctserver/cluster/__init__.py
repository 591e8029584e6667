"""Coordination of equal nodes through etcd: election, fencing, membership."""
