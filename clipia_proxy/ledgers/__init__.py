"""The durable ledger: one record per request, apart from the hot counters.

Two roles, two stores. The *counters* (``store.backend``: memory, sqlite, redis) decide
admission: reserved and spent per team and period, RPM/TPM windows, concurrency, leases. The
*ledger* (``ledger.backend``: sqlite, postgres) keeps one record per request, durably, and is
what chargeback reads; counters are rebuilt from it, never trusted alone.

:class:`LedgerStore` is the ledger's whole interface (defined in
:mod:`clipia_proxy.quotas.store` beside the counters' ``Store``, whose backends take one, and
re-exported here); implementations:
:class:`~clipia_proxy.ledgers.postgres.PostgresLedger` and
:class:`~clipia_proxy.ledgers.sqlite.SqliteLedger`. Every method may raise
:class:`~clipia_proxy.quotas.store.StoreUnavailable`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from clipia_proxy.quotas.store import CountersSnapshot, LedgerStore, ReportLine, WindowSpent

if TYPE_CHECKING:
    from clipia_proxy.config import Config

__all__ = [
    "GROUPINGS",
    "TAG_GROUP",
    "CountersSnapshot",
    "LedgerStore",
    "ReportLine",
    "WindowSpent",
    "open_ledger",
]

GROUPINGS: Final = ("team", "environment", "model", "key", "user", "day", "tag")
"""What ``report --by`` may group on (any combination, in this order of columns), and
``tag:NAME`` (a declared tag's value, empty without it), after them. ``tag`` is one line per
``name=value`` a record carries (a record with two tags counts in two lines)."""
TAG_GROUP: Final = re.compile(r"tag:([A-Za-z0-9][A-Za-z0-9_.-]{0,62})")
"""``--by tag:NAME``: NAME is a tag key (letters, digits, ``.``, ``_``, ``-``: safe in SQL)."""


def tag_name(grouping: str) -> str | None:
    """Return NAME for a ``tag:NAME`` grouping, else ``None``."""
    match = TAG_GROUP.fullmatch(grouping)
    return match[1] if match else None


def open_ledger(config: Config) -> LedgerStore:
    """Return the ledger ``config.ledger`` names (not started)."""
    if config.ledger.backend == "postgres":
        from .postgres import PostgresLedger

        return PostgresLedger.from_config(
            config.ledger, timeout=max(config.store.timeout_seconds, 30.0)
        )
    from .sqlite import SqliteLedger

    return SqliteLedger(config.store.sqlite_path)
