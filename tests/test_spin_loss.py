"""Tests for objectives.spin: SPIN losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from objectives.spin import LOSS_TYPES, spin_loss, spin_metrics

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
    # Per-token mean log-ratios with the lengths below:
    #   real 0.5/2 = 0.25, -1.0/4 = -0.25, 3.5/7 = 0.5
    #   generated -1.0/1 = -1.0, 1.5/3 = 0.5, -1.0/5 = -0.2
    #   m̄ = 1.25, -0.75, 0.7; target 1/(2β) = 1.
    "ipo_mean": [(1.25 - 1.0) ** 2, (-0.75 - 1.0) ** 2, (0.7 - 1.0) ** 2],
}
REAL_LENGTHS = [2, 4, 7]
GENERATED_LENGTHS = [1, 3, 5]


def _lengths(loss_type, real=REAL_LENGTHS, generated=GENERATED_LENGTHS):
    """The token counts "ipo_mean" requires (the other loss types ignore them)."""
    if loss_type != "ipo_mean":
        return {}
    return {"real_lengths": torch.tensor(real), "generated_lengths": torch.tensor(generated)}


def _inputs(*rows, requires_grad=False):
    return [torch.tensor(row, dtype=torch.float64, requires_grad=requires_grad) for row in rows]


def _hand_inputs(requires_grad=False):
    return _inputs(
        POLICY_REAL, POLICY_GENERATED, REF_REAL, REF_GENERATED, requires_grad=requires_grad
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_hand_computed_values(loss_type):
    loss = spin_loss(*_hand_inputs(), beta=BETA, loss_type=loss_type, **_lengths(loss_type))
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


INF = float("inf")
NON_FINITE_CASES = {
    # (policy_real, policy_generated, ref_real, ref_generated)
    "ref_generated_impossible": ([-1.0], [-2.0], [-1.5], [-INF]),
    "ref_real_impossible": ([-1.0], [-2.0], [-INF], [-1.0]),
    "ref_both_impossible": ([-1.0], [-2.0], [-INF], [-INF]),
    "policy_real_impossible": ([-INF], [-2.0], [-1.5], [-1.0]),
    "policy_both_impossible": ([-INF], [-INF], [-1.5], [-1.0]),
    "all_impossible": ([-INF], [-INF], [-INF], [-INF]),
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("case", sorted(NON_FINITE_CASES))
def test_an_impossible_pair_gives_zero_loss_and_no_gradient(loss_type, case):
    # The impossible pair sits between two hand pairs, whose losses and gradients must be
    # exactly those they get without it.
    impossible = NON_FINITE_CASES[case]
    rows = [[hand[0], bad[0], hand[1]] for hand, bad in zip(BELOW_TARGET, impossible, strict=True)]
    policy_real, policy_generated = _inputs(*rows[:2], requires_grad=True)
    ref_real, ref_generated = _inputs(*rows[2:])
    lengths = _lengths(loss_type, real=[2, 3, 4], generated=[5, 6, 7])
    loss = spin_loss(
        policy_real,
        policy_generated,
        ref_real,
        ref_generated,
        beta=0.1,
        loss_type=loss_type,
        **lengths,
    )
    loss.sum().backward()
    assert loss[1].item() == 0.0
    assert policy_real.grad[1].item() == 0.0 and policy_generated.grad[1].item() == 0.0

    kept = [0, 2]
    alone_real, alone_generated = _inputs(
        *[[r[i] for i in kept] for r in rows[:2]], requires_grad=True
    )
    alone_ref_real, alone_ref_generated = _inputs(*[[r[i] for i in kept] for r in rows[2:]])
    alone = spin_loss(
        alone_real,
        alone_generated,
        alone_ref_real,
        alone_ref_generated,
        beta=0.1,
        loss_type=loss_type,
        **_lengths(loss_type, real=[2, 4], generated=[5, 7]),
    )
    alone.sum().backward()
    torch.testing.assert_close(loss[kept], alone, rtol=0, atol=0)
    torch.testing.assert_close(policy_real.grad[kept], alone_real.grad, rtol=0, atol=0)
    torch.testing.assert_close(policy_generated.grad[kept], alone_generated.grad, rtol=0, atol=0)

    metrics = spin_metrics(policy_real, policy_generated, ref_real, ref_generated, beta=0.1)
    alone_metrics = spin_metrics(
        alone_real, alone_generated, alone_ref_real, alone_ref_generated, beta=0.1
    )
    assert metrics["pairs/impossible"] == pytest.approx(1 / 3)
    assert alone_metrics.pop("pairs/impossible") == 0.0
    for key, value in alone_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


# Log-probs of long responses: 4,000 tokens at -2.5 to -40 nats per token, far below -1e4.
LONG = (
    [-1.0e4 - 3.0, -4.0e4],
    [-1.2e4, -1.6e5 + 7.0],
    [-1.0e4 - 1.0, -4.0e4 + 2.0],
    [-1.2e4 + 1.5, -1.6e5],
)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_finite_log_probs_far_below_ten_thousand_get_the_analytic_gradient(loss_type):
    beta = 0.1
    real_lengths, generated_lengths = [4000.0, 4000.0], [3000.0, 4000.0]
    policy_real, policy_generated = _inputs(*LONG[:2], requires_grad=True)
    ref_real, ref_generated = _inputs(*LONG[2:])
    lengths = _lengths(loss_type, real=real_lengths, generated=generated_lengths)
    loss = spin_loss(
        policy_real,
        policy_generated,
        ref_real,
        ref_generated,
        beta=beta,
        loss_type=loss_type,
        **lengths,
    )
    loss.sum().backward()
    # Closed forms in the scalar margin, computed here with math on Python floats.
    scale_real = [1.0 / n if loss_type == "ipo_mean" else 1.0 for n in real_lengths]
    scale_gen = [1.0 / n if loss_type == "ipo_mean" else 1.0 for n in generated_lengths]
    for i in range(2):
        m = (LONG[0][i] - LONG[2][i]) * scale_real[i] - (LONG[1][i] - LONG[3][i]) * scale_gen[i]
        if loss_type == "sigmoid":
            value, slope = math.log1p(math.exp(-beta * m)), -beta / (1.0 + math.exp(beta * m))
        elif loss_type == "hinge":
            value, slope = max(0.0, 1.0 - beta * m), (-beta if beta * m < 1.0 else 0.0)
        else:
            value, slope = (m - 1.0 / (2.0 * beta)) ** 2, 2.0 * (m - 1.0 / (2.0 * beta))
        assert loss[i].item() == pytest.approx(value, rel=1e-12)
        assert policy_real.grad[i].item() == pytest.approx(slope * scale_real[i], rel=1e-12)
        assert policy_generated.grad[i].item() == pytest.approx(-slope * scale_gen[i], rel=1e-12)
        assert slope != 0.0 or loss_type == "hinge"


def test_ipo_mean_requires_both_lengths():
    inputs = _hand_inputs()
    with pytest.raises(ValueError, match=r"ipo_mean.*real_lengths and generated_lengths"):
        spin_loss(*inputs, loss_type="ipo_mean")
    with pytest.raises(ValueError, match=r"pass generated_lengths"):
        spin_loss(*inputs, loss_type="ipo_mean", real_lengths=torch.tensor(REAL_LENGTHS))
    with pytest.raises(ValueError, match="real_lengths"):
        spin_loss(
            *inputs,
            loss_type="ipo_mean",
            real_lengths=torch.tensor([1, 2]),
            generated_lengths=torch.tensor(GENERATED_LENGTHS),
        )


def test_summed_loss_types_ignore_lengths():
    lengths = {
        "real_lengths": torch.tensor(REAL_LENGTHS),
        "generated_lengths": torch.tensor(GENERATED_LENGTHS),
    }
    for loss_type in ("sigmoid", "hinge", "ipo"):
        torch.testing.assert_close(
            spin_loss(*_hand_inputs(), beta=BETA, loss_type=loss_type, **lengths),
            torch.tensor(EXPECTED[loss_type], dtype=torch.float64),
            rtol=0,
            atol=1e-12,
        )


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


finite_logps = st.floats(min_value=-1e6, max_value=1e2, allow_nan=False, allow_infinity=False)


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
    # Independent scalar checks: the sigmoid loss (math.log1p/exp, overflow-safe form), and the
    # length-normalized IPO loss with token counts 1..9.
    real_lengths = [1 + (3 * i) % 9 for i in range(len(rows[0]))]
    generated_lengths = [1 + (5 * i + 2) % 9 for i in range(len(rows[0]))]
    ipo_mean = spin_loss(
        policy_real,
        policy_generated,
        ref_real,
        ref_generated,
        beta=beta,
        loss_type="ipo_mean",
        real_lengths=torch.tensor(real_lengths),
        generated_lengths=torch.tensor(generated_lengths),
    ).detach()
    for i in range(len(rows[0])):
        m = (rows[0][i] - rows[2][i]) / real_lengths[i] - (
            rows[1][i] - rows[3][i]
        ) / generated_lengths[i]
        expected = (m - 1.0 / (2.0 * beta)) ** 2
        assert ipo_mean[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    sigmoid = spin_loss(policy_real, policy_generated, ref_real, ref_generated, beta=beta).detach()
    for i in range(len(rows[0])):
        u = beta * ((rows[0][i] - rows[2][i]) - (rows[1][i] - rows[3][i]))
        expected = max(-u, 0.0) + math.log1p(math.exp(-abs(u)))
        assert sigmoid[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
