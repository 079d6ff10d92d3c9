"""Tests of the terminal-only losses (trajectory balance with a per-row or relative
target, the log-variance loss) and of modified SubTB's termination-gradient rule.

References: plain Python loops over trajectories and over pairs of trajectories in
float64, closed forms on hand-made batches, and torchgfn's LogPartitionVariance,
RelativeLogPartitionVariance and RelativeTrajectoryBalance objectives.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from objectives import (
    log_variance_loss,
    modified_subtb_loss,
    terminal_log_ratios,
    trajectory_balance_loss,
)
from objectives.subtb import FORBIDDEN_LOG_REWARD_MARGIN
from tests.test_subtb import leaves, random_batch

EPS64 = torch.finfo(torch.float64).eps
WEIGHTINGS = ("batch", "geometric_within")


def random_prior(batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return -torch.rand(batch, generator=gen, dtype=torch.float64) * 6


def loop_ratio(log_pf, log_pterm, log_reward, lengths, b, temperature=1.0, log_prior=None):
    """δ_b written term by term from the definition (finite inputs)."""
    n = int(lengths[b])
    log_q = log_pterm[b, n]
    for k in range(n):
        log_q = log_q + log_pf[b, k]
    prior = 0.0 if log_prior is None else log_prior[b]
    return prior + log_reward[b, n] / temperature - log_q


def loop_log_variance(log_pf, log_pterm, log_reward, lengths, group, temperature=1.0, prior=None):
    """Mean over groups of Σ_{a<b in group} (δ_a − δ_b)² / (N(N−1)), the pair form of the
    unbiased sample variance: no group mean is ever formed."""
    ratios = [
        loop_ratio(log_pf, log_pterm, log_reward, lengths, b, temperature, prior)
        for b in range(log_pf.shape[0])
    ]
    members: dict[int, list[int]] = {}
    for b, g in enumerate(group.tolist()):
        members.setdefault(g, []).append(b)
    variances = []
    for rows in members.values():
        size = len(rows)
        if size < 2:
            continue
        total = 0.0
        for x in range(size):
            for y in range(x + 1, size):
                total = total + (ratios[rows[x]] - ratios[rows[y]]) ** 2
        variances.append(total / (size * (size - 1)))
    if not variances:
        return torch.zeros((), dtype=torch.float64)
    return sum(variances) / len(variances)


GROUPINGS = {
    "one_prompt": [0, 0, 0, 0, 0, 0, 0],
    "equal_sizes": [3, 3, 9, 9, 4, 4, 4],  # non-contiguous ids, sizes 2, 2, 3
    "with_singletons": [5, 1, 5, 7, 5, 2, 1],  # singletons 7 and 2 contribute nothing
}


# -- log-variance loss --------------------------------------------------------


@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
@pytest.mark.parametrize("with_prior", [False, True])
def test_log_variance_matches_pair_loop(grouping, with_prior):
    log_pf, log_pterm, log_reward, n = random_batch(7, 6, 20)
    group = torch.tensor(GROUPINGS[grouping])
    prior = random_prior(7, 21) if with_prior else None
    pf_v, pt_v, lr_v = leaves(log_pf, log_pterm, log_reward)
    pf_r, pt_r, lr_r = leaves(log_pf, log_pterm, log_reward)
    got = log_variance_loss(pf_v, pt_v, lr_v, n, group, log_prior=prior, reward_temperature=0.7)
    want = loop_log_variance(pf_r, pt_r, lr_r, n, group, 0.7, prior)
    # Both sides sum O(L) float64 terms of size ≤ ~20: 1e-12 relative is orders above rounding.
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert got.item() > 1e-2  # random inputs are far from balanced
    got.backward()
    want.backward()
    for ours, ref in ((pf_v, pf_r), (pt_v, pt_r), (lr_v, lr_r)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-14)


def test_log_variance_gradient_ignores_whether_the_group_mean_is_detached():
    log_pf, log_pterm, log_reward, n = random_batch(7, 5, 22)
    group = torch.tensor(GROUPINGS["equal_sizes"])
    pf, pt = leaves(log_pf, log_pterm)
    (ours,) = torch.autograd.grad(log_variance_loss(pf, pt, log_reward, n, group), pf)
    ratios = terminal_log_ratios(pf, pt, log_reward, n)
    total, groups = 0.0, 0
    for g in group.unique():
        rows = ratios[group == g]
        total = total + (rows - rows.mean().detach()).square().sum() / (len(rows) - 1)
        groups += 1
    (detached,) = torch.autograd.grad(total / groups, pf)
    torch.testing.assert_close(ours, detached, rtol=1e-12, atol=1e-14)


def test_log_variance_closed_form_two_responses():
    # Two responses of one prompt, L = 1: y_a = (token), y_b = () (empty).
    # δ_a = r_a − (p + s_1), δ_b = r_b − s_0; variance with N = 2 is (δ_a − δ_b)² / 2.
    p, s0, s1, r_a, r_b = -0.5, -1.2, 0.0, -2.0, -0.25
    log_pf = torch.tensor([[p], [0.0]], dtype=torch.float64)
    log_pterm = torch.tensor([[s0, s1], [s0, s1]], dtype=torch.float64)
    log_reward = torch.tensor([[9.0, r_a], [r_b, 9.0]], dtype=torch.float64)
    lengths = torch.tensor([1, 0])
    loss = log_variance_loss(log_pf, log_pterm, log_reward, lengths, torch.tensor([0, 0]))
    delta_a, delta_b = r_a - (p + s1), r_b - s0
    assert loss.item() == pytest.approx((delta_a - delta_b) ** 2 / 2, rel=1e-15)


def test_log_variance_all_singletons_is_connected_zero():
    log_pf, log_pterm, log_reward, n = random_batch(4, 3, 23)
    pf = log_pf.clone().requires_grad_(True)
    loss = log_variance_loss(pf, log_pterm, log_reward, n, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    (grad,) = torch.autograd.grad(loss, pf)
    assert torch.equal(grad, torch.zeros_like(pf))


def balanced_batch(with_prior: bool, temperature: float):
    """Random policy scores; rewards set so that q(y) ∝ prior(y) R(y)^(1/T) within each
    prompt (log c_g per prompt), plus the largest magnitude of any term that enters δ."""
    log_pf, log_pterm, _, n = random_batch(9, 6, 24)
    group = torch.tensor([0, 0, 0, 4, 4, 4, 4, 2, 2])
    log_c = torch.tensor([1.3, 0.0, -2.2, 0.0, 5.1], dtype=torch.float64)[group]
    prior = random_prior(9, 25) if with_prior else torch.zeros(9, dtype=torch.float64)
    log_q = torch.stack(
        [loop_ratio(log_pf, log_pterm, torch.zeros_like(log_pterm), n, b) for b in range(9)]
    )
    log_q = -log_q  # loop_ratio with zero reward and no prior is −log q
    log_reward = torch.full_like(log_pterm, 123.0)  # only the terminal entry is read
    final = temperature * (log_c + log_q - prior)
    log_reward[torch.arange(9), n] = final
    scale = max(log_pf.abs().max(), log_pterm.abs().max(), final.abs().max() / temperature, 6)
    return log_pf, log_pterm, log_reward, n, group, (prior if with_prior else None), float(scale)


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_log_variance_is_zero_with_zero_gradient_when_balanced(with_prior, temperature):
    log_pf, log_pterm, log_reward, n, group, prior, scale = balanced_batch(with_prior, temperature)
    pf, pt = leaves(log_pf, log_pterm)
    loss = log_variance_loss(
        pf, pt, log_reward, n, group, log_prior=prior, reward_temperature=temperature
    )
    # Rounding bound on |δ_b − log c_g|: the reward's construction and δ_b each sum at most
    # L + 3 = 9 terms of size ≤ scale, each addition off by ≤ eps·(running sum ≤ 9·scale):
    # ≤ 2·9·9·scale·eps in all (a loose, valid bound).
    bound = 2 * 9 * 9 * scale * EPS64
    assert 0.0 <= loss.item() <= (2 * bound) ** 2
    grads = torch.autograd.grad(loss, (pf, pt))
    # ∂loss/∂(log-prob) = ±2 (δ_b − mean_g)/((N_g − 1)·groups), |δ_b − mean_g| ≤ 2·bound.
    for grad in grads:
        assert grad.abs().max().item() <= 4 * bound
    # Moving one δ of the group {0, 1, 2} by x: that group's sample variance is
    # x²(4/9 + 1/9 + 1/9)/2 = x²/3, the others stay 0, and there are 3 groups: x²/9.
    assert n[1] >= 1  # so that log_pf[1, 0] is read
    perturbed = log_pf.clone()
    perturbed[1, 0] -= 0.1
    shift = (log_pf[1, 0] - perturbed[1, 0]).item()  # 0.1 up to the subtraction's rounding
    broken = log_variance_loss(
        perturbed, log_pterm, log_reward, n, group, log_prior=prior, reward_temperature=temperature
    )
    assert broken.item() == pytest.approx(shift**2 / 9, rel=1e-9)


# -- trajectory balance -------------------------------------------------------


def test_trajectory_balance_per_row_log_z_with_prior_matches_hand_loop():
    log_pf, log_pterm, log_reward, n = random_batch(6, 5, 26)
    prior = random_prior(6, 27)
    log_z = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(28))
    pf_v, pt_v, z_v = leaves(log_pf, log_pterm, log_z)
    pf_r, pt_r, z_r = leaves(log_pf, log_pterm, log_z)
    got = trajectory_balance_loss(
        pf_v, pt_v, log_reward, n, z_v, log_prior=prior, reward_temperature=1.3
    )
    want = 0.0
    for b in range(6):
        delta = loop_ratio(pf_r, pt_r, log_reward, n, b, 1.3, prior)
        want = want + (z_r[b] - delta) ** 2 / 6
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    got.backward()
    want.backward()
    for ours, ref in ((pf_v, pf_r), (pt_v, pt_r), (z_v, z_r)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-14)
    # A scalar log Z is shared by every row.
    scalar = trajectory_balance_loss(log_pf, log_pterm, log_reward, n, torch.tensor(0.4))
    rows = trajectory_balance_loss(log_pf, log_pterm, log_reward, n, torch.full((6,), 0.4))
    assert scalar.item() == rows.item()


def test_trajectory_balance_at_group_mean_is_log_variance_times_bessel():
    # With log Z_b the mean δ of b's prompt, TB = (1/B) Σ_g Σ_b c_b² and the log-variance
    # loss = (1/G) Σ_g Σ_b c_b² / (N_g − 1); with G groups of equal size N they differ
    # by the factor B / (G (N − 1)) = N / (N − 1).
    log_pf, log_pterm, log_reward, n = random_batch(6, 5, 29)
    group = torch.tensor([0, 1, 0, 1, 0, 1])
    ratios = terminal_log_ratios(log_pf, log_pterm, log_reward, n)
    means = torch.stack([ratios[group == g].mean() for g in group])
    tb = trajectory_balance_loss(log_pf, log_pterm, log_reward, n, means)
    lv = log_variance_loss(log_pf, log_pterm, log_reward, n, group)
    assert lv.item() == pytest.approx(tb.item() * 3 / 2, rel=1e-12)


# -- -inf handling ------------------------------------------------------------


def test_terminal_losses_with_minus_inf_are_finite_with_finite_gradients():
    log_pf, log_pterm, log_reward, n = random_batch(6, 5, 30, lengths=[5, 3, 0, 2, 4, 1])
    prior = random_prior(6, 31)
    log_pf[0, 2] = -math.inf  # a token the policy forbids (an off-policy draw)
    log_pterm[1, 3] = -math.inf  # the stop taken is forbidden by the policy
    log_reward[3, 2] = -math.inf  # the target forbids response 3
    prior[4] = -math.inf  # the prior forbids response 4
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    pf, pt, lr, pr = leaves(log_pf, log_pterm, log_reward, prior)
    z = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    for loss in (
        log_variance_loss(pf, pt, lr, n, group, log_prior=pr),
        log_variance_loss(pf, pt, lr, n, group),
        trajectory_balance_loss(pf, pt, lr, n, z, log_prior=pr),
    ):
        assert torch.isfinite(loss) and loss.item() > 0
        for grad in torch.autograd.grad(loss, (pf, pt, lr, pr, z), allow_unused=True):
            assert grad is None or torch.isfinite(grad).all()


def test_minus_inf_terminal_target_equals_the_documented_floor():
    log_pf, log_pterm, log_reward, n = random_batch(5, 4, 32, lengths=[4, 2, 3, 0, 1])
    prior = random_prior(5, 33)
    group = torch.tensor([0, 0, 0, 1, 1])
    forbidden = log_reward.clone()
    forbidden[2, 3] = -math.inf
    targets = [prior[b] + log_reward[b, n[b]] / 0.5 for b in range(5) if b != 2]
    explicit = log_reward.clone()
    # Floored target = smallest finite target − margin, i.e. reward = (floor − prior)·T.
    floor = min(t.item() for t in targets) - FORBIDDEN_LOG_REWARD_MARGIN
    explicit[2, 3] = (floor - prior[2]) * 0.5
    got = log_variance_loss(
        log_pf, log_pterm, forbidden, n, group, log_prior=prior, reward_temperature=0.5
    )
    want = loop_log_variance(log_pf, log_pterm, explicit, n, group, 0.5, prior)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_bf16_and_float32_inputs_give_a_float32_loss_close_to_float64():
    log_pf, log_pterm, log_reward, n = random_batch(8, 12, 34)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    for dtype in (torch.bfloat16, torch.float32):
        low = [t.to(dtype) for t in (log_pf, log_pterm, log_reward)]
        pf = low[0].clone().requires_grad_(True)
        loss = log_variance_loss(pf, low[1], low[2], n, group)
        assert loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss, pf)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        # Reference on the same (rounded) inputs in float64: bf16 and float32 values are
        # exact in float32 and float64, so only the float32 arithmetic differs. Each δ_b sums
        # L + 3 terms: error e ≤ (L + 3)·eps32·Σ|terms|; centred values move by ≤ 2e, so
        # each group's Σc²/(N−1) moves by ≤ (4e·max|c| + 4e²)·N/(N−1); a few final roundings.
        ref = [t.double() for t in low]
        want = log_variance_loss(*ref, n, group)
        eps32 = torch.finfo(torch.float32).eps
        valid = torch.arange(12).unsqueeze(0) < n.unsqueeze(1)
        magnitude = torch.where(valid, ref[0].abs(), 0.0).sum(1) + ref[1].abs().amax(1)
        magnitude = magnitude + ref[2].abs().gather(1, n.unsqueeze(1)).squeeze(1)
        e = 15 * eps32 * magnitude.max().item()
        ratios = terminal_log_ratios(*ref, n)
        centred = torch.cat([ratios[:4] - ratios[:4].mean(), ratios[4:] - ratios[4:].mean()])
        bound = (4 * e * centred.abs().max().item() + 4 * e**2) * 4 / 3
        assert abs(loss.item() - want.item()) <= bound + 8 * eps32 * want.item()


# -- torchgfn -----------------------------------------------------------------


def per_step_logprobs(log_pf, log_pterm, lengths):
    """torchgfn layout [L+1, B]: token log-probs for k < n_b, the exit (stop) at k = n_b."""
    cap = log_pf.shape[1]
    positions = torch.arange(cap + 1).unsqueeze(1)
    tokens = torch.cat([log_pf, torch.zeros_like(log_pf[:, :1])], dim=1).T
    stop = log_pterm.gather(1, lengths.unsqueeze(1)).squeeze(1)
    steps = torch.where(positions < lengths, tokens, 0.0)
    return torch.where(positions == lengths, stop, steps)


def torchgfn_objective(kind, log_pf, log_pterm, lengths, prior_steps=None):
    from gfn.estimators import DiscretePolicyEstimator
    from gfn.gflownet import (
        LogPartitionVarianceGFlowNet,
        RelativeLogPartitionVarianceGFlowNet,
        RelativeTrajectoryBalanceGFlowNet,
    )
    from gfn.gflownet.losses import SquaredLoss
    from gfn.preprocessors import IdentityPreprocessor

    steps = per_step_logprobs(log_pf, log_pterm, lengths)

    def estimator():
        return DiscretePolicyEstimator(torch.nn.Identity(), 2, IdentityPreprocessor(output_dim=2))

    class GivenLPV(LogPartitionVarianceGFlowNet):
        def get_pfs_and_pbs(self, trajectories, recalculate_all_logprobs=True):
            return steps, torch.zeros_like(steps)

    class GivenRelativeLPV(RelativeLogPartitionVarianceGFlowNet):
        def trajectory_log_probs_forward(self, trajectories, recalculate_all_logprobs=True):
            return steps

    class GivenRTB(RelativeTrajectoryBalanceGFlowNet):
        def trajectory_log_probs_forward(self, trajectories, recalculate_all_logprobs=True):
            return steps

    if kind == "lpv":
        return GivenLPV(pf=estimator(), pb=None, constant_pb=True)
    cls = GivenRelativeLPV if kind == "relative_lpv" else GivenRTB
    return cls(pf=estimator(), prior_pf=estimator(), loss_fn=SquaredLoss())


def test_log_variance_matches_torchgfn_log_partition_variance():
    # torchgfn's LPV is the population variance of log q − log R over its whole batch:
    # ours is, per prompt, that times N/(N−1), then averaged over prompts.
    log_pf, log_pterm, log_reward, n = random_batch(7, 5, 35)
    group = torch.tensor(GROUPINGS["equal_sizes"])
    pf_ours, pt_ours = leaves(log_pf, log_pterm)
    pf_gfn, pt_gfn = leaves(log_pf, log_pterm)
    ours = log_variance_loss(pf_ours, pt_ours, log_reward, n, group, reward_temperature=0.9)
    theirs, groups = 0.0, 0
    for g in group.unique():
        rows = (group == g).nonzero().squeeze(1)
        final = log_reward[rows, n[rows]] / 0.9
        gfn = torchgfn_objective("lpv", pf_gfn[rows], pt_gfn[rows], n[rows])
        trajectories = SimpleNamespace(batch_size=len(rows))
        size = len(rows)
        theirs = theirs + gfn.loss(env=object(), trajectories=trajectories, log_rewards=final) * (
            size / (size - 1)
        )
        groups += 1
    theirs = theirs / groups
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(pf_ours.grad, pf_gfn.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pt_ours.grad, pt_gfn.grad, rtol=1e-12, atol=1e-14)


def test_relative_losses_match_torchgfn(monkeypatch):
    import gfn.gflownet.trajectory_balance as tb_module

    log_pf, log_pterm, log_reward, n = random_batch(6, 5, 36)
    prior = random_prior(6, 37)
    # The prior's per-step log-probs: any split summing to log prior(y_b) will do.
    prior_steps = torch.zeros(6, 6, dtype=torch.float64)
    prior_steps[0] = prior
    monkeypatch.setattr(tb_module, "get_trajectory_pfs", lambda *a, **k: prior_steps)
    final = log_reward[torch.arange(6), n]
    trajectories = SimpleNamespace(batch_size=6, states=SimpleNamespace(conditions=None))
    temperature = 0.8

    pf_ours, pf_gfn = leaves(log_pf, log_pf)
    ours = log_variance_loss(
        pf_ours,
        log_pterm,
        log_reward,
        n,
        torch.zeros(6, dtype=torch.long),
        log_prior=prior,
        reward_temperature=temperature,
    )
    gfn = torchgfn_objective("relative_lpv", pf_gfn, log_pterm, n)
    gfn.beta.fill_(1 / temperature)
    theirs = gfn.loss(env=object(), trajectories=trajectories, log_rewards=final) * 6 / 5
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(pf_ours.grad, pf_gfn.grad, rtol=1e-12, atol=1e-14)

    # Relative TB with a scalar log Z.
    rtb = torchgfn_objective("rtb", log_pf, log_pterm, n)
    rtb.beta.fill_(1 / temperature)
    rtb.logZ = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    theirs_tb = rtb.loss(env=object(), trajectories=trajectories, log_rewards=final)
    ours_tb = trajectory_balance_loss(
        log_pf,
        log_pterm,
        log_reward,
        n,
        torch.tensor(0.7, dtype=torch.float64),
        log_prior=prior,
        reward_temperature=temperature,
    )
    assert ours_tb.item() == pytest.approx(theirs_tb.item(), rel=1e-12)


# -- termination gradient in modified SubTB ----------------------------------


def anchor_term(log_pf, log_pterm, log_reward, lengths, lam, weighting, temperature):
    """Σ_b λ^(n_b−1) r_{0,n_b}² / normalizer (the loss's own normalizer), by a loop."""
    normalizers, anchors = [], []
    for b in range(log_pf.shape[0]):
        n = int(lengths[b])
        weights = [lam ** (j - i - 1) for i in range(n) for j in range(i + 1, n + 1)]
        normalizers.append(sum(weights))
        if n == 0:
            anchors.append(None)
            continue
        flow_0 = log_reward[b, 0] / temperature - log_pterm[b, 0]
        flow_n = log_reward[b, n] / temperature - log_pterm[b, n]
        anchors.append(lam ** (n - 1) * (flow_0 + log_pf[b, :n].sum() - flow_n) ** 2)
    if weighting == "batch":
        return sum(a for a in anchors if a is not None) / sum(normalizers)
    per = [a / d for a, d in zip(anchors, normalizers, strict=True) if a is not None]
    return sum(per) / len(per)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_anchor_termination_keeps_value_and_routes_stop_gradient_to_the_anchor(weighting, lam):
    log_pf, log_pterm, log_reward, n = random_batch(6, 6, 38)
    kw = {"subtb_lambda": lam, "weighting": weighting, "reward_temperature": 0.8}
    pf_a, pt_a, lr_a = leaves(log_pf, log_pterm, log_reward)
    pf_x, pt_x, lr_x = leaves(log_pf, log_pterm, log_reward)
    every = modified_subtb_loss(pf_a, pt_a, lr_a, n, **kw)
    anchored = modified_subtb_loss(pf_x, pt_x, lr_x, n, termination_gradient="anchor", **kw)
    assert torch.equal(anchored, every)  # the value, bit for bit
    every.backward()
    anchored.backward()
    # Token and reward gradients are those of the plain loss (same graph for them).
    torch.testing.assert_close(pf_x.grad, pf_a.grad, rtol=0, atol=0)
    torch.testing.assert_close(lr_x.grad, lr_a.grad, rtol=0, atol=0)
    # Stop gradients are those of the anchor windows alone, computed by a loop.
    pt_r = log_pterm.clone().requires_grad_(True)
    anchor_term(log_pf, pt_r, log_reward, n, lam, weighting, 0.8).backward()
    torch.testing.assert_close(pt_x.grad, pt_r.grad, rtol=1e-12, atol=1e-14)
    # Nonzero only at s_0 and s_{n_b} (λ = 0 has no full window unless n_b = 1).
    positions = torch.arange(log_pterm.shape[1]).unsqueeze(0)
    outside = (positions != 0) & (positions != n.unsqueeze(1))
    assert torch.equal(pt_x.grad[outside], torch.zeros_like(pt_x.grad[outside]))
    assert not torch.equal(pt_x.grad, pt_a.grad)


def test_tb_anchor_weight_adds_the_mean_full_trajectory_residual():
    log_pf, log_pterm, log_reward, n = random_batch(6, 5, 39)
    pf_v, pt_v = leaves(log_pf, log_pterm)
    pf_r, pt_r = leaves(log_pf, log_pterm)
    got = modified_subtb_loss(pf_v, pt_v, log_reward, n, subtb_lambda=0.9, tb_anchor_weight=0.3)
    base = modified_subtb_loss(pf_r, pt_r, log_reward, n, subtb_lambda=0.9)
    extra, count = 0.0, 0
    for b in range(6):
        m = int(n[b])
        if m == 0:
            continue
        residual = (
            (log_reward[b, 0] - pt_r[b, 0]) + pf_r[b, :m].sum() - (log_reward[b, m] - pt_r[b, m])
        )
        extra, count = extra + residual**2, count + 1
    want = base + 0.3 * extra / count
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(pf_v.grad, pf_r.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pt_v.grad, pt_r.grad, rtol=1e-12, atol=1e-14)
    # Under "anchor" the extra term's stop gradient is the anchor's: check the total.
    pt_x = log_pterm.clone().requires_grad_(True)
    modified_subtb_loss(
        log_pf,
        pt_x,
        log_reward,
        n,
        subtb_lambda=0.9,
        termination_gradient="anchor",
        tb_anchor_weight=0.3,
    ).backward()
    pt_y = log_pterm.clone().requires_grad_(True)
    (
        anchor_term(log_pf, pt_y, log_reward, n, 0.9, "batch", 1.0)
        + 0.3
        * sum(
            (
                (log_reward[b, 0] - pt_y[b, 0])
                + log_pf[b, : int(n[b])].sum()
                - (log_reward[b, int(n[b])] - pt_y[b, int(n[b])])
            )
            ** 2
            for b in range(6)
            if n[b] >= 1
        )
        / count
    ).backward()
    torch.testing.assert_close(pt_x.grad, pt_y.grad, rtol=1e-12, atol=1e-14)


def test_anchor_termination_with_minus_inf_is_finite():
    log_pf, log_pterm, log_reward, n = random_batch(4, 6, 40, lengths=[6, 4, 0, 5])
    log_reward[0, 2] = -math.inf
    log_pterm[1, 4] = -math.inf
    log_pf[3, 1] = -math.inf
    pf, pt, lr = leaves(log_pf, log_pterm, log_reward)
    for weighting in WEIGHTINGS:
        loss = modified_subtb_loss(
            pf, pt, lr, n, weighting=weighting, termination_gradient="anchor", tb_anchor_weight=1.0
        )
        assert torch.isfinite(loss)
        for grad in torch.autograd.grad(loss, (pf, pt, lr)):
            assert torch.isfinite(grad).all()


# -- bad inputs ---------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    log_pf, log_pterm, log_reward, n = random_batch(3, 3, 41)
    with pytest.raises(ValueError, match=r"group must have shape \(3,\)"):
        log_variance_loss(log_pf, log_pterm, log_reward, n, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group must be an integer"):
        log_variance_loss(log_pf, log_pterm, log_reward, n, torch.zeros(3))
    with pytest.raises(ValueError, match=r"log_prior must have shape \(3,\)"):
        log_variance_loss(
            log_pf,
            log_pterm,
            log_reward,
            n,
            torch.zeros(3, dtype=torch.long),
            log_prior=torch.zeros(3, 1),
        )
    with pytest.raises(ValueError, match=r"termination_gradient.*'all'.*'anchor'.*'none'"):
        modified_subtb_loss(log_pf, log_pterm, log_reward, n, termination_gradient="none")
    with pytest.raises(ValueError, match=r"tb_anchor_weight"):
        modified_subtb_loss(log_pf, log_pterm, log_reward, n, tb_anchor_weight=-1.0)
    with pytest.raises(ValueError, match=r"log_z must have shape \(3,\) or be a scalar"):
        trajectory_balance_loss(log_pf, log_pterm, log_reward, n, torch.zeros(2))


# -- property test ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    cap=st.integers(0, 6),
    seed=st.integers(0, 2**31 - 1),
    forbidden_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float64]),
)
def test_property_new_losses_finite_nonnegative_with_finite_grads(
    batch, cap, seed, forbidden_fraction, dtype
):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, cap + 1, (batch,), generator=gen)
    log_pf = (torch.randn(batch, cap, generator=gen) * 5 - 2).to(dtype)
    log_pterm = (torch.randn(batch, cap + 1, generator=gen) * 5 - 2).to(dtype)
    log_reward = torch.randn(batch, cap + 1, generator=gen) * 50
    log_reward = log_reward.masked_fill(
        torch.rand(batch, cap + 1, generator=gen) < forbidden_fraction, -math.inf
    ).to(dtype)
    prior = (
        (-torch.rand(batch, generator=gen) * 10)
        .masked_fill(torch.rand(batch, generator=gen) < forbidden_fraction, -math.inf)
        .to(dtype)
    )
    group = torch.randint(0, 3, (batch,), generator=gen)
    pf, pt, lr, pr = leaves(log_pf, log_pterm, log_reward, prior)
    losses = [
        log_variance_loss(pf, pt, lr, lengths, group, log_prior=pr),
        trajectory_balance_loss(pf, pt, lr, lengths, torch.zeros(batch), log_prior=pr),
        modified_subtb_loss(
            pf, pt, lr, lengths, termination_gradient="anchor", tb_anchor_weight=1.0
        ),
    ]
    for loss in losses:
        assert torch.isfinite(loss) and loss.item() >= 0
        for grad in torch.autograd.grad(loss, (pf, pt, lr, pr), allow_unused=True):
            assert grad is None or torch.isfinite(grad).all()
