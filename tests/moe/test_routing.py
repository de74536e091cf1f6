"""capacity() and route(): hand-computed golden cases, equivalence with the slow loop, invariants."""

import pytest
import torch

from limoe.moe import capacity, route
from limoe.moe.reference import route_loop


@pytest.mark.parametrize("args, expected", [
    ((8, 4, 1, 1.0), 4),        # ceil(2) = 2 -> 4
    ((100, 8, 1, 1.0), 16),     # ceil(12.5) = 13 -> 16
    ((100, 8, 2, 1.0), 28),     # ceil(25) = 25 -> 28
    ((64, 8, 1, 1.05), 12),     # ceil(8.4) = 9 -> 12
    ((1, 8, 1, 1.0), 4),        # ceil(0.125) = 1 -> 4
])
def test_capacity_golden(args, expected):
    assert capacity(*args) == expected


def test_capacity_multiple_of_one_is_plain_ceil():
    assert capacity(10, 4, 1, 1.0, multiple_of=1) == 3
    assert capacity(10, 4, 2, 1.5, multiple_of=1) == 8  # ceil(7.5)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_tokens=8, num_experts=4, k=5, capacity_factor=1.0), "k"),
    (dict(num_tokens=8, num_experts=4, k=1, capacity_factor=0.0), "capacity_factor"),
    (dict(num_tokens=8, num_experts=4, k=1, capacity_factor=-1.0), "capacity_factor"),
    (dict(num_tokens=0, num_experts=4, k=1, capacity_factor=1.0), "capacity"),
    (dict(num_tokens=8, num_experts=0, k=1, capacity_factor=1.0), "num_experts"),
])
def test_capacity_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        capacity(**kwargs)


# Six tokens, three experts. Top-1: t0 e0 .5, t1 e0 .6, t2 e1 .7, t3 e0 .9, t4 e2 .6, t5 e0 .4 (t1/t4 tie at .6).
# Second choices: t0 e1, t1 e1, t2 e2, t3 e1, t4 e0, t5 e1.
GATES = torch.tensor([
    [0.50, 0.30, 0.20],
    [0.60, 0.25, 0.15],
    [0.10, 0.70, 0.20],
    [0.90, 0.06, 0.04],
    [0.25, 0.15, 0.60],
    [0.40, 0.35, 0.25],
])


def test_route_top1_in_token_order():
    r = route(GATES, k=1, capacity=2)
    # Expert 0 is asked by t0, t1, t3, t5 in that order: slots 0, 1, 2, 3; the last two overflow.
    assert r.expert_SK[:, 0].tolist() == [0, 0, 1, 0, 2, 0]
    assert r.slot_SK[:, 0].tolist() == [0, 1, 0, 2, 0, 3]
    assert r.kept_SK[:, 0].tolist() == [True, True, True, False, True, False]
    assert torch.equal(r.gate_SK[:, 0], GATES.max(1).values)


def test_route_top1_batch_priority():
    r = route(GATES, k=1, capacity=2, batch_priority=True)
    # Priority by top-1 gate: t3 .9, t2 .7, t1 .6, t4 .6 (tie keeps token order), t0 .5, t5 .4.
    # Expert 0 is now claimed by t3, t1, t0, t5: the confident t3 is kept, t0 drops instead.
    assert r.slot_SK[:, 0].tolist() == [2, 1, 0, 0, 0, 3]
    assert r.kept_SK[:, 0].tolist() == [False, True, True, True, True, False]


def test_route_top2_second_choices_after_all_first_choices():
    r = route(GATES, k=2, capacity=2)
    # After the first round expert 0 holds 4 claims, experts 1 and 2 one each. Second round in token order:
    # t0->e1 slot 1, t1->e1 slot 2, t2->e2 slot 1, t3->e1 slot 3, t4->e0 slot 4, t5->e1 slot 4.
    assert r.expert_SK.tolist() == [[0, 1], [0, 1], [1, 2], [0, 1], [2, 0], [0, 1]]
    assert r.slot_SK.tolist() == [[0, 1], [1, 2], [0, 1], [2, 3], [0, 4], [3, 4]]
    assert r.kept_SK.tolist() == [[True, True], [True, False], [True, True], [False, False], [True, False],
                                  [False, False]]
    # Gates are the raw softmax values, not renormalised over the two choices.
    assert torch.allclose(r.gate_SK[0], torch.tensor([0.5, 0.3]))


def test_route_padding_takes_no_slot():
    valid = torch.tensor([True, False, True, True, True, True])
    r = route(GATES, k=1, capacity=2, valid_S=valid)
    # t1 is padding: expert 0 now goes t0 slot 0, t3 slot 1, t5 slot 2 (dropped).
    assert r.slot_SK[:, 0].tolist() == [0, -1, 0, 1, 0, 2]
    assert r.kept_SK[:, 0].tolist() == [True, False, True, True, True, False]


def test_route_groups_golden():
    # GATES as two groups of three tokens. Group 0 (t0-t2) asks e0 twice and e1 once; group 1 (t3-t5) asks e0
    # twice and e2 once. With capacity 1 per group, the second e0 claim of each group drops; slots restart at 0
    # in group 1 (as one group, t3 and t5 would be e0's slots 2 and 3).
    r = route(GATES, k=1, capacity=1, num_groups=2)
    assert r.slot_SK[:, 0].tolist() == [0, 1, 0, 0, 0, 1]
    assert r.kept_SK[:, 0].tolist() == [True, False, True, True, True, False]
    assert r.group_S.tolist() == [0, 0, 0, 1, 1, 1]
    # BPR orders inside each group: t1 (.6) beats t0 (.5), t3 (.9) beats t5 (.4).
    r = route(GATES, k=1, capacity=1, batch_priority=True, num_groups=2)
    assert r.kept_SK[:, 0].tolist() == [False, True, True, True, True, False]
    # Rows of the expert-major [E, G*C] buffer: expert e's slots of group 0, then of group 1.
    assert r.buffer_row_SK()[:, 0].tolist() == [1, 0, 2 + 0, 0 + 1, 4 + 1, 1 + 1]
    # A capacity per group: group 1 may keep both of its e0 claims.
    r = route(GATES, k=1, capacity=2, num_groups=2, capacity_G=torch.tensor([1, 2]))
    assert r.kept_SK[:, 0].tolist() == [True, False, True, True, True, True]


def _random_gates(gen, num_tokens, num_experts, quantise):
    gates = torch.rand(num_tokens, num_experts, generator=gen).softmax(-1)
    if quantise:  # coarse values make many ties, the case where order rules matter most
        gates = (gates * 8).round() / 8
    return gates


def test_route_equals_slow_loop_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        num_experts = int(torch.randint(1, 9, (), generator=gen))
        num_tokens = int(torch.randint(1, 50, (), generator=gen))
        k = int(torch.randint(1, num_experts + 1, (), generator=gen))
        cap = int(torch.randint(1, 12, (), generator=gen))
        bpr = bool(trial % 2)
        gates = _random_gates(gen, num_tokens, num_experts, quantise=trial % 3 == 0)
        valid = torch.rand(num_tokens, generator=gen) > 0.3 if trial % 4 == 0 else None
        fast, slow = route(gates, k, cap, bpr, valid), route_loop(gates, k, cap, bpr, valid)
        assert torch.equal(fast.expert_SK, slow.expert_SK)
        assert torch.equal(fast.slot_SK, slow.slot_SK), (trial, gates, fast.slot_SK, slow.slot_SK)
        assert torch.equal(fast.kept_SK, slow.kept_SK)


def test_grouped_route_equals_slow_loop_and_routing_each_group_alone():
    gen = torch.Generator().manual_seed(4)
    for trial in range(200):
        num_experts = int(torch.randint(1, 7, (), generator=gen))
        num_groups = int(torch.randint(1, 5, (), generator=gen))
        per_group = int(torch.randint(1, 20, (), generator=gen))
        num_tokens = num_groups * per_group
        k = int(torch.randint(1, num_experts + 1, (), generator=gen))
        cap = int(torch.randint(1, 8, (), generator=gen))
        bpr = bool(trial % 2)
        gates = _random_gates(gen, num_tokens, num_experts, quantise=trial % 3 == 0)
        valid = torch.rand(num_tokens, generator=gen) > 0.3 if trial % 4 < 2 else None
        caps = torch.randint(1, cap + 1, (num_groups,), generator=gen) if trial % 5 == 0 else None
        fast = route(gates, k, cap, bpr, valid, num_groups, caps)
        slow = route_loop(gates, k, cap, bpr, valid, num_groups, None if caps is None else caps.tolist())
        assert torch.equal(fast.slot_SK, slow.slot_SK), trial
        assert torch.equal(fast.kept_SK, slow.kept_SK), trial
        for g in range(num_groups):  # a group routed with the others = the group routed alone
            rows = slice(g * per_group, (g + 1) * per_group)
            alone = route(gates[rows], k, cap if caps is None else int(caps[g]), bpr,
                          None if valid is None else valid[rows])
            assert torch.equal(fast.slot_SK[rows], alone.slot_SK) and torch.equal(fast.kept_SK[rows], alone.kept_SK)


def test_route_invariants_on_random_inputs():
    gen = torch.Generator().manual_seed(1)
    for trial in range(200):
        num_experts, num_tokens = 6, 64
        k = 1 + trial % 3
        cap = 1 + trial % 10
        gates = _random_gates(gen, num_tokens, num_experts, quantise=trial % 2 == 0)
        valid = torch.rand(num_tokens, generator=gen) > 0.25
        r = route(gates, k, cap, batch_priority=trial % 2 == 1, valid_S=valid)
        kept_expert, kept_slot = r.expert_SK[r.kept_SK], r.slot_SK[r.kept_SK]
        # No expert buffer exceeds capacity, and kept assignments occupy distinct slots.
        assert int(torch.bincount(kept_expert, minlength=num_experts).max()) <= cap
        assert (kept_slot < cap).all() and (kept_slot >= 0).all()
        flat = kept_expert * cap + kept_slot
        assert flat.unique().numel() == flat.numel()
        # Padding is never kept; every expert that overflowed is full (nothing kept from a half-empty buffer
        # was dropped), so drops happen only where capacity binds.
        assert not r.kept_SK[~valid].any()
        asked = torch.bincount(r.expert_SK[valid].reshape(-1), minlength=num_experts)
        held = torch.bincount(kept_expert, minlength=num_experts)
        assert torch.equal(held, asked.clamp(max=cap))


def test_batch_priority_keeps_exactly_the_highest_gate_tokens():
    gen = torch.Generator().manual_seed(2)
    gates = torch.rand(200, 4, generator=gen).softmax(-1)  # continuous: no ties
    cap = 12
    r = route(gates, k=1, capacity=cap, batch_priority=True)
    for e in range(4):
        mine = (r.expert_SK[:, 0] == e).nonzero()[:, 0]
        best = mine[r.gate_SK[mine, 0].argsort(descending=True)[:cap]]
        assert set(mine[r.kept_SK[mine, 0]].tolist()) == set(best.tolist())


def test_batch_priority_changes_only_which_tokens_drop():
    gen = torch.Generator().manual_seed(3)
    gates = torch.rand(100, 5, generator=gen).softmax(-1)
    plain, bpr = route(gates, 2, 8), route(gates, 2, 8, batch_priority=True)
    assert torch.equal(plain.expert_SK, bpr.expert_SK)
    assert torch.equal(plain.gate_SK, bpr.gate_SK)
    for e in range(5):
        assert int(plain.kept_SK[plain.expert_SK == e].sum()) == int(bpr.kept_SK[bpr.expert_SK == e].sum())
    assert not torch.equal(plain.kept_SK, bpr.kept_SK)


@pytest.mark.parametrize("kwargs, name", [
    (dict(gates_SE=GATES, k=4, capacity=2), "k"),
    (dict(gates_SE=GATES, k=0, capacity=2), "k"),
    (dict(gates_SE=GATES, k=1, capacity=0), "capacity"),
    (dict(gates_SE=GATES[0], k=1, capacity=2), "gates_SE"),
    (dict(gates_SE=GATES, k=1, capacity=2, valid_S=torch.ones(5, dtype=torch.bool)), "valid_S"),
    (dict(gates_SE=GATES, k=1, capacity=2, valid_S=torch.ones(6)), "valid_S"),
    (dict(gates_SE=GATES, k=1, capacity=2, num_groups=4), "num_groups"),
    (dict(gates_SE=GATES, k=1, capacity=2, num_groups=0), "num_groups"),
    (dict(gates_SE=GATES, k=1, capacity=2, num_groups=2, capacity_G=torch.ones(3, dtype=torch.long)), "capacity_G"),
])
def test_route_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        route(**kwargs)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lowest_expert_and_the_earliest_token(device):
    """Equal gates pick experts lowest index first (JAX's lax.top_k, V-MoE's router), and BPR keeps token order
    among equal top-1 gates, on every backend: routing never depends on how a kernel breaks ties."""
    uniform = torch.full((6, 4), 0.25, device=device)
    assert route(uniform, k=2, capacity=8).expert_SK.tolist() == [[0, 1]] * 6
    assert route(uniform, k=1, capacity=4, batch_priority=True).kept_SK[:, 0].tolist() == [True] * 4 + [False] * 2
    gates = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.25, 0.5, 0.25]], device=device)
    assert route(gates, k=2, capacity=8).expert_SK.tolist() == [[0, 1], [1, 2], [1, 0]]
    gen = torch.Generator().manual_seed(7)
    for _ in range(50):  # many ties: the fast path equals the Python-sorted reference
        quantised = _random_gates(gen, 40, 8, quantise=True)
        fast = route(quantised.to(device), 2, 6, batch_priority=True)
        slow = route_loop(quantised, 2, 6, batch_priority=True)
        assert torch.equal(fast.expert_SK.cpu(), slow.expert_SK) and torch.equal(fast.kept_SK.cpu(), slow.kept_SK)
