"""GFlowNet training step: gfn-spin's step against a published-style step, time and peak memory.

Same model (a Llama-shaped LM with random weights and a LoRA adapter), same target (the
geometric mixture π_ref^(1-α) π_t^α of two such models), same batch (prompts x samples) and
length cap, same optimizer:

- ``project``: ``GFlowNetSampler.train_step``: responses drawn under ``no_grad`` with the KV
  cache, the target scored, then one teacher-forced pass with gradients and the vectorized
  ``modified_subtb_loss`` (docs/gflownet.md);
- ``published``: the form of the published LM recipe (gfn-lm-tuning): a token-by-token rollout
  that keeps the autograd graph of every step (through the KV cache), run to the length cap for
  every row, then the SubTB loss as a Python loop over sub-trajectory lengths. It lives here,
  as a baseline, not in the library.

Before timing, the two are checked to be the same objective: on the published rollout's own
responses, the teacher-forced token scores equal the rollout's, and both losses and their
LoRA gradients agree.

Time: median of round-robin repeats in one process (load hits both alike). Peak memory: on
CUDA, ``torch.cuda.max_memory_allocated`` above the allocation before the step; on CPU, the
peak resident set size of a fresh subprocess during one step (after a warm-up step and
``malloc_trim``, the kernel's high-water mark is reset through ``/proc/self/clear_refs`` and
read back from ``VmHWM``) minus the resident size just before the step. This counts every byte
the step touches (tensors, autograd graph, KV caches, allocator slack), which is what bounds a
batch size.

    python -m bench.gflownet_step                       # CPU defaults
    python -m bench.gflownet_step --device cuda --layers 12 --width 768 --heads 12 \\
        --vocab 50257 --new-tokens 64 --lora-rank 16
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench._timing import emit
from bench.subtb_loss import loop_over_lengths_subtb
from gfn_spin import GeometricMixture, Policy
from gfn_spin.scores import position_mask
from objectives.subtb import modified_subtb_loss
from samplers import GFlowNetSampler
from worlds.toy import numbered_tokenizer

STEPS = ("project", "published")


def build(args: argparse.Namespace) -> tuple[GFlowNetSampler, list[list[int]]]:
    """The sampler (its LoRA policy and target) and the prompts of one batch."""
    tokenizer = numbered_tokenizer(args.vocab)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.prompt_tokens + args.new_tokens + 8,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
    )
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    policies = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()
        policies.append(Policy(model, tokenizer))
    reference, current = policies
    target = GeometricMixture([reference, current], [1 - args.alpha, args.alpha])
    sampler = GFlowNetSampler(
        target,
        current,
        max_new_tokens=args.new_tokens,
        prompts_per_step=args.prompts,
        samples_per_prompt=args.samples,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_rank,
        parametrization="lora",
        lora_output_layer=False,
        explore_prob=0.0,
        replay_prob=0.0,
        learning_rate=1e-4,
        seed=0,
    )
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, args.vocab, (args.prompts, args.prompt_tokens), generator=gen)
    return sampler, prompts.tolist()


def published_rollout(
    sampler: GFlowNetSampler, rows: list[list[int]], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-by-token rollout that keeps the graph: (log_pf, log_pterm, response_ids, lengths).

    Every row runs to the cap (finished rows keep feeding EOS and are masked), as in the
    published code; shapes and masking follow docs/conventions.md.
    """
    policy = sampler.adapter_policy
    cap, eos, pad = sampler.max_new_tokens, policy.eos_token_id, policy.pad_token_id
    batch, device = len(rows), policy.device
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    response = torch.full((batch, cap), pad, dtype=torch.long, device=device)
    log_pf, log_pterm = [], []
    state = policy.start(rows)
    for step in range(cap):
        logprobs = state.next_logprobs  # [B, V], carries the graph of every step so far
        log_pterm.append(torch.where(alive, logprobs[:, eos], 0.0))
        token = torch.multinomial(logprobs.detach().exp(), 1, generator=generator).squeeze(1)
        going = alive & (token != eos)
        log_pf.append(torch.where(going, logprobs.gather(1, token[:, None]).squeeze(1), 0.0))
        response[:, step] = torch.where(going, token, pad)
        lengths += going.long()
        alive = going
        if step < cap - 1:
            state = policy.advance(state, torch.where(going, token, eos))
    log_pterm.append(torch.zeros(batch, device=device))  # forced stop at the cap
    return torch.stack(log_pf, 1), torch.stack(log_pterm, 1), response, lengths


def published_step(sampler: GFlowNetSampler, rows: list[list[int]], generator) -> dict:
    """The published-style step: graph-carrying rollout, target scores, loop loss, update."""
    log_pf, log_pterm, response, lengths = published_rollout(sampler, rows, generator)
    with torch.no_grad():
        log_reward = sampler.target.score(rows, response, lengths).prefix_terminal_logprobs()
    valid = position_mask(lengths + 1, log_reward.shape[1])  # states 0..n
    log_reward = torch.where(valid, log_reward, 0.0)
    loss = loop_over_lengths_subtb(log_pf, log_pterm, log_reward, lengths)
    sampler.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(sampler.trainable_parameters, sampler.config.max_grad_norm)
    sampler.optimizer.step()
    return {"loss": float(loss.detach()), "tokens": int(lengths.sum())}


def project_step(sampler: GFlowNetSampler, prompts: list[list[int]]) -> dict:
    record = sampler.train_step(prompts)
    return {"loss": record["loss"]}


def check_same_objective(sampler: GFlowNetSampler, rows: list[list[int]], rtol: float) -> dict:
    """Published rollout vs teacher forcing on the same responses: scores, loss, gradients."""
    generator = torch.Generator(device=sampler.init.device).manual_seed(123)
    log_pf, log_pterm, response, lengths = published_rollout(sampler, rows, generator)
    with torch.no_grad():
        log_reward = sampler.target.score(rows, response, lengths).prefix_terminal_logprobs()
    valid = position_mask(lengths + 1, log_reward.shape[1])  # states 0..n
    log_reward = torch.where(valid, log_reward, 0.0)
    params = sampler.trainable_parameters
    loop_loss = loop_over_lengths_subtb(log_pf, log_pterm, log_reward, lengths)
    loop_grads = torch.autograd.grad(loop_loss, params)
    scores = sampler.adapter_policy.score(rows, response, lengths)
    forced_loss = modified_subtb_loss(
        scores.token_logprobs, scores.eos_logprobs, log_reward, scores.lengths
    )
    forced_grads = torch.autograd.grad(forced_loss, params)
    score_gap = max(
        (scores.token_logprobs - log_pf).abs().max().item(),
        (scores.eos_logprobs - log_pterm).abs().max().item(),
    )
    loss_gap = abs(forced_loss.item() - loop_loss.item()) / abs(loop_loss.item())
    grad_scale = max(g.abs().max().item() for g in loop_grads)
    grad_gap = (
        max((a - b).abs().max().item() for a, b in zip(forced_grads, loop_grads, strict=True))
        / grad_scale
    )
    gaps = {"score_gap": score_gap, "loss_rel_gap": loss_gap, "grad_rel_gap": grad_gap}
    if loss_gap > rtol or grad_gap > 10 * rtol:
        raise SystemExit(f"the two steps do not optimize the same objective: {gaps}")
    return gaps


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_peak_memory(args: argparse.Namespace, which: str) -> int:
    """Peak bytes above the pre-step level during one step of ``which`` (run in a fresh process)."""
    sampler, prompts = build(args)
    rows = [p for p in prompts for _ in range(args.samples)]
    generator = torch.Generator(device=args.device).manual_seed(0)

    def step():
        if which == "project":
            project_step(sampler, prompts)
        else:
            published_step(sampler, rows, generator)

    step()  # warm-up: lazy initializations and optimizer state are not the step's peak
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - before


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch (16)")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt (4)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="length cap L (64)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (1024)")
    parser.add_argument("--width", type=int, default=128, help="hidden size (128)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (4)")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (16)")
    parser.add_argument("--alpha", type=float, default=0.5, help="target weight α (0.5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each (5)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1)")
    parser.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="loss agreement of the two objectives (gradients: 10x); default 1e-4 in float32 "
        "(CPU), 3e-2 in bf16 (other devices: KV-cache decoding and a full pass round apart)",
    )
    parser.add_argument("--memory-of", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cpu" or args.threads is not None:
        # 1 thread: on a shared 2-core machine, 2-thread regions stall on the neighbours' jobs.
        torch.set_num_threads(args.threads or 1)
    if args.rtol is None:
        args.rtol = 1e-4 if args.device == "cpu" else 3e-2
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    if args.memory_of is not None:  # the subprocess mode of measure_peak_memory
        print(json.dumps({"peak_bytes": measure_peak_memory(args, args.memory_of)}))
        return {}
    argv = list(sys.argv[1:] if argv is None else argv)

    sampler, prompts = build(args)
    rows = [p for p in prompts for _ in range(args.samples)]
    gaps = check_same_objective(sampler, rows, args.rtol)
    generator = torch.Generator(device=args.device).manual_seed(0)
    steps = {
        "project": lambda: project_step(sampler, prompts),
        "published": lambda: published_step(sampler, rows, generator),
    }
    for fn in steps.values():
        fn()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name]()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(times) for name, times in seconds.items()}

    peak = {}
    for name in STEPS:
        out = subprocess.run(
            [sys.executable, "-m", "bench.gflownet_step", *argv, "--memory-of", name],
            capture_output=True,
            text=True,
            check=True,
        )
        peak[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]

    time_ratio = median["published"] / median["project"]
    memory_ratio = peak["published"] / peak["project"]
    batch = args.prompts * args.samples
    print(
        f"GFlowNet training step, batch {batch} ({args.prompts} prompts x {args.samples}), "
        f"prompt {args.prompt_tokens}, L = {args.new_tokens}, {args.layers} layers x "
        f"{args.width}, LoRA r = {args.lora_rank}, device {args.device}"
    )
    print(
        f"same objective: token scores within {gaps['score_gap']:.1e}, loss rel gap "
        f"{gaps['loss_rel_gap']:.1e}, LoRA gradient rel gap {gaps['grad_rel_gap']:.1e}"
    )
    for name in STEPS:
        print(
            f"{name:>10}: {median[name] * 1e3:9.1f} ms/step (median of {args.repeats}), "
            f"peak {peak[name] / 2**20:8.1f} MiB above the pre-step level"
        )
    print(f"published / project: {time_ratio:.2f}x time, {memory_ratio:.2f}x peak memory")
    emit(
        "gflownet_train_step",
        device=args.device,
        batch=batch,
        new_tokens=args.new_tokens,
        layers=args.layers,
        width=args.width,
        project_ms=median["project"] * 1e3,
        published_ms=median["published"] * 1e3,
        time_ratio=time_ratio,
        project_peak_mib=peak["project"] / 2**20,
        published_peak_mib=peak["published"] / 2**20,
        memory_ratio=memory_ratio,
        memory_method="cuda max_memory_allocated"
        if args.device.startswith("cuda")
        else "subprocess VmHWM - VmRSS",
        **gaps,
    )
    return {"time_ratio": time_ratio, "memory_ratio": memory_ratio}


if __name__ == "__main__":
    main()
