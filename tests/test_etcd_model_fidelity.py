"""The simulator's etcd model against a real etcd: the same claim and
re-claim transactions (``node.fencing.rules.claim_txn`` / ``reclaim_txn``), sent to
both, decided by the same ``decide_claim`` / ``decide_reclaim``, must give the
same decisions (won or not, why, who holds the slot) and tokens that grow in
the same order. Revisions differ (the real etcd serves other tests too), so
tokens are compared by order, not value."""
from __future__ import annotations

import itertools
import random

import pytest
import trio

from node.fencing.etcd_shell import EtcdClient
from node.fencing.rules import (
    ClaimValue,
    alive_key,
    claim_txn,
    decide_claim,
    decide_reclaim,
    fire_key,
    fold_decision,
    plan_reclaim,
    reclaim_txn,
)
from sim.etcd_model import EtcdModel
from tests.etcd_server import etcd_server  # noqa: F401

NODES = ("a", "b", "c")
_prefixes = itertools.count()


class Side:
    """One etcd (model or real) with the fencer's per-process state."""

    def __init__(self, prefix: str, model: EtcdModel | None, client: EtcdClient | None):
        self.prefix, self.model, self.client = prefix, model, client
        self.hw = {n: 0 for n in NODES}
        self.epoch = {n: 0 for n in NODES}
        self.t = 0.0

    async def txn(self, ops):
        if self.model is not None:
            return self.model.txn(*ops, self.t)
        return await self.client.txn(*ops)

    async def get(self, key: bytes):
        if self.model is not None:
            return self.model.range(key, self.t)
        return await self.client.get(key)

    async def set_alive(self, node: str, alive: bool) -> None:
        key = alive_key(self.prefix, node, 1)
        if self.model is not None:
            if alive:
                self.model.session_refresh(key.decode(), 1e9, self.t)
            else:
                self.model.session_close(key.decode(), self.t)
        elif alive:
            await self.client.put(key, b"alive")
        else:
            await self.client.delete(key)

    async def claim(self, node: str, slot: int, run_id: str):
        v = ClaimValue(node, run_id, self.epoch[node], session=1)
        hw0 = self.hw[node]
        res = await self.txn(claim_txn(self.prefix, "t", slot, v, 0))
        d = decide_claim(res, node=node, run_id=run_id, high_water_before=hw0,
                         high_water_now=self.hw[node])
        self.hw[node], self.epoch[node] = fold_decision(d, self.hw[node], self.epoch[node])
        return d

    async def reclaim(self, node: str, slot: int, run_id: str, dead: str):
        kv = await self.get(fire_key(self.prefix, "t", slot))
        plan = plan_reclaim(kv, node=node, run_id=run_id, dead_node=dead, epoch=self.epoch[node],
                            max_reclaims=3, session=1, prefix=self.prefix)
        if plan.value is None:
            return ("refused", plan.refusal.split(" (")[0].split(",")[0])
        hw0 = self.hw[node]
        res = await self.txn(reclaim_txn(self.prefix, "t", slot, plan.value, 0, plan.mod_revision,
                                         plan.dead_alive))
        d = decide_reclaim(res, node=node, run_id=run_id, high_water_before=hw0,
                           high_water_now=self.hw[node], mod_revision=plan.mod_revision)
        self.hw[node], self.epoch[node] = fold_decision(d, self.hw[node], self.epoch[node])
        return d


def _script(seed: int, n: int = 24) -> list[tuple]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choice(("claim", "claim", "reclaim", "alive"))
        node = rng.choice(NODES)
        slot = rng.randrange(3)
        if kind == "claim":
            out.append(("claim", node, slot, f"{node}-{slot}-{rng.randrange(2)}"))
        elif kind == "reclaim":
            out.append(("reclaim", node, slot, f"{node}-re{i}", rng.choice(NODES)))
        else:
            out.append(("alive", node, rng.random() < 0.5))
    return out


def _view(d) -> tuple:
    if isinstance(d, tuple):
        return d
    return (d.won, d.reason, d.claimer_alive, d.holder.node if d.holder else None,
            d.token is not None)


async def _play(side: Side, script: list[tuple]) -> tuple[list, list]:
    views, tokens = [], []
    for n in NODES:
        await side.set_alive(n, True)
    for step in script:
        if step[0] == "alive":
            await side.set_alive(step[1], step[2])
            views.append(("alive",))
            continue
        d = await (side.claim(*step[1:]) if step[0] == "claim" else side.reclaim(*step[1:]))
        views.append(_view(d))
        if not isinstance(d, tuple) and d.token is not None:
            tokens.append((step, d.token))
    return views, tokens


@pytest.mark.parametrize("seed", range(12))
async def test_model_decides_as_a_real_etcd(etcd_server, seed):  # noqa: F811
    etcd_server.start()
    script = _script(seed)
    prefix_real = f"/peerd-fidelity-{seed}-{next(_prefixes)}-{random.getrandbits(32)}"
    model = Side("/peerd", EtcdModel(prefix="/peerd"), None)
    real = Side(prefix_real, None, EtcdClient([etcd_server.url], request_timeout_s=5.0))
    mv, mt = await _play(model, script)
    with trio.fail_after(60):
        rv, rt = await _play(real, script)
    for i, (a, b) in enumerate(zip(mv, rv)):
        assert a == b, (f"seed {seed} step {i} {script[i]}: model {a} != etcd {b}; "
                        f"replay: pytest tests/test_etcd_model_fidelity.py -k 'decides and {seed}'")
    assert [s for s, _ in mt] == [s for s, _ in rt]
    # tokens grow per slot in both, and in the same order overall
    for side_tokens in (mt, rt):
        per_slot: dict[int, int] = {}
        for step, tok in side_tokens:
            slot = step[2]
            if step[0] == "reclaim":
                assert tok > per_slot.get(slot, 0), (seed, step)
            per_slot[slot] = max(per_slot.get(slot, 0), tok)
    order_m = sorted(range(len(mt)), key=lambda i: mt[i][1])
    order_r = sorted(range(len(rt)), key=lambda i: rt[i][1])
    assert order_m == order_r, f"seed {seed}: tokens ordered differently"


def test_epoch_raise_shows_in_model_tokens():
    m = EtcdModel()
    s = Side("/peerd", m, None)
    d1 = trio.run(s.claim, "a", 1, "r1")
    m.raise_epoch()
    d2 = trio.run(s.claim, "a", 2, "r2")
    assert d1.won and d2.won and d2.token > d1.token
    assert s.epoch["a"] == 1


def test_lost_reply_is_recovered_as_own_claim():
    from sim.etcd_model import EtcdModelUnavailable
    m = EtcdModel()
    v = ClaimValue("a", "r1", 0, session=1)
    with pytest.raises(EtcdModelUnavailable):
        m.txn(*claim_txn("/peerd", "t", 5, v, 0), 1.0, lost_reply=True)
    res = m.txn(*claim_txn("/peerd", "t", 5, v, 0), 2.0)
    d = decide_claim(res, node="a", run_id="r1", high_water_before=0, high_water_now=0)
    assert d.won and d.detail.startswith("recovered own claim")
    other = decide_claim(m.txn(*claim_txn("/peerd", "t", 5, ClaimValue("b", "r9", 0), 0), 3.0),
                         node="b", run_id="r9", high_water_before=0, high_water_now=0)
    assert not other.won and other.holder.node == "a"
