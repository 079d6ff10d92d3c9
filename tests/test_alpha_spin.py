"""α-SPIN trainer: SPIN reduction, reference construction against hand-built mixtures, resume,
parquet round trip, data loading and configuration errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset, load_dataset

from gfn_spin import ArithmeticMixture, GeometricMixture
from gfn_spin.data import encode_example
from gfn_spin.exact import divergences
from gfn_spin.io import DIRECTORY_MARKER
from gfn_spin.samples import pad_responses
from samplers.ancestral import AncestralSampler
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from selfplay.config import derive_seed
from selfplay.iterates import load_iterate
from selfplay.iteration_data import load_parquet, read_iteration_data, write_parquet
from selfplay.pairs import load_pairs
from selfplay.reference import build_reference, history_indices
from worlds.toy import ToyWorldEvaluator

SMALL = dict(
    max_examples=64, batch_size=16, epochs=1, generation_chunk=16, progress=False, iterations=2
)


@pytest.fixture(scope="module")
def kl_only(world):
    evaluator = ToyWorldEvaluator(world)
    return lambda policy: {"kl_data": evaluator.kl_from_data(policy)}


def run(world, kl_only, tmp_path, name="run", **overrides):
    config = AlphaSpinConfig(output_dir=str(tmp_path / name), **{**SMALL, **overrides})
    trainer = AlphaSpinTrainer(config, world=world, evaluate=kl_only)
    return trainer, trainer.train()


def metrics(records):
    return [r["metrics"] for r in records]


def responses(world, count=24, seed=0):
    """Random responses (lengths 0..L) over the symbols, with prompts from the eval set."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, world.max_new_tokens + 1, (count,), generator=gen)
    symbols = torch.tensor(world.symbol_ids)
    ids = symbols[torch.randint(len(symbols), (count, world.max_new_tokens), generator=gen)]
    prompts = [world.eval_prompts[i % len(world.eval_prompts)] for i in range(count)]
    return prompts, ids, lengths


def perturbed(world, scale, seed):
    policy = world.load_policy("base", device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = policy.model.get_output_embeddings().weight
        head.add_(scale * torch.randn(head.shape, generator=gen))
    return policy


# -- reference construction --------------------------------------------------------------


def test_history_indices():
    assert history_indices(0, 1) == [0]
    assert history_indices(3, 1) == [3]
    assert history_indices(3, 2) == [3, 2]
    assert history_indices(1, 5) == [1, 0]  # capped by the iterates that exist
    assert history_indices(3, "all") == [3, 2, 1, 0]


@pytest.mark.parametrize(
    ("alpha", "history", "members"),
    [
        (1.0, 1, [3]),
        (1.0, 2, [3, 2]),
        (1.0, "all", [3, 2, 1, 0]),
        (0.8, 1, [3]),
        (0.8, 2, [3, 2]),
        (0.5, "all", [3, 2, 1, 0]),
    ],
)
def test_reference_matches_hand_built_mixture(world, alpha, history, members):
    iterates = [world.base, world.shifted, perturbed(world, 0.5, 1), perturbed(world, 0.5, 2)]
    reference = build_reference(iterates, alpha, history)
    prompts, ids, lengths = responses(world)
    with torch.no_grad():
        logps = torch.stack([p.log_prob(prompts, ids, lengths).double() for p in iterates])
        # log M_h = logsumexp over members - log h; log π̃_ref = (1-α) log π_0 + α log M_h
        log_mix = torch.logsumexp(logps[members], 0) - math.log(len(members))
        expected = (1 - alpha) * logps[0] + alpha * log_mix
        got = reference.log_prob(prompts, ids, lengths).double()
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-5)
    if alpha == 1.0:
        assert reference.normalized  # sampled exactly
        if len(members) == 1:
            assert reference is iterates[members[0]]
        else:
            assert isinstance(reference, ArithmeticMixture)
    else:
        assert isinstance(reference, GeometricMixture)
        assert reference.weights == [1 - alpha, alpha]


def test_reference_at_t0_is_base_for_every_alpha(world):
    for alpha in (0.5, 0.95, 1.0):
        for history in (1, 2, "all"):
            assert build_reference([world.base], alpha, history) is world.base


# -- SPIN reduction ------------------------------------------------------------------------


def test_alpha1_h1_is_plain_spin(world, kl_only, tmp_path):
    """α = 1, h = 1: π_ref is π_t and y' ~ π_t (same draws as an ancestral sampler of π_t)."""
    trainer, records = run(world, kl_only, tmp_path, alpha=1.0, history=1, sampler="exact")
    base = trainer.base
    out = tmp_path / "run"
    pi_1 = load_iterate([base], out / "iterates" / "iter_1", 1, trainer.config)
    data = read_iteration_data(
        out / "data" / "iteration_1.parquet",
        max_new_tokens=world.max_new_tokens,
        pad_token_id=base.pad_token_id,
    )
    prompts = data.prompt_ids
    # y' ~ π_1: the stored draws are those of an ancestral sampler of π_1 with the chunk seeds.
    sampler = AncestralSampler(pi_1, max_new_tokens=world.max_new_tokens)
    seed = derive_seed(trainer.config.seed, "generate", 1)
    expected = []
    for start in range(0, len(prompts), trainer.config.generation_chunk):
        chunk = prompts[start : start + trainer.config.generation_chunk]
        expected += sampler.sample(chunk, generator=derive_seed(seed, start)).responses()
    stored = [
        tuple(g[:n].tolist())
        for g, n in zip(data.generated_ids, data.generated_lengths, strict=True)
    ]
    assert stored == expected
    # π_ref = π_1: the stored reference log-probs are π_1's.
    for stored_logps, ids, lengths in (
        (data.ref_real_logps, data.real_ids, data.real_lengths),
        (data.ref_generated_logps, data.generated_ids, data.generated_lengths),
    ):
        with torch.no_grad():
            logps = pi_1.log_prob(prompts, ids, lengths).double()
        torch.testing.assert_close(stored_logps, logps, atol=1e-5, rtol=0)
    assert [r["iteration"] for r in records] == [0, 1, 2]


def test_geometric_reference_data(world, kl_only, tmp_path):
    """α < 1, h = 2 with SIR: stored reference log-probs are the hand-built geometric mixture's."""
    trainer, records = run(
        world, kl_only, tmp_path, alpha=0.8, history=2, sampler="importance", num_candidates=4
    )
    out, cfg = tmp_path / "run", trainer.config
    # The opponent's measurements are recorded: none at t = 0 (π_0 is sampled exactly), SIR's
    # ESS/K and log Ẑ at t = 1, in metrics.json as in the returned records.
    assert "opponent/ess_fraction" not in records[1]["metrics"]
    second = records[2]["metrics"]
    assert 0.25 <= second["opponent/ess_fraction"] <= 1  # ESS of K = 4 weights is in [1, 4]
    assert math.isfinite(second["opponent/log_z"]) and second["opponent/log_z_se"] >= 0
    assert second["opponent/tokens"] > 0
    assert json.loads((out / "metrics.json").read_text())[2]["metrics"] == second
    pi_1 = load_iterate([trainer.base], out / "iterates" / "iter_1", 1, cfg)
    data = read_iteration_data(
        out / "data" / "iteration_1.parquet",
        max_new_tokens=world.max_new_tokens,
        pad_token_id=trainer.base.pad_token_id,
    )
    hand = GeometricMixture(
        [trainer.base, ArithmeticMixture([pi_1, trainer.base], [0.5, 0.5])], [0.2, 0.8]
    )
    with torch.no_grad():
        expected = hand.log_prob(data.prompt_ids, data.generated_ids, data.generated_lengths)
    torch.testing.assert_close(data.ref_generated_logps, expected.double(), atol=1e-4, rtol=0)


# -- resume --------------------------------------------------------------------------------


def test_resume_equals_uninterrupted(world, kl_only, tmp_path):
    _, full = run(world, kl_only, tmp_path, name="full", iterations=2)
    # Stop after one iteration, leave debris of an interrupted second one, then resume.
    run(world, kl_only, tmp_path, name="cut", iterations=1)
    cut = tmp_path / "cut"
    # The debris of a save cut short: gfn-spin's own marker lists the file and says the save
    # did not finish (a folder without the marker would be a user's, and is refused).
    garbage = cut / "iterates" / "iter_2"
    garbage.mkdir(parents=True)
    (garbage / "adapter_config.json").write_text("{not json")
    marker = {"files": ["adapter_config.json"], "complete": False}
    (garbage / DIRECTORY_MARKER).write_text(json.dumps(marker))
    # A temporary named as the atomic writer names it (<final name>.<8 random>.tmp).
    (cut / "data" / "iteration_1.parquet.abcd_123.tmp").write_text("partial")
    # Files a user put there: not the run's names, so never deleted.
    (cut / "data" / "notes.tmp").write_text("mine")
    (cut / "iterates" / "my_adapter").mkdir()
    _, resumed = run(world, kl_only, tmp_path, name="cut", iterations=2)
    assert metrics(resumed) == metrics(full)
    assert sorted(p.name for p in cut.glob("**/*.tmp")) == ["notes.tmp"]
    assert (cut / "iterates" / "my_adapter").is_dir()
    # A finished run restarted does nothing and returns the same records.
    _, again = run(world, kl_only, tmp_path, name="cut", iterations=2)
    assert metrics(again) == metrics(full)


def test_resume_with_different_config_is_refused(world, kl_only, tmp_path):
    run(world, kl_only, tmp_path, iterations=1)
    with pytest.raises(ValueError, match="different configuration.*beta"):
        run(world, kl_only, tmp_path, iterations=1, beta=0.3)


# -- data ----------------------------------------------------------------------------------


def test_iteration_data_parquet_round_trip(world, kl_only, tmp_path):
    run(world, kl_only, tmp_path, iterations=1, alpha=1.0, history=1)
    path = tmp_path / "run" / "data" / "iteration_0.parquet"
    loaded = load_dataset("parquet", data_files=str(path), split="train")
    assert {"prompt", "real", "generated", "ref_real_logps", "ref_generated_logps"} <= set(
        loaded.column_names
    )
    row = loaded[0]
    assert [m["role"] for m in row["real"]] == ["user", "assistant"]
    assert row["real"][0]["content"] == row["prompt"] == row["generated"][0]["content"]
    # The generated text re-encodes (through the one encoding function) to the stored ids.
    _, ids = encode_example(world.tokenizer, row["prompt"], row["generated"][1]["content"])
    assert ids == row["generated_ids"]
    columns = {"x": [0.1 + 1e-12, -3.0], "chat": [[{"role": "user", "content": "a"}]] * 2}
    write_parquet(columns, tmp_path / "t.parquet")
    back = load_parquet(tmp_path / "t.parquet")
    assert back["x"] == columns["x"] and back["chat"] == columns["chat"]


def test_load_pairs_from_local_files(tmp_path):
    rows = [
        {
            "q": "a b",
            "a": "a b",
            "chat": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
        }
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs(str(tmp_path / "d.jsonl"), prompt_column="q", response_column="a")
    assert pairs["prompt"] == ["a b"] and pairs["response"] == ["a b"]
    chat = load_pairs(str(tmp_path / "d.jsonl"), messages_column="chat")
    assert chat["prompt"] == ["c"] and chat["response"] == ["d"]
    Dataset.from_dict({"prompt": ["x"], "response": ["y"]}).to_csv(tmp_path / "d.csv")
    assert load_pairs(str(tmp_path / "d.csv"))["response"] == ["y"]
    with pytest.raises(ValueError, match="prompt_column='missing'"):
        load_pairs(str(tmp_path / "d.jsonl"), prompt_column="missing")
    with pytest.raises(FileNotFoundError):
        load_pairs(str(tmp_path / "nope.json"))


def test_encoding_is_the_chat_template(world):
    text = world.sft_data["prompt"][0]
    prompt_ids, response_ids = encode_example(
        world.tokenizer, text, "a b c d a b c d", max_new_tokens=7
    )
    assert prompt_ids == world.tokenizer(text)["input_ids"]  # [BOS] ... =>, as the world's prompts
    assert len(response_ids) == 7


# -- evaluation ----------------------------------------------------------------------------


def test_evaluator_matches_enumeration(world):
    prompt = min(world.eval_prompts, key=len)
    evaluator = ToyWorldEvaluator(world, prompts=[prompt], drift_prompts=None)
    policy = world.shifted
    p = world.enumerate(policy, prompt)
    enumerated_kl = divergences(world.task.log_prob_on(prompt, p), p.logprobs)["kl_pq"]
    assert evaluator.kl_from_data(policy) == pytest.approx(enumerated_kl, rel=1e-5)
    # The drift is read off enumerations (cached decoding); check it against teacher-forced
    # scores of every response: KL(π ‖ π_0) = Σ_y π(y) (log π(y) − log π_0(y)).
    ids, lengths = pad_responses(p.responses, world.max_new_tokens, policy.pad_token_id)
    rows = [prompt] * len(p.responses)
    log_ratio = policy.log_prob(rows, ids, lengths) - world.base.log_prob(rows, ids, lengths)
    expected = float((p.logprobs.exp() * log_ratio.double()).sum())
    rel, base_abs = 1e-4, 1e-9
    assert evaluator.drift(policy) == pytest.approx(expected, rel=rel)
    assert evaluator.drift(world.base) == pytest.approx(0.0, abs=base_abs)
    # Not 0 ≈ 0: π_t's accepted interval excludes the base's (drift 0 within base_abs), so a
    # drift that read 0 for every policy fails one of the two checks above.
    assert expected * (1 - rel) > base_abs


# -- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"history": 0}, "history"),
        ({"history": "some"}, "history"),
        ({"alpha": 0.5, "sampler": "exact"}, "sampler='exact' needs alpha=1"),
        ({"loss_type": "dpo"}, "loss_type"),
        ({"sampler": "magic"}, "sampler"),
        ({"beta": 0.0}, "beta"),
        ({"batch_size": 0}, "batch_size"),
        ({"finetuning": "qlora"}, "finetuning"),
    ],
)
def test_bad_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        AlphaSpinConfig(**overrides)


def test_history_from_cli_string():
    assert AlphaSpinConfig(history="2").history == 2
    assert AlphaSpinConfig(history="all").history == "all"


def test_no_model_or_data_and_no_world_is_refused(tmp_path):
    """The trainer names no world: the tiny world's base and data come only through world=."""
    config = AlphaSpinConfig(output_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no world to take them from"):
        AlphaSpinTrainer(config)
    assert not (tmp_path / "x").exists()


def test_too_few_examples_is_refused_before_work(world, tmp_path):
    config = AlphaSpinConfig(output_dir=str(tmp_path / "x"), max_examples=8, batch_size=16)
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        AlphaSpinTrainer(config, world=world)
    assert not (tmp_path / "x").exists()
