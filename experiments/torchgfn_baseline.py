"""An external baseline: torchgfn's own SubTB against ours on one prompt.
``python -m experiments.torchgfn_baseline``.

For whoever asks whether our modified SubTB beats a stock GFlowNet library: a GFlowNet trained
with torchgfn's SubTBGFlowNet (default weighting) on a DiscreteEnv over the token sequences of
ONE eval prompt of the tiny world (docs/toyworld.md), against ours (``--gflownet.<field>``) on
the same prompt at an equal number of target evaluations (scored responses), each measured by
exact TV and KL of its enumerated policy. Outputs: :mod:`experiments.studies`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from experiments.studies import AblationConfig, Setup, gfn_config, run_studies
from gfn_spin.exact import divergences, exact_distribution, response_alphabet
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.options import option
from samplers.gflownet import GFlowNetSampler


@dataclass
class TorchgfnConfig(AblationConfig):
    """torchgfn's SubTB against ours on one eval prompt, at equal target evaluations."""

    QUICK: ClassVar[dict[str, Any]] = {"num_eval_prompts": 2, "torchgfn_steps": 60}
    """Settings of ``--quick`` (each one still at its default takes this value)."""

    output_dir: str = option(
        "outputs/torchgfn_baseline",
        "Directory for ablation.csv, results.json, ablation.png and run.log.",
    )
    torchgfn_steps: int = option(
        300,
        "Training steps of both GFlowNets in the torchgfn comparison (one batch of "
        "the base setting's size each).",
    )

    def validate(self) -> None:
        """Raise on bad values before any model work."""
        super().validate()
        if self.torchgfn_steps < 1:
            raise ValueError(f"torchgfn_steps={self.torchgfn_steps} must be >= 1")


def _token_sequence_env(target, prompt: list[int], alphabet: list[int], cap: int):
    """A torchgfn DiscreteEnv whose states are padded prefixes ``[L]`` of alphabet indices.

    Actions 0..A-1 append a symbol, action A is EOS (torchgfn's exit action, which leads to its
    sink state: the "done" flag). log_reward scores the terminal response under ``target``.
    """
    from gfn.env import DiscreteEnv
    from gfn.states import DiscreteStates

    symbols = torch.tensor(alphabet)
    n_actions = len(alphabet) + 1

    class TokenSequenceEnv(DiscreteEnv):
        def __init__(self) -> None:
            self.target_evaluations = 0
            super().__init__(
                n_actions,
                s0=torch.full((cap,), -1, dtype=torch.long),
                state_shape=(cap,),
                sf=torch.full((cap,), -2, dtype=torch.long),
            )

        def make_states_class(self) -> type[DiscreteStates]:
            class TokenStates(DiscreteStates):
                state_shape = (cap,)
                s0 = self.s0
                sf = self.sf
                make_random_states = self.make_random_states
                n_actions = self.n_actions

                def _compute_forward_masks(self) -> torch.Tensor:
                    length = (self.tensor >= 0).sum(-1)
                    masks = torch.ones((*self.batch_shape, n_actions), dtype=torch.bool)
                    masks[..., :-1] &= (length < cap)[..., None]
                    return masks

                def _compute_backward_masks(self) -> torch.Tensor:
                    # A tree: the only parent removes the last symbol.
                    length = (self.tensor >= 0).sum(-1)
                    last = self.tensor.gather(-1, (length - 1).clamp(min=0)[..., None])[..., 0]
                    masks = torch.zeros((*self.batch_shape, n_actions - 1), dtype=torch.bool)
                    rows = (length > 0).nonzero(as_tuple=True)
                    masks[(*rows, last[rows])] = True
                    return masks

            return TokenStates

        def step(self, states, actions):
            tensor = states.tensor.clone()
            length = (tensor >= 0).sum(-1, keepdim=True)
            tensor.scatter_(-1, length.clamp(max=cap - 1), actions.tensor)
            return self.States(tensor)

        def backward_step(self, states, actions):
            tensor = states.tensor.clone()
            length = (tensor >= 0).sum(-1, keepdim=True)
            tensor.scatter_(-1, (length - 1).clamp(min=0), -1)
            return self.States(tensor)

        def log_reward(self, states) -> torch.Tensor:
            tensor = states.tensor.reshape(-1, cap)
            lengths = (tensor >= 0).sum(-1)
            ids = symbols[tensor.clamp(min=0)]
            self.target_evaluations += len(tensor)
            with torch.no_grad():
                scores = target.log_prob([prompt] * len(tensor), ids, lengths)
            return scores.float().reshape(states.batch_shape)

    return TokenSequenceEnv()


def _one_hot_preprocessor(cap: int, alphabet_size: int):
    from gfn.preprocessors import Preprocessor

    class OneHotPrefix(Preprocessor):
        """States ``[..., L]`` → one-hot ``[..., L·(A+1)]`` (the extra class is padding)."""

        def __init__(self) -> None:
            super().__init__(output_dim=cap * (alphabet_size + 1))

        def preprocess(self, states) -> torch.Tensor:
            index = torch.where(states.tensor >= 0, states.tensor, alphabet_size)
            hot = torch.nn.functional.one_hot(index, alphabet_size + 1).float()
            return hot.flatten(-2)

    return OneHotPrefix()


def torchgfn_logprobs(pf, responses: list[tuple[int, ...]], alphabet: list[int], cap: int):
    """Exact log q(y) of a torchgfn forward policy for every enumerated response ``[R]``."""
    position = {token: i for i, token in enumerate(alphabet)}
    prefixes = sorted({r[:k] for r in responses for k in range(len(r) + 1)}, key=len)
    index = {p: i for i, p in enumerate(prefixes)}
    tensor = torch.full((len(prefixes), cap), -1, dtype=torch.long)
    for i, prefix in enumerate(prefixes):
        tensor[i, : len(prefix)] = torch.tensor([position[t] for t in prefix], dtype=torch.long)
    with torch.no_grad():
        logits = pf.module(pf.preprocessor.preprocess(type("S", (), {"tensor": tensor})))
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[(tensor >= 0).sum(-1) == cap, :-1] = False
    step = torch.log_softmax(logits.masked_fill(~allowed, -math.inf).double(), -1)
    out = torch.empty(len(responses), dtype=torch.float64)
    for r, response in enumerate(responses):
        total = step[index[response], -1]
        for k, token in enumerate(response):
            total = total + step[index[response[:k]], position[token]]
        out[r] = total
    return out


def torchgfn_alpha(
    config: TorchgfnConfig, setup: Setup, alpha: float, logger: Any
) -> list[dict[str, Any]]:
    """torchgfn SubTB vs our GFlowNet on one eval prompt, equal target evaluations."""
    from gfn.estimators import DiscretePolicyEstimator, ScalarEstimator
    from gfn.gflownet import SubTBGFlowNet
    from gfn.utils.modules import MLP

    world = setup.world
    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])
    prompt, (base_exact, shifted_exact) = setup.eval_prompts[0], setup.components[0]
    target_lp = torch.log_softmax(
        (1 - alpha) * base_exact.logprobs + alpha * shifted_exact.logprobs, 0
    )
    alphabet = response_alphabet(target)
    gfn = gfn_config(config, f"steps={config.torchgfn_steps}", alpha, cap)
    batch = gfn.prompts_per_step * gfn.samples_per_prompt
    rows = []

    torch.manual_seed(config.seed)
    env = _token_sequence_env(target, prompt, alphabet, cap)
    preprocessor = _one_hot_preprocessor(cap, len(alphabet))
    width = preprocessor.output_dim
    pf = DiscretePolicyEstimator(MLP(width, env.n_actions), env.n_actions, preprocessor)
    log_flow = ScalarEstimator(MLP(width, 1), preprocessor)
    gflownet = SubTBGFlowNet(pf, None, log_flow, constant_pb=True)  # tree: P_B = 1
    optimizer = torch.optim.Adam(gflownet.parameters(), lr=1e-3)
    started = time.perf_counter()
    for _ in tqdm(range(config.torchgfn_steps), desc="torchgfn", disable=not config.progress):
        trajectories = gflownet.sample_trajectories(env, n=batch, save_logprobs=True)
        loss = gflownet.loss_from_trajectories(env, trajectories)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    q_lp = torchgfn_logprobs(pf, base_exact.responses, alphabet, cap)
    d = divergences(target_lp, q_lp)
    rows.append(
        {
            "section": "torchgfn",
            "alpha": alpha,
            "name": "torchgfn SubTBGFlowNet (MLP, geometric_within λ=0.9)",
            "setting": f"{config.torchgfn_steps} steps x {batch} trajectories, lr 1e-3",
            "measure": "exact",
            "tv": d["tv"],
            "kl": d["kl_pq"],
            "train_steps": config.torchgfn_steps,
            "train_seconds": seconds,
            "target_evaluations": env.target_evaluations,
        }
    )

    # Ours starts from the LMs (residual: the local product; lora: π_t), torchgfn's MLP from
    # scratch; the lora row is the nearer comparison (no local-product head start).
    for parametrization in dict.fromkeys((gfn.parametrization, "lora")):
        name = f"{gfn.adapter_name}_one_{parametrization}"
        ours = GFlowNetSampler(
            target, world.shifted, gfn, parametrization=parametrization, adapter_name=name
        )
        started = time.perf_counter()
        ours.fit([prompt], progress=config.progress)
        seconds = time.perf_counter() - started
        q = exact_distribution(ours.policy, prompt, cap)
        d = divergences(target_lp, q.logprobs)
        rows.append(
            {
                "section": "torchgfn",
                "alpha": alpha,
                "name": f"ours modified SubTB ({ours.parametrization})",
                "setting": f"{gfn.steps} steps x {batch} trajectories, base setting",
                "measure": "exact",
                "tv": d["tv"],
                "kl": d["kl_pq"],
                "train_steps": gfn.steps,
                "train_seconds": seconds,
                "target_evaluations": gfn.steps * batch,
            }
        )
    for row in rows:
        logger.info(
            "torchgfn α=%g %s: TV %.4f KL %.4f, %d target evaluations, %.0f s",
            alpha,
            row["name"],
            row["tv"],
            row["kl"],
            row["target_evaluations"],
            row["train_seconds"],
        )
    return rows


def torchgfn_comparison(config: TorchgfnConfig, setup: Setup, logger: Any) -> list[dict[str, Any]]:
    """The comparison at every α of ``config``."""
    return [row for alpha in config.alphas for row in torchgfn_alpha(config, setup, alpha, logger)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns the results dict (also written to ``output_dir``)."""
    return run_studies(
        TorchgfnConfig,
        argv,
        lambda config: [torchgfn_comparison],
        "experiments.torchgfn_baseline",
        __doc__.split("\n\n")[0],
    )


if __name__ == "__main__":
    main()
