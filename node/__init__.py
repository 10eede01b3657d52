"""peerd's node: everything between membership (gossip/) and an operator.

The node core (sans-IO) is :mod:`node.core` (``NodeCore``: state, entry
points) with its parts ``core_effects`` (what it asks its shell to do),
``core_ownership``, ``core_replication``, ``core_claims``, ``core_runs`` and
``core_followups``. The trio shell around it is :mod:`node.shell` (``Node``)
with ``effects_shell`` (carrying out effects), ``peers_shell`` (peer
messages), ``facade_shell`` (what the API calls), ``run_output_shell`` and
``clock_shell``. The rooms the core draws on: ``ownership`` (ring, skew,
shards), ``state`` (replicated store, versions, SQLite), ``tasks``,
``schedule``, ``run`` (executors and follow-ups), ``fencing`` (etcd), ``api``
(HTTP), ``observe`` (logs, metrics), ``cli`` (``peerd``, ``peerctl``);
``client`` is the public Python client, ``knobs`` the core's settings,
``peerwire`` the node-to-node messages and ``pyrunner`` the child-side
entry of ``python`` tasks (standard library only, so a child starts fast). Files ending in ``_shell.py`` do I/O;
every other module is a core. The whole house is drawn in
docs/ARCHITECTURE.md.
"""
