"""The leader and follower roles, their threads, status, metrics and configuration."""
