"""Every adapter share a worker writes into a usage record is one the control plane bills: computed from
the float32 the wire carries, to the control plane's 6 decimal places. A share of exactly 5e-7 (weights
122.0703125 and 6.103515625e-05, both exact in float32) passed the worker's old threshold and rounded to
zero at the control plane, which refused the whole record: the tokens were served and never billed.
An ensemble of K members is billed K times its tokens: an adapter member's share is its weight over all
members' weights (the base model's included) divided by K, its weighted share of the tokens delivered."""

from __future__ import annotations

import random
from decimal import Decimal

import numpy as np
import pytest

from data_plane.server.control_plane_client import ResolvedAdapter
from data_plane.server.ensemble_request import billed_adapters
from data_plane.server.validation import ValidRequest
from openlora.usage_shares import wire_share


def _request(members: list[tuple[str, float]], method: str) -> ValidRequest:
    return ValidRequest(
        request_id="",
        prompt="p",
        prompt_token_ids=None,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        max_tokens=1,
        seed=None,
        stop=(),
        repetition_penalty=1.0,
        logprobs=False,
        adapters=tuple(members),
        mix_method=method,
        from_mix=True,
    )


def _resolved(names) -> dict[str, ResolvedAdapter]:
    return {n: ResolvedAdapter(n, f"id-{n}", "0" * 64, 1, 8) for n in names if n}


def _shares(members: list[tuple[str, float]], method: str) -> dict[str, Decimal]:
    billed = billed_adapters(_request(members, method), _resolved(n for n, _ in members))
    shares = {adapter_id: wire_share(share) for adapter_id, share in billed}
    # what the worker sends is what the control plane bills: nothing it would drop or refuse
    assert all(share > 0 for share in shares.values())
    assert [float(np.float32(share)) for _, share in billed] == [
        float(np.float32(float(shares[i]))) for i, _ in billed
    ]
    return shares


@pytest.mark.parametrize("method", ["linear", "ties", "ensemble"])
def test_a_share_at_the_rounding_edge_is_billed_never_refused(method):
    shares = _shares([("a", 122.0703125), ("b", 6.103515625e-05)], method)  # ratio exactly 5e-7
    if method == "ensemble":  # b samples nothing the tokens show: it earns nothing; a has half of 2N
        assert shares == {"id-a": Decimal("0.5")}
    else:  # b is applied to every token: listed (royalty on every token) at the smallest share
        assert shares == {"id-a": 1, "id-b": Decimal("0.000001")}


def test_random_weights_always_give_billable_shares():
    rng = random.Random(7)
    for _ in range(3000):
        count = rng.randint(2, 5)
        members = [
            (f"m{i}", float(np.float32(10 ** rng.uniform(-7, 3)) * rng.choice((1, -1, 1))))
            for i in range(count)
        ]
        for method in ("linear", "dare_ties"):
            shares = _shares(members, method)
            assert max(shares.values()) == 1  # the largest weight's adapter, as before
        ensemble = [(name, abs(weight)) for name, weight in members]
        for with_base in (ensemble, [*ensemble, ("", rng.choice((0.5, 1.0, 10.0)))]):
            shares = _shares(with_base, "ensemble")
            whole = sum(w for _, w in with_base) * len(with_base)
            for name, weight in with_base:
                if name and f"id-{name}" in shares:
                    assert abs(shares[f"id-{name}"] - Decimal(repr(weight / whole))) <= Decimal("0.000001")
            assert sum(shares.values()) <= Decimal(1) / len(with_base) + Decimal("0.00001")


def test_an_ensemble_shares_its_members_weights_of_the_tokens_delivered():
    # K = 2, billed 2N: 1/1001 of N is 1/2002 of 2N; the base member's and the other sequence's are the rest
    assert _shares([("paid", 1.0), ("", 1000.0)], "ensemble") == {"id-paid": Decimal("0.0005")}
    assert _shares([("paid", 1.0), ("", 1.0), ("own", 2.0)], "ensemble") == {
        "id-paid": Decimal("0.083333"),
        "id-own": Decimal("0.166667"),
    }
    # A member beside one of weight 0 is paid on the N tokens delivered, not on the 2N billed.
    assert _shares([("paid", 1.0), ("idle", 0.0)], "ensemble") == {"id-paid": Decimal("0.5")}
    assert _shares([("alone", 3.0)], "ensemble") == {"id-alone": 1}
    assert _shares([("", 1.0), ("zero", 0.0)], "ensemble") == {}
