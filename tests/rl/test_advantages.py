"""RLOO advantages and degenerate-group detection, with the values from RIPT's table (K = 8)."""

from __future__ import annotations

import numpy as np
import pytest

from pi0_lightning.rl.advantages import rloo_advantages, useful_groups


@pytest.mark.parametrize(
    ("s", "pos", "neg"), [(1, 1.0, -1 / 7), (2, 6 / 7, -2 / 7), (4, 4 / 7, -4 / 7), (7, 1 / 7, -1.0)]
)
def test_rloo_values_for_k8(s, pos, neg):
    rewards = np.array([[1.0] * s + [0.0] * (8 - s)])
    adv = rloo_advantages(rewards)[0]
    np.testing.assert_allclose(adv[:s], pos, rtol=1e-6)
    np.testing.assert_allclose(adv[s:], neg, rtol=1e-6)
    assert abs(adv.sum()) < 1e-6  # zero-sum within a group


def test_leave_one_out_by_hand_k3():
    # A_k = r_k - mean of the other two
    adv = rloo_advantages(np.array([[1.0, 0.0, 1.0]]))[0]
    np.testing.assert_allclose(adv, [1 - 0.5, 0 - 1.0, 1 - 0.5])


def test_degenerate_groups_have_zero_advantage_and_are_not_useful():
    rewards = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=float)
    adv = rloo_advantages(rewards)
    assert not adv[:2].any()
    assert useful_groups(rewards).tolist() == [False, False, True]
    # A > 0 exactly for the successes of a useful group
    assert ((adv[2] > 0) == (rewards[2] == 1)).all()


def test_bad_shapes_rejected():
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_advantages(np.zeros((3, 1)))
