"""Fencing with etcd: the claim rules, key layout and tokens, the etcd JSON
gateway codec (cores), and the etcd client and fencer (shells).

Cores (sans-IO; their classes and constants are re-exported here, their
functions stay with their module, e.g. ``node.fencing.codec.<function>``):
    codec          etcd v3 JSON gateway codec (pure core): request and response
    rules          Fencing with etcd (pure core): key layout, tokens, claim val

Shells (I/O; import them by their full path, e.g. ``node.fencing.etcd_shell``):
    etcd_shell     etcd v3 client over the JSON gateway, on trio (shell).
    fencer_shell   Fencer: claims slots in etcd before they fire (trio shell; t
"""
from node.fencing.codec import (
    EtcdClientError, EtcdError, EtcdUnavailable, EtcdProtocolError, Compare, Put, Range,
    DeleteRange, Op, KeyValue, PutResponse, RangeResponse, DeleteRangeResponse,
    TxnResult, LeaseGrant, Status,
)
from node.fencing.rules import (
    EPOCH_MAX, REVISION_BITS, TOKEN_MAX, ClaimValue, ClaimDecision, ReclaimPlan,
)

__all__ = [
    'EtcdClientError', 'EtcdError', 'EtcdUnavailable', 'EtcdProtocolError', 'Compare',
    'Put', 'Range', 'DeleteRange', 'Op', 'KeyValue', 'PutResponse', 'RangeResponse',
    'DeleteRangeResponse', 'TxnResult', 'LeaseGrant', 'Status', 'EPOCH_MAX',
    'REVISION_BITS', 'TOKEN_MAX', 'ClaimValue', 'ClaimDecision', 'ReclaimPlan',
]
