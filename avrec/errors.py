"""The one family of errors avrec raises on purpose.

Every error a user or a caller can act on derives from :class:`AvrecError`, so one ``except``
catches them all (the CLI prints any of them as one line and exits with 2; the gRPC service
maps them to status codes). Four branches say what kind of thing went wrong:

* :class:`InputError`: the data or arguments given are not acceptable (also a ``ValueError``);
* :class:`ModelError`: a model file, its contract or its pipeline does not fit what it is
  used with (also a ``ValueError``);
* :class:`StoreUnavailableError`: the online store (Redis) or the offline event log cannot be
  reached or written just now (also a ``RuntimeError``); retrying later may succeed;
* :class:`SetupError`: the checkout lacks what its setup step builds (the gRPC stubs), or
  holds a stale copy; ``make setup`` fixes it (also a ``RuntimeError``).

>>> issubclass(StoreUnavailableError, RuntimeError) and issubclass(InputError, ValueError)
True
"""

from __future__ import annotations


class AvrecError(Exception):
    """Base of every error avrec raises on purpose."""


class InputError(AvrecError, ValueError):
    """Data or arguments that cannot be accepted; nothing was changed."""


class ModelError(AvrecError, ValueError):
    """A model, its contract or its pipeline does not fit what it is used with."""


class StoreUnavailableError(AvrecError, RuntimeError):
    """A store (Redis, the event log) cannot be reached or written now."""


class SetupError(AvrecError, RuntimeError):
    """The checkout is not set up (build-time files missing or stale): run ``make setup``."""
