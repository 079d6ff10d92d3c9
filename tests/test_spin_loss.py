"""Tests for objectives.spin: SPIN losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from objectives.spin import DEFAULT_LOGP_FLOOR, spin_loss, spin_metrics

# Three pairs, β = 0.5 (IPO target 1/(2β) = 1). Per pair, by hand:
#   real log-ratio      = policy_real - ref_real:  0.5, -1.0, 3.5
#   generated log-ratio = policy_gen  - ref_gen:  -1.0,  1.5, -1.0
#   unscaled margin m:                              1.5, -2.5, 4.5
#   u = β m:                                        0.75, -1.25, 2.25
BETA = 0.5
POLICY_REAL = [-1.0, -3.0, -0.5]
POLICY_GENERATED = [-2.0, -1.0, -3.0]
REF_REAL = [-1.5, -2.0, -4.0]
REF_GENERATED = [-1.0, -2.5, -2.0]
EXPECTED = {
    "sigmoid": [
        math.log(1 + math.exp(-0.75)),
        math.log(1 + math.exp(1.25)),
        math.log(1 + math.exp(-2.25)),
    ],
    "hinge": [0.25, 2.25, 0.0],
    "ipo": [(1.5 - 1.0) ** 2, (-2.5 - 1.0) ** 2, (4.5 - 1.0) ** 2],
}


def _inputs(*rows, requires_grad=False):
    return [torch.tensor(row, dtype=torch.float64, requires_grad=requires_grad) for row in rows]


def _hand_inputs(requires_grad=False):
    return _inputs(
        POLICY_REAL, POLICY_GENERATED, REF_REAL, REF_GENERATED, requires_grad=requires_grad
    )


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_hand_computed_values(loss_type):
    loss = spin_loss(*_hand_inputs(), beta=BETA, loss_type=loss_type)
    assert loss.shape == (3,)
    torch.testing.assert_close(
        loss, torch.tensor(EXPECTED[loss_type], dtype=torch.float64), rtol=0, atol=1e-6
    )


def test_default_is_sigmoid_with_beta_point_one():
    # m = 1.5 for pair 0, so u = 0.15 at β = 0.1.
    loss = spin_loss(*_inputs([-1.0], [-2.0], [-1.5], [-1.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.15)), abs=1e-6)


def test_sigmoid_is_stable_at_large_margins():
    # m = ±2000, β = 0.5: u = ±1000, where naive log(1 + exp(-u)) overflows.
    loss = spin_loss(*_inputs([0.0, -2000.0], [-2000.0, 0.0], [0.0, 0.0], [0.0, 0.0]), beta=0.5)
    torch.testing.assert_close(
        loss, torch.tensor([0.0, 1000.0], dtype=torch.float64), atol=1e-6, rtol=0
    )


def _grads(loss_type, rows, beta):
    policy_real, policy_generated = _inputs(*rows[:2], requires_grad=True)
    ref_real, ref_generated = _inputs(*rows[2:])
    spin_loss(
        policy_real, policy_generated, ref_real, ref_generated, beta=beta, loss_type=loss_type
    ).sum().backward()
    return policy_real.grad, policy_generated.grad


# Margins m = 1.5, -2.5 at β = 0.1: u = 0.15, -0.25 < 1 (hinge active) and
# m < 1/(2β) = 5 (IPO below its target).
BELOW_TARGET = ([-1.0, -3.0], [-2.0, -1.0], [-1.5, -2.0], [-1.0, -2.5])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_gradient_raises_real_and_lowers_generated(loss_type):
    grad_real, grad_generated = _grads(loss_type, BELOW_TARGET, beta=0.1)
    assert (grad_real < 0).all()
    assert (grad_generated > 0).all()


def test_gradient_values_match_closed_form():
    # d/dp_real of -log σ(βm) = -β σ(-βm); hinge: -β; ipo: 2(m - 1/(2β)).
    margins = [1.5, -2.5]
    grad_real, grad_generated = _grads("sigmoid", BELOW_TARGET, beta=0.1)
    expected = [-0.1 / (1 + math.exp(0.1 * m)) for m in margins]
    torch.testing.assert_close(grad_real, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(grad_generated, -grad_real)
    grad_real, _ = _grads("hinge", BELOW_TARGET, beta=0.1)
    torch.testing.assert_close(grad_real, torch.tensor([-0.1, -0.1], dtype=torch.float64))
    grad_real, _ = _grads("ipo", BELOW_TARGET, beta=0.1)
    torch.testing.assert_close(
        grad_real, torch.tensor([2 * (m - 5.0) for m in margins], dtype=torch.float64)
    )


def test_hinge_and_ipo_past_their_targets():
    # Pair 2 of the hand inputs: u = 2.25 > 1, m = 4.5 > 1/(2β) = 1.
    rows = ([POLICY_REAL[2]], [POLICY_GENERATED[2]], [REF_REAL[2]], [REF_GENERATED[2]])
    grad_real, grad_generated = _grads("hinge", rows, beta=BETA)
    assert grad_real.item() == 0.0 and grad_generated.item() == 0.0
    grad_real, grad_generated = _grads("ipo", rows, beta=BETA)
    assert grad_real.item() > 0 and grad_generated.item() < 0


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("log_z", [-7.25, 3.0, 100.0])
def test_reference_normalizer_cancels(loss_type, log_z):
    policy_real, policy_generated, ref_real, ref_generated = _hand_inputs()
    loss = spin_loss(
        policy_real, policy_generated, ref_real, ref_generated, beta=BETA, loss_type=loss_type
    )
    shifted = spin_loss(
        policy_real,
        policy_generated,
        ref_real + log_z,
        ref_generated + log_z,
        beta=BETA,
        loss_type=loss_type,
    )
    torch.testing.assert_close(shifted, loss, rtol=0, atol=1e-9)
    # Shifting only one side is not a normalizer and must change the loss.
    one_sided = spin_loss(
        policy_real,
        policy_generated,
        ref_real + log_z,
        ref_generated,
        beta=BETA,
        loss_type=loss_type,
    )
    assert not torch.allclose(one_sided, loss)


@pytest.mark.parametrize("loss_type", ["dpo", "Sigmoid", ""])
def test_unknown_loss_type(loss_type):
    with pytest.raises(ValueError, match=r"loss_type.*sigmoid.*hinge.*ipo"):
        spin_loss(*_hand_inputs(), loss_type=loss_type)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf"), "big"])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        spin_loss(*_hand_inputs(), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        spin_metrics(*_hand_inputs(), beta=beta)


def test_shape_mismatch():
    policy_real, policy_generated, ref_real, _ = _hand_inputs()
    with pytest.raises(ValueError, match="ref_generated_logps"):
        spin_loss(policy_real, policy_generated, ref_real, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="policy_real_logps"):
        spin_loss(policy_real[:, None], policy_generated, ref_real, ref_real)
    with pytest.raises(ValueError, match="ref_real_logps"):
        spin_metrics(policy_real, policy_generated, [0.0, 0.0, 0.0], ref_real)


def test_bad_floor():
    with pytest.raises(ValueError, match="logp_floor"):
        spin_loss(*_hand_inputs(), logp_floor=float("-inf"))


INF = float("inf")
NON_FINITE_CASES = {
    # (policy_real, policy_generated, ref_real, ref_generated)
    "ref_generated_impossible": ([-1.0], [-2.0], [-1.5], [-INF]),
    "ref_real_impossible": ([-1.0], [-2.0], [-INF], [-1.0]),
    "ref_both_impossible": ([-1.0], [-2.0], [-INF], [-INF]),
    "policy_both_impossible": ([-INF], [-INF], [-1.5], [-1.0]),
    "all_impossible": ([-INF], [-INF], [-INF], [-INF]),
}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("case", sorted(NON_FINITE_CASES))
def test_negative_infinity_gives_finite_loss_and_grads(loss_type, case):
    rows = NON_FINITE_CASES[case]
    policy_real, policy_generated = _inputs(*rows[:2], requires_grad=True)
    ref_real, ref_generated = _inputs(*rows[2:])
    loss = spin_loss(
        policy_real, policy_generated, ref_real, ref_generated, beta=0.1, loss_type=loss_type
    )
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert torch.isfinite(policy_real.grad).all()
    assert torch.isfinite(policy_generated.grad).all()
    metrics = spin_metrics(policy_real, policy_generated, ref_real, ref_generated, beta=0.1)
    assert all(math.isfinite(value) for value in metrics.values())


def test_negative_infinity_is_the_floor():
    rows = NON_FINITE_CASES["ref_generated_impossible"]
    at_floor = (*rows[:3], [DEFAULT_LOGP_FLOOR])
    for loss_type in ["sigmoid", "hinge", "ipo"]:
        torch.testing.assert_close(
            spin_loss(*_inputs(*rows), loss_type=loss_type),
            spin_loss(*_inputs(*at_floor), loss_type=loss_type),
        )
    # y' impossible under the reference: large loss, and the policy is pushed off y'.
    policy_real, policy_generated = _inputs(*rows[:2], requires_grad=True)
    ref_real, ref_generated = _inputs(*rows[2:])
    spin_loss(policy_real, policy_generated, ref_real, ref_generated).sum().backward()
    assert policy_generated.grad.item() > 0


def test_low_precision_inputs_computed_in_float32():
    policy_real, policy_generated, ref_real, ref_generated = (
        t.to(torch.bfloat16) for t in _hand_inputs()
    )
    loss = spin_loss(policy_real, policy_generated, ref_real, ref_generated, beta=BETA)
    assert loss.dtype == torch.float32
    # The hand inputs are exact in bf16.
    torch.testing.assert_close(loss, torch.tensor(EXPECTED["sigmoid"], dtype=torch.float32))


def test_metrics_hand_computed():
    metrics = spin_metrics(*_hand_inputs(), beta=BETA)
    # Rewards β·log-ratio: real 0.25, -0.5, 1.75; generated -0.5, 0.75, -0.5.
    assert metrics["rewards/real"] == pytest.approx((0.25 - 0.5 + 1.75) / 3, abs=1e-6)
    assert metrics["rewards/generated"] == pytest.approx((-0.5 + 0.75 - 0.5) / 3, abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx((0.75 - 1.25 + 2.25) / 3, abs=1e-6)
    assert metrics["rewards/accuracies"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["logps/real"] == pytest.approx(sum(POLICY_REAL) / 3, abs=1e-6)
    assert metrics["logps/generated"] == pytest.approx(sum(POLICY_GENERATED) / 3, abs=1e-6)
    assert all(isinstance(value, float) for value in metrics.values())


def test_metrics_accuracy_is_strict():
    # Equal rewards (margin 0) do not count as correct.
    metrics = spin_metrics(*_inputs([-1.0], [-1.0], [-2.0], [-2.0]))
    assert metrics["rewards/accuracies"] == 0.0


def test_metrics_do_not_track_gradients():
    policy_real, policy_generated = _inputs(POLICY_REAL, POLICY_GENERATED, requires_grad=True)
    ref_real, ref_generated = _inputs(REF_REAL, REF_GENERATED)
    spin_metrics(policy_real, policy_generated, ref_real, ref_generated)
    assert policy_real.grad is None


finite_logps = st.floats(min_value=-1e3, max_value=1e2, allow_nan=False, allow_infinity=False)


@st.composite
def spin_batches(draw):
    size = draw(st.integers(min_value=1, max_value=8))
    rows = [draw(st.lists(finite_logps, min_size=size, max_size=size)) for _ in range(4)]
    beta = draw(st.floats(min_value=1e-3, max_value=10.0))
    return rows, beta


@settings(max_examples=200, deadline=None, derandomize=True)
@given(spin_batches())
def test_losses_nonnegative_and_finite(batch):
    rows, beta = batch
    policy_real, policy_generated = _inputs(*rows[:2], requires_grad=True)
    ref_real, ref_generated = _inputs(*rows[2:])
    for loss_type in ["sigmoid", "hinge", "ipo"]:
        loss = spin_loss(
            policy_real, policy_generated, ref_real, ref_generated, beta=beta, loss_type=loss_type
        )
        assert torch.isfinite(loss).all()
        assert (loss >= 0).all()
        grad_real, grad_generated = torch.autograd.grad(loss.sum(), [policy_real, policy_generated])
        assert torch.isfinite(grad_real).all() and torch.isfinite(grad_generated).all()
        # Every loss depends on the pair only through the margin, so the grads are opposite.
        torch.testing.assert_close(grad_generated, -grad_real)
    # Independent scalar check of the sigmoid loss (math.log1p/exp, overflow-safe form).
    sigmoid = spin_loss(policy_real, policy_generated, ref_real, ref_generated, beta=beta).detach()
    for i in range(len(rows[0])):
        u = beta * ((rows[0][i] - rows[2][i]) - (rows[1][i] - rows[3][i]))
        expected = max(-u, 0.0) + math.log1p(math.exp(-abs(u)))
        assert sigmoid[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
