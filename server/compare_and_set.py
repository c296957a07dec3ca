"""Per-key optimistic writes that work on a Redis Cluster: set a hash's fields only if the
fields read before still hold what was read.

``WATCH``/``MULTI`` over several keys cannot span a cluster's slots, and Feast's keys carry no
hash tag, so two entities' hashes are almost never in one slot. Each entity's hash is instead
written by one ``EVAL`` of :data:`SCRIPT` (one key: always one slot, atomic on its master),
which compares the SHA-1 of each checked field with the digest of the value read and only then
runs the ``HSET``. The scripts of a batch go out in one non-transactional pipeline (redis-py's
cluster client splits it by node); each reply says whether that key was written.

>>> digest(None) == digest(b"")
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

SCRIPT = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local current = redis.call('HGET', KEYS[1], ARGV[1 + i]) or ''
  if redis.sha1hex(current) ~= ARGV[1 + n + i] then return 0 end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2 * n + 2))
return 1
"""


def digest(value: bytes | None) -> str:
    """SHA-1 hex of a field's value as :data:`SCRIPT` computes it (absent: empty)."""
    return hashlib.sha1(value or b"").hexdigest()


def queue(pipe: Any, key: bytes, checked: Sequence[bytes | str], seen: Sequence[bytes | None],
          mapping: dict[bytes | str, bytes]) -> None:
    """Queue on ``pipe``: set ``mapping`` in hash ``key`` iff each field of ``checked`` still
    holds the value in ``seen`` (None: absent). The reply is 1 when written, 0 when not."""
    args: list[Any] = [len(checked), *checked, *(digest(v) for v in seen)]
    for name, value in mapping.items():
        args += (name, value)
    options = {}
    if hasattr(pipe, "get_node_from_key"):  # a cluster pipeline: route by the slot map here;
        # left to itself it asks a node for the keys of every EVAL (COMMAND GETKEYS)
        options["target_nodes"] = pipe.get_node_from_key(key)
    pipe.execute_command("EVAL", SCRIPT, 1, key, *args, **options)  # (no eval() on a cluster
    # pipeline)
