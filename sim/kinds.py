"""The kinds of entries in the simulated cluster's event loop (a core: constants only).

An entry is ``(time_s, seq, kind, a, b, c)`` (``sim/loop.py``); the comment
on each kind says what ``a``, ``b`` and ``c`` hold. ``sim/cluster.py``
dispatches on them; ``sim/streams.py``, ``sim/faults.py`` and ``sim/app.py``
schedule some. They are ``Final`` literals, so the compiled loop
(sim/accel.py) inlines them.
"""
from __future__ import annotations

from typing import Final

__all__ = ["K_DELIVER", "K_TIMER", "K_PP_REQ", "K_PP_REPLY", "K_PP_FAIL", "K_FAULT", "K_RESUME",
           "K_CHECK", "K_INJECT", "K_JOIN", "K_STOP"]

# Event kinds.
K_DELIVER: Final = 0   # a=dst, b=src, c=sealed datagram
K_TIMER: Final = 1     # a=node, b=timer_gen
K_PP_REQ: Final = 2    # a=dst, b=src, c=(sealed request, src_epoch, started_s, join)
K_PP_REPLY: Final = 3  # a=initiator, b=responder, c=(sealed reply, initiator_epoch)
K_PP_FAIL: Final = 4   # a=initiator, b=target addr, c=initiator_epoch
K_FAULT: Final = 5     # a=Fault
K_RESUME: Final = 6    # a=node, b=pause token
K_CHECK: Final = 7     # periodic convergence check
K_INJECT: Final = 8    # inject a user update for the dissemination measurement
K_JOIN: Final = 9      # a=node, b=epoch: node calls core.join(seeds)
K_STOP: Final = 10     # a=node, b=epoch: a leaving node's process exits
