"""Replicated state: the store core (task catalogue, control state, run records
and their merge lattice), its dotted version vectors, the digest tree and the
anti-entropy exchange, and the SQLite shell that persists it.

Cores (sans-IO; their classes and constants are re-exported here, their
functions stay with their module, e.g. ``node.state.digest.<function>``):
    digest         Digest tree (pure core): the TicTac-style XOR hash tree over
    exchange       Anti-entropy exchange (pure core): the messages two replicas
    keys           Store key layout (pure core): ``task/<id>``, ``ctl/<id>`` an
    runstatus      Run statuses: the one list every layer uses (executor, store
    store          Replicated store core: task catalogue, control state, run re
    versions       Dotted version vector sets (DVVSet), after riak_core's ``dvv

Shells (I/O; import them by their full path, e.g. ``node.state.sqlite_shell``):
    sqlite_shell   SQLite persistence shell for the store core (``Store.drain_d
"""
from node.state.digest import (
    DigestTree, BUCKETS, SUBS, SCOPES,
)
from node.state.exchange import (
    ExchangeResult, RemoteProtocolError, MAX_MSG_ENTRIES, PAGE_BYTES, PAGE_KEYS,
)
from node.state.keys import (
    Entry, MAX_KEY_LEN,
)
from node.state.runstatus import (
    PENDING, RUNNING, SUCCEEDED, FAILED, TIMEOUT, ERROR, CANCELLED, LOST, SKIPPED,
    RUN_STATUSES, TERMINAL, RETRYABLE,
)
from node.state.store import (
    Store, TaskView, Control, StoreStatistics, DEFAULT_HISTORY, TOMBSTONE_HORIZON_S,
    RUN_FIELDS, DEFAULT_RUN_RECORDS_MAX_BYTES, TRIM_LOW_WATER, OUTPUT_PREFIX,
)
from node.state.versions import (
    Clock, VV, MAX_ACTORS, MAX_SIBLINGS,
)

__all__ = [
    'DigestTree', 'BUCKETS', 'SUBS', 'SCOPES', 'ExchangeResult', 'RemoteProtocolError',
    'MAX_MSG_ENTRIES', 'PAGE_BYTES', 'PAGE_KEYS', 'Entry', 'MAX_KEY_LEN', 'PENDING',
    'RUNNING', 'SUCCEEDED', 'FAILED', 'TIMEOUT', 'ERROR', 'CANCELLED', 'LOST',
    'SKIPPED', 'RUN_STATUSES', 'TERMINAL', 'RETRYABLE', 'Store', 'TaskView', 'Control',
    'StoreStatistics', 'DEFAULT_HISTORY', 'TOMBSTONE_HORIZON_S', 'RUN_FIELDS',
    'DEFAULT_RUN_RECORDS_MAX_BYTES', 'TRIM_LOW_WATER', 'OUTPUT_PREFIX', 'Clock', 'VV',
    'MAX_ACTORS', 'MAX_SIBLINGS',
]
