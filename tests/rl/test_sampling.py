"""Context sampling: rank sharding, seeded order, solved-context skipping with a bound, checkpointable state."""

from __future__ import annotations

import pytest

from pi0_lightning.rl.sampling import Context, ContextSampler, all_reduce_max, all_reduce_min

CONTEXTS = [Context(t, k) for t in range(2) for k in range(5)]


def test_ranks_get_disjoint_shards_covering_all_contexts():
    a = ContextSampler(CONTEXTS, rank=0, world_size=2, seed=1)
    b = ContextSampler(CONTEXTS, rank=1, world_size=2, seed=1)
    first, second = a.next(5), b.next(5)
    assert not set(first) & set(second) and set(first) | set(second) == set(CONTEXTS)


def test_order_is_seeded_and_wraps_into_a_new_epoch():
    a, b = ContextSampler(CONTEXTS, seed=3), ContextSampler(CONTEXTS, seed=3)
    assert a.next(10) == b.next(10)
    assert a.epoch == 0 and a.next(1) and a.epoch == 1
    assert ContextSampler(CONTEXTS, seed=4).next(10) != ContextSampler(CONTEXTS, seed=3).next(10)


def test_solved_contexts_are_skipped_a_bounded_number_of_times():
    s = ContextSampler(CONTEXTS[:2], seed=0, history_len=4, max_skips=2)
    solved = CONTEXTS[0]
    s.record(solved, [True] * 4)
    seen = [c for _ in range(6) for c in s.next(1)]
    # skipped twice, then forgotten (re-tested): it appears again, and the other context fills in meanwhile
    assert seen.count(solved) >= 1 and seen.count(CONTEXTS[1]) >= 3
    assert s.skipped_total == 3 and solved not in s.history


def test_a_failure_in_history_means_not_solved():
    s = ContextSampler(CONTEXTS[:2], seed=0, history_len=4)
    s.record(CONTEXTS[0], [True, True, True, False])
    assert CONTEXTS[0] in s.next(2)


def test_state_dict_round_trip_continues_identically():
    a = ContextSampler(CONTEXTS, seed=2)
    a.next(7)
    a.record(CONTEXTS[3], [True] * 8)
    b = ContextSampler(CONTEXTS, seed=2)
    b.load_state_dict(a.state_dict())
    assert a.next(9) == b.next(9)


def test_too_few_contexts_for_the_ranks():
    with pytest.raises(ValueError, match="cannot be sharded"):
        ContextSampler(CONTEXTS[:1], rank=0, world_size=2)


def test_reductions_without_distributed_are_identity():
    assert all_reduce_min(3) == 3 and all_reduce_max(5) == 5
