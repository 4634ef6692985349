"""State shared by gateway replicas through Redis (issue 16): buckets, slots, the connection.

Only this module's names are imported by a gateway without ``REDIS_URL``: the Redis client
(a quarter of a second and megabytes to import) is loaded when shared state is turned on.
"""

from __future__ import annotations

import socket

KEY_PREFIX = "ogw:"


def replica_name(configured: str) -> str:
    """This replica's name: ``REPLICA_ID``, else the host name (a container's id in compose)."""
    return configured or socket.gethostname()[:32].lower()


class Unavailable(Exception):
    """Redis did not answer in time, or failed: the caller falls back (or refuses)."""
