"""Tests of objectives.subtb against independent computations.

References used: a plain Python double loop over (i, j) written from the
formula in docs/gflownet.md, an exactly balanced enumerable policy/target pair
(loss must be 0), and torchgfn's own SubTBGFlowNet pairing and weighting code.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from objectives.subtb import (
    FORBIDDEN_LOG_REWARD_MARGIN,
    modified_db_loss,
    modified_subtb_loss,
    trajectory_balance_loss,
)

LAMBDAS = (0.5, 0.9, 1.0, 2.0)
WEIGHTINGS = ("batch", "geometric_within")


def random_batch(
    batch: int,
    cap: int,
    seed: int,
    *,
    lengths: list[int] | None = None,
    dtype: torch.dtype = torch.float64,
    garbage_past_end: bool = True,
):
    """A batch in the conventions of docs/conventions.md, with garbage rewards past n_b."""
    gen = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(0, cap + 1, (batch,), generator=gen).tolist()
        lengths[0], lengths[-1] = 0, cap  # always cover both ends
    n = torch.tensor(lengths, dtype=torch.long)
    positions = torch.arange(cap + 1)
    state_valid = positions.unsqueeze(0) <= n.unsqueeze(1)
    log_pf = -torch.rand(batch, cap, generator=gen, dtype=dtype) * 3
    log_pf = torch.where(state_valid[:, 1:], log_pf, 0.0)
    log_pterm = -torch.rand(batch, cap + 1, generator=gen, dtype=dtype) * 3
    log_pterm = torch.where(state_valid, log_pterm, 0.0)
    log_pterm[:, cap] = 0.0  # forced stop at the cap
    log_reward = torch.randn(batch, cap + 1, generator=gen, dtype=dtype) * 4 - 5
    if garbage_past_end:
        garbage = torch.randn(batch, cap + 1, generator=gen, dtype=dtype) * 1e6
        garbage[:, ::2] = -math.inf
        log_reward = torch.where(state_valid, log_reward, garbage)
    return log_pf, log_pterm, log_reward, n


def loop_subtb(log_pf, log_pterm, log_reward, lengths, lam, weighting, temperature=1.0):
    """Reference: the formula of docs/gflownet.md, one pair at a time (finite inputs only)."""
    per_trajectory, total_num, total_den = [], 0.0, 0.0
    for b in range(log_pf.shape[0]):
        n = int(lengths[b])

        def log_flow(k, b=b):
            return log_reward[b, k] / temperature - log_pterm[b, k]

        num, den = 0.0, 0.0
        for i in range(n):
            for j in range(i + 1, n + 1):
                residual = log_flow(i) + log_pf[b, i:j].sum() - log_flow(j)
                weight = lam ** (j - i - 1)
                num = num + weight * residual**2
                den = den + weight
        total_num, total_den = total_num + num, total_den + den
        if n >= 1:
            per_trajectory.append(num / den)
    if weighting == "batch":
        return total_num / total_den
    return sum(per_trajectory) / len(per_trajectory)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# -- vectorized == double loop ------------------------------------------------


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_double_loop_values_and_gradients(weighting, lam, seed):
    log_pf, log_pterm, log_reward, n = random_batch(6, 7, seed)
    temperature = 0.8 if seed == 2 else 1.0
    pf_v, pt_v = leaves(log_pf, log_pterm)
    pf_r, pt_r = leaves(log_pf, log_pterm)
    got = modified_subtb_loss(
        pf_v,
        pt_v,
        log_reward,
        n,
        subtb_lambda=lam,
        weighting=weighting,
        reward_temperature=temperature,
    )
    want = loop_subtb(pf_r, pt_r, log_reward, n, lam, weighting, temperature)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    assert got.item() > 1e-3  # random inputs are far from balanced
    got.backward()
    want.backward()
    torch.testing.assert_close(pf_v.grad, pf_r.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(pt_v.grad, pt_r.grad, rtol=0, atol=1e-6)


def test_garbage_past_lengths_is_ignored():
    log_pf, log_pterm, log_reward, n = random_batch(5, 6, 3)
    _, _, clean, _ = random_batch(5, 6, 3, garbage_past_end=False)
    for weighting in WEIGHTINGS:
        dirty = modified_subtb_loss(log_pf, log_pterm, log_reward, n, weighting=weighting)
        tidy = modified_subtb_loss(log_pf, log_pterm, clean, n, weighting=weighting)
        assert torch.isfinite(dirty)
        assert dirty.item() == pytest.approx(tidy.item(), rel=1e-12)


def test_large_lambda_on_long_trajectories_does_not_overflow():
    # 2^299 overflows float32; the rescaled weights must give the float64 loop's value.
    cap = 300
    log_pf, log_pterm, log_reward, n = random_batch(3, cap, 4, lengths=[cap, 5, 120])
    for weighting in WEIGHTINGS:
        got = modified_subtb_loss(
            log_pf.float(),
            log_pterm.float(),
            log_reward.float(),
            n,
            subtb_lambda=2.0,
            weighting=weighting,
        )
        want = fast_loop_value(log_pf, log_pterm, log_reward, n, 2.0, weighting)
        assert torch.isfinite(got)
        assert got.item() == pytest.approx(want, rel=1e-4)


def fast_loop_value(log_pf, log_pterm, log_reward, lengths, lam, weighting):
    """Same loop as loop_subtb on Python floats (value only, exact λ^(j-i-1))."""
    pf, pt, lr = log_pf.tolist(), log_pterm.tolist(), log_reward.tolist()
    per_trajectory, total_num, total_den = [], 0.0, 0.0
    for b, n in enumerate(lengths.tolist()):
        flow = [lr[b][k] - pt[b][k] for k in range(n + 1)]
        num, den = 0.0, 0.0
        for i in range(n):
            path = 0.0
            for j in range(i + 1, n + 1):
                path += pf[b][j - 1]
                weight = float(lam) ** (j - i - 1)
                num += weight * (flow[i] + path - flow[j]) ** 2
                den += weight
        total_num, total_den = total_num + num, total_den + den
        if n >= 1:
            per_trajectory.append(num / den)
    if weighting == "batch":
        return total_num / total_den
    return sum(per_trajectory) / len(per_trajectory)


def test_no_pairs_gives_connected_zero():
    log_pf, log_pterm, log_reward, _ = random_batch(4, 3, 5)
    pf = log_pf.clone().requires_grad_(True)
    n = torch.zeros(4, dtype=torch.long)
    for loss_fn in (
        lambda: modified_subtb_loss(pf, log_pterm, log_reward, n),
        lambda: modified_subtb_loss(pf, log_pterm, log_reward, n, weighting="geometric_within"),
        lambda: modified_db_loss(pf, log_pterm, log_reward, n),
    ):
        loss = loss_fn()
        assert loss.item() == 0.0
        assert loss.grad_fn is not None
        (grad,) = torch.autograd.grad(loss, pf)
        assert torch.equal(grad, torch.zeros_like(pf))


# -- exactly balanced policy --------------------------------------------------


def enumerate_balanced_batch(vocab: int, cap: int, seed: int, temperature: float):
    """Every response of a random autoregressive q for two prompts, with
    R(s_k⊤)^(1/T) = c_prompt · q(y_{1:k}⊤): the target q is exactly balanced."""
    gen = torch.Generator().manual_seed(seed)
    rows = {name: [] for name in ("pf", "pt", "lr", "n")}
    for log_c in (0.0, 3.7):  # one constant per prompt
        # One random next-token distribution (vocab tokens + stop) per prefix.
        tables = {}

        def step_logprobs(prefix, tables=tables):
            if prefix not in tables:
                tables[prefix] = torch.log_softmax(
                    torch.randn(vocab + 1, generator=gen, dtype=torch.float64) * 2, dim=0
                )
            return tables[prefix]

        for n in range(cap + 1):
            for response in itertools.product(range(vocab), repeat=n):
                pf = torch.zeros(cap, dtype=torch.float64)
                pt = torch.zeros(cap + 1, dtype=torch.float64)
                lr = torch.full((cap + 1,), -7.0, dtype=torch.float64)  # garbage past n
                for k in range(n + 1):
                    dist = step_logprobs(response[:k])
                    pt[k] = dist[vocab] if k < cap else 0.0  # forced stop at the cap
                    lr[k] = temperature * (log_c + pf[:k].sum() + pt[k])
                    if k < n:
                        pf[k] = dist[response[k]]
                rows["pf"].append(pf)
                rows["pt"].append(pt)
                rows["lr"].append(lr)
                rows["n"].append(n)
    return (
        torch.stack(rows["pf"]),
        torch.stack(rows["pt"]),
        torch.stack(rows["lr"]),
        torch.tensor(rows["n"]),
    )


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_exactly_balanced_policy_has_zero_loss(temperature):
    log_pf, log_pterm, log_reward, n = enumerate_balanced_batch(2, 3, 6, temperature)
    assert log_pf.shape == (2 * 15, 3)
    kw = {"reward_temperature": temperature}
    for weighting, lam in itertools.product(WEIGHTINGS, LAMBDAS):
        loss = modified_subtb_loss(
            log_pf, log_pterm, log_reward, n, subtb_lambda=lam, weighting=weighting, **kw
        )
        assert 0.0 <= loss.item() <= 1e-10
    assert modified_db_loss(log_pf, log_pterm, log_reward, n, **kw).item() <= 1e-10
    log_z = torch.full((n.shape[0],), 0.0, dtype=torch.float64)
    log_z[n.shape[0] // 2 :] = 3.7  # log Z = log c of each prompt
    assert trajectory_balance_loss(log_pf, log_pterm, log_reward, n, log_z, **kw).item() <= 1e-10

    # One perturbed token log-probability breaks the balance.
    perturbed = log_pf.clone()
    perturbed[-1, 1] -= 0.1
    for weighting in WEIGHTINGS:
        loss = modified_subtb_loss(perturbed, log_pterm, log_reward, n, weighting=weighting, **kw)
        assert loss.item() > 1e-5
    assert modified_db_loss(perturbed, log_pterm, log_reward, n, **kw).item() > 1e-5
    assert trajectory_balance_loss(perturbed, log_pterm, log_reward, n, log_z, **kw).item() > 1e-5


# -- forbidden prefixes (-inf log-rewards) ------------------------------------


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_minus_inf_reward_is_finite_and_pushes_stop_down(weighting, lam):
    log_pf, log_pterm, log_reward, n = random_batch(4, 6, 7, lengths=[6, 4, 0, 5])
    log_reward[0, 2] = -math.inf
    log_reward[1, 0] = -math.inf  # the empty response forbidden
    log_reward[3, 5] = -math.inf  # the complete response forbidden
    pf, pt, lr = leaves(log_pf, log_pterm, log_reward)
    loss = modified_subtb_loss(pf, pt, lr, n, subtb_lambda=lam, weighting=weighting)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    for grad in (pf.grad, pt.grad, lr.grad):
        assert torch.isfinite(grad).all()
    # Descent lowers log q(⊤|s) exactly where the target forbids stopping.
    for b, k in ((0, 2), (1, 0), (3, 5)):
        assert pt.grad[b, k] > 0


def test_minus_inf_reward_equals_the_documented_floor():
    log_pf, log_pterm, log_reward, n = random_batch(3, 5, 8, lengths=[5, 3, 4])
    forbidden = log_reward.clone()
    forbidden[0, 3] = -math.inf
    explicit = log_reward.clone()
    smallest = min(log_reward[b, : n[b] + 1].min().item() for b in range(3))
    explicit[0, 3] = smallest - FORBIDDEN_LOG_REWARD_MARGIN
    for weighting in WEIGHTINGS:
        want = loop_subtb(log_pf, log_pterm, explicit, n, 0.9, weighting)
        got = modified_subtb_loss(
            log_pf, log_pterm, forbidden, n, subtb_lambda=0.9, weighting=weighting
        )
        assert got.item() == pytest.approx(want.item(), rel=1e-10)
    # An absolute floor replaces the relative one.
    absolute = modified_subtb_loss(log_pf, log_pterm, forbidden, n, log_reward_floor=-500.0)
    explicit[0, 3] = -500.0
    assert absolute.item() == pytest.approx(
        loop_subtb(log_pf, log_pterm, explicit, n, 1.0, "batch").item()
    )


def test_gradient_step_lowers_stop_probability_at_forbidden_state():
    torch.manual_seed(0)
    cap, vocab = 5, 4
    response = [1, 3, 0, 2, 2]
    logits = torch.randn(cap + 1, vocab + 1, requires_grad=True)  # last column = stop

    def policy_scores(logits):
        logprobs = torch.log_softmax(logits, dim=-1)
        log_pf = logprobs[torch.arange(cap), torch.tensor(response)].unsqueeze(0)
        log_pterm = torch.cat([logprobs[:cap, vocab], torch.zeros(1)]).unsqueeze(0)
        return log_pf, log_pterm

    log_reward = torch.randn(1, cap + 1) - 3
    log_reward[0, 2] = -math.inf
    n = torch.tensor([cap])
    log_pf, log_pterm = policy_scores(logits)
    before = log_pterm[0, 2].item()
    modified_subtb_loss(log_pf, log_pterm, log_reward, n).backward()
    assert torch.isfinite(logits.grad).all()
    with torch.no_grad():
        logits -= 1e-3 * logits.grad
    after = policy_scores(logits)[1][0, 2].item()
    assert after < before


def test_minus_inf_policy_logprob_is_finite():
    log_pf, log_pterm, log_reward, n = random_batch(3, 4, 9, lengths=[4, 2, 3])
    log_pf[0, 1] = -math.inf  # an off-policy token the policy masks
    log_pterm[1, 1] = -math.inf  # stop masked (e.g. a minimum length)
    pf, pt = leaves(log_pf, log_pterm)
    loss = modified_subtb_loss(pf, pt, log_reward, n, weighting="geometric_within")
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(pf.grad).all() and torch.isfinite(pt.grad).all()


# -- modified DB and trajectory balance ---------------------------------------


def test_modified_db_matches_one_step_loop_and_lambda_zero():
    log_pf, log_pterm, log_reward, n = random_batch(6, 5, 10)
    pf_v, pt_v = leaves(log_pf, log_pterm)
    pf_r, pt_r = leaves(log_pf, log_pterm)
    got = modified_db_loss(pf_v, pt_v, log_reward, n, reward_temperature=0.7)
    total, count = 0.0, 0
    for b in range(6):
        for k in range(int(n[b])):
            flow_k = log_reward[b, k] / 0.7 - pt_r[b, k]
            flow_next = log_reward[b, k + 1] / 0.7 - pt_r[b, k + 1]
            total = total + (flow_k + pf_r[b, k] - flow_next) ** 2
            count += 1
    want = total / count
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    got.backward()
    want.backward()
    torch.testing.assert_close(pf_v.grad, pf_r.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(pt_v.grad, pt_r.grad, rtol=0, atol=1e-6)
    subtb_zero = modified_subtb_loss(
        log_pf, log_pterm, log_reward, n, subtb_lambda=0.0, reward_temperature=0.7
    )
    assert got.item() == pytest.approx(subtb_zero.item(), rel=1e-10)


def test_trajectory_balance_matches_hand_loop():
    log_pf, log_pterm, log_reward, n = random_batch(5, 6, 11)
    log_z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    pf_v, pt_v = leaves(log_pf, log_pterm)
    got = trajectory_balance_loss(pf_v, pt_v, log_reward, n, log_z, reward_temperature=1.3)
    want = 0.0
    for b in range(5):
        m = int(n[b])
        residual = (
            log_z[b] + log_pf[b, :m].sum() + log_pterm[b, m] - log_reward[b, m] / 1.3
        ).item()
        want += residual**2 / 5
    assert got.item() == pytest.approx(want, rel=1e-10)
    got.backward()
    assert torch.isfinite(log_z.grad).all() and log_z.grad.abs().sum() > 0


# -- bad inputs ---------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    log_pf, log_pterm, log_reward, n = random_batch(2, 3, 12)
    with pytest.raises(ValueError, match=r"weighting.*batch.*geometric_within.*'mean'"):
        modified_subtb_loss(log_pf, log_pterm, log_reward, n, weighting="mean")
    with pytest.raises(ValueError, match=r"log_pterm has shape \(2, 3\).*\(2, 4\)"):
        modified_subtb_loss(log_pf, log_pterm[:, :3], log_reward, n)
    with pytest.raises(ValueError, match=r"log_reward has shape \(3, 4\)"):
        modified_db_loss(log_pf, log_pterm, log_reward.repeat(2, 1)[:3], n)
    with pytest.raises(ValueError, match=r"lengths must be an integer"):
        modified_subtb_loss(log_pf, log_pterm, log_reward, n.double())
    with pytest.raises(ValueError, match=r"log_z has shape \(3,\)"):
        trajectory_balance_loss(log_pf, log_pterm, log_reward, n, torch.zeros(3))
    with pytest.raises(ValueError, match=r"reward_temperature"):
        modified_subtb_loss(log_pf, log_pterm, log_reward, n, reward_temperature=0.0)
    with pytest.raises(ValueError, match=r"subtb_lambda"):
        modified_subtb_loss(log_pf, log_pterm, log_reward, n, subtb_lambda=-1.0)


# -- property test ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 5),
    cap=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
    lam=st.sampled_from([0.0, 0.3, 0.9, 1.0, 1.5, 3.0]),
    weighting=st.sampled_from(WEIGHTINGS),
    forbidden_fraction=st.sampled_from([0.0, 0.2, 1.0]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_losses_finite_nonnegative_with_finite_grads(
    batch, cap, seed, lam, weighting, forbidden_fraction, temperature, dtype
):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, cap + 1, (batch,), generator=gen)
    log_pf = torch.randn(batch, cap, generator=gen, dtype=dtype) * 5 - 2
    log_pterm = torch.randn(batch, cap + 1, generator=gen, dtype=dtype) * 5 - 2
    log_reward = torch.randn(batch, cap + 1, generator=gen, dtype=dtype) * 50
    forbidden = torch.rand(batch, cap + 1, generator=gen) < forbidden_fraction
    log_reward = log_reward.masked_fill(forbidden, -math.inf)
    log_z = torch.randn(batch, generator=gen, dtype=dtype)
    pf, pt, lr, z = leaves(log_pf, log_pterm, log_reward, log_z)
    kw = {"reward_temperature": temperature}
    losses = [
        modified_subtb_loss(pf, pt, lr, lengths, subtb_lambda=lam, weighting=weighting, **kw),
        modified_db_loss(pf, pt, lr, lengths, **kw),
        trajectory_balance_loss(pf, pt, lr, lengths, z, **kw),
    ]
    for loss in losses:
        assert torch.isfinite(loss) and loss.item() >= 0
        grads = torch.autograd.grad(loss, (pf, pt, lr, z), allow_unused=True)
        for grad in grads:
            assert grad is None or torch.isfinite(grad).all()


# -- against torchgfn ---------------------------------------------------------


def torchgfn_subtb(weighting, lam, log_pf, log_pterm, log_reward, lengths, temperature):
    """The same quantity through torchgfn 2.4.1's SubTBGFlowNet.loss.

    Mapping: torchgfn trajectory b has n_b actions (the n_b tokens), states
    s_0..s_{n_b-1} carry the estimated flows log F̂(s_k), and the last action
    is the "exit" whose target log-reward is log F̂(s_{n_b}). torchgfn's
    sub-trajectory (start m, length i) then has residual
    log F̂(s_m) + Σ log q − log F̂(s_{m+i}) = our r_{m,m+i}, for every
    0 ≤ m < m+i ≤ n_b, and its pairing, masking and weighting code is used
    unchanged. Only the state-flow and log-prob lookups (which in torchgfn
    evaluate estimators on env states) are overridden to return our tensors.
    """
    from gfn.estimators import DiscretePolicyEstimator, ScalarEstimator
    from gfn.gflownet.sub_trajectory_balance import SubTBGFlowNet
    from gfn.preprocessors import IdentityPreprocessor

    cap = log_pf.shape[1]
    log_flow = log_reward / temperature - log_pterm  # [B, L+1]
    positions = torch.arange(cap).unsqueeze(1)  # [L, 1]
    # Rows ≥ n_b are sink states: torchgfn marks them by -inf flow.
    state_flows = torch.where(positions < lengths, log_flow[:, :cap].T, -math.inf)

    class Trajectories(SimpleNamespace):
        def __len__(self):
            return self.batch_size

    trajectories = Trajectories(
        batch_size=log_pf.shape[0],
        max_length=cap,
        terminating_idx=lengths,
        actions=SimpleNamespace(is_exit=positions == (lengths - 1)),
    )

    class GivenScoresSubTB(SubTBGFlowNet):
        def get_pfs_and_pbs(self, trajectories, recalculate_all_logprobs=True):
            return log_pf.T, torch.zeros_like(log_pf.T)

        def calculate_log_state_flows(self, env, trajectories, log_pf_trajectories):
            return state_flows

    gflownet = GivenScoresSubTB(
        pf=DiscretePolicyEstimator(torch.nn.Identity(), 2, IdentityPreprocessor(output_dim=2)),
        pb=None,
        logF=ScalarEstimator(torch.nn.Identity(), IdentityPreprocessor(output_dim=1)),
        weighting=weighting,
        lamda=lam,
        constant_pb=True,
    )
    final_flow = log_flow.gather(1, lengths.unsqueeze(1)).squeeze(1)  # exit targets
    return gflownet.loss(env=object(), trajectories=trajectories, log_rewards=final_flow)


@pytest.mark.parametrize("lam", [0.5, 0.9, 1.0, 2.0])
def test_geometric_within_matches_torchgfn(lam):
    # torchgfn needs n_b ≥ 1 (its geometric_within averages over all trajectories).
    log_pf, log_pterm, log_reward, n = random_batch(6, 5, 13, lengths=[1, 5, 3, 2, 5, 4])
    pf_ours, pt_ours = leaves(log_pf, log_pterm)
    pf_gfn, pt_gfn = leaves(log_pf, log_pterm)
    ours = modified_subtb_loss(
        pf_ours,
        pt_ours,
        log_reward,
        n,
        subtb_lambda=lam,
        weighting="geometric_within",
        reward_temperature=0.9,
    )
    theirs = torchgfn_subtb("geometric_within", lam, pf_gfn, pt_gfn, log_reward, n, 0.9)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(pf_ours.grad, pf_gfn.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(pt_ours.grad, pt_gfn.grad, rtol=1e-6, atol=1e-8)


def test_modified_db_and_tb_match_torchgfn_weightings():
    log_pf, log_pterm, log_reward, n = random_batch(5, 4, 14, lengths=[4, 1, 2, 4, 3])
    # torchgfn "DB": mean over every valid one-step transition of the batch.
    ours_db = modified_db_loss(log_pf, log_pterm, log_reward, n)
    theirs_db = torchgfn_subtb("DB", 0.9, log_pf, log_pterm, log_reward, n, 1.0)
    assert ours_db.item() == pytest.approx(theirs_db.item(), rel=1e-10)
    # torchgfn "TB" uses log F̂(s_0) as log Z.
    log_z = log_reward[:, 0] - log_pterm[:, 0]
    ours_tb = trajectory_balance_loss(log_pf, log_pterm, log_reward, n, log_z)
    theirs_tb = torchgfn_subtb("TB", 0.9, log_pf, log_pterm, log_reward, n, 1.0)
    assert ours_tb.item() == pytest.approx(theirs_tb.item(), rel=1e-10)
