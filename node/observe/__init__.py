"""Observability: log lines and Prometheus metrics (shells) and rate-limited
refusal logging (core).

Cores (sans-IO; their classes and constants are re-exported here, their
functions stay with their module, e.g. ``node.observe.ratelog.<function>``):
    ratelog        Rate-limited log lines for refusals (pure: time comes in as 

Shells (I/O; import them by their full path, e.g. ``node.observe.logs_shell``):
    logs_shell     Log lines: one per event, text or JSON, always with the node
    metrics_shell  Prometheus metrics of one node (all named ``peerd_*``, each 
"""
from node.observe.ratelog import (
    RateLimitedLog,
)

__all__ = ['RateLimitedLog']
