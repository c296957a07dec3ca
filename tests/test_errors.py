"""One error family: every exception class avrec defines derives from ``AvrecError`` and is
named ``*Error``; the CLI prints any of them as one line and exits with 2."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from avrec import cli, data_commands
from avrec.errors import AvrecError, StoreUnavailableError

PACKAGES = ("avrec", "avrec.encoders", "avrec.ranker", "avrec.server", "avrec.web")


def _defined_exceptions() -> list[type[BaseException]]:
    found = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names = [package, *(m.name for m in pkgutil.walk_packages(root.__path__, f"{package}."))]
        for name in names:
            if name.startswith("avrec.v1"):  # generated stubs
                continue
            try:
                module = importlib.import_module(name)
            except ImportError:  # an optional extra that is not installed
                continue
            found += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                      if issubclass(obj, BaseException) and obj.__module__ == name]
    return found


def test_every_error_class_is_in_the_family() -> None:
    classes = _defined_exceptions()
    assert len(classes) >= 15
    outside = [f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, AvrecError)]
    badly_named = [c.__name__ for c in classes if not c.__name__.endswith("Error")]
    assert not outside, outside
    assert not badly_named, badly_named


def test_one_store_unavailable_error() -> None:
    from avrec import redis_server
    from avrec.server import engine, event_log

    assert redis_server.StoreUnavailableError is engine.StoreUnavailableError
    assert issubclass(event_log.EventLogUnavailableError, StoreUnavailableError)


def test_the_cli_turns_any_avrec_error_into_one_line_and_exit_2(monkeypatch, capsys) -> None:
    def failing(args):
        raise StoreUnavailableError("nothing answers at redis://127.0.0.1:1/0")

    monkeypatch.setattr(data_commands, "cmd_redis", failing)
    assert cli.main(["redis"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["avrec redis: error: nothing answers at redis://127.0.0.1:1/0"]
