"""Sampling throughput: gfn-spin's ancestral sampler against HF ``generate`` with sampling.

Same model (a GPT-2-shaped model built from a config, random weights), same batch and number of
new tokens (EOS masked so that every row generates exactly ``--new-tokens``), all under
``no_grad`` with the KV cache. Repeats are round-robin (load from other processes hits every
contender alike); the figure is the ratio of tokens/s. On CUDA, HF ``generate`` with
``cache_implementation="static"`` (a static cache and a compiled decode step) is timed too,
its first call (the compilation) reported apart.

    python -m bench.sampling                      # CPU defaults
    python -m bench.sampling --device cuda --batch 256 --new-tokens 64 --layers 12 --width 768 \\
        --vocab 50257

The fast path left out. On CUDA, decoding a 124M model at batch 256 is bound by per-step kernel
launches (the README has the measured throughputs of the dynamic and static caches); the way
to >= 2.5x is a static KV cache whose decode step is captured once in a CUDA graph, with LoRA
weights merged while sampling. It was not added to the library because it cannot be made
exact and checked here: (1) merging LoRA changes the logits by float rounding ((W + BA)x is
not Wx + B(Ax) bit for bit), so samples for a seed would not be equal and ``log_q`` would no
longer be the exact log-density of the policy that is trained and scored, and peft's
merge/unmerge leaves W + BA - BA != W in the shared base weights that other policies (π_t, the
target's components) read, unless every merged weight is copied and restored; (2) a static
cache needs a fixed batch, so finished rows could no longer be dropped (the plain path's main
saving when responses stop early) and the sampler would need a second decoding loop; (3) no
CUDA device is lent to this task, so a captured-graph path could not be run, let alone shown
to give the plain path's distribution. ``bench/gpu.py`` runs this script on CUDA, which gives
the static-cache figure as the measured upper bound of what such a path would bring.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bench._timing import emit
from gfn_spin import Policy
from gfn_spin.samples import ancestral_sample
from worlds.toy import numbered_tokenizer


def build(args: argparse.Namespace) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    tokenizer = numbered_tokenizer(args.vocab)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=max(1, args.width // 64),
        n_positions=args.prompt_tokens + args.new_tokens + 8,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
    )
    model = GPT2LMHeadModel(config).to(args.device).eval()
    if args.device != "cpu":
        model = model.to(torch.bfloat16)
    return model, tokenizer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--batch", type=int, default=64, help="sequences per call (default: 64)")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens (default: 32)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default: 16)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default: 1024)")
    parser.add_argument("--width", type=int, default=128, help="hidden size (default: 128)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default: 5)")
    parser.add_argument(
        "--static",
        choices=("auto", "on", "off"),
        default="auto",
        help="also time HF generate with the static cache (auto: on CUDA only)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1)")
    args = parser.parse_args(argv)
    if args.device == "cpu" or args.threads is not None:
        # 1 thread: on a shared 2-core machine, 2-thread regions stall on the neighbours' jobs.
        torch.set_num_threads(args.threads or 1)

    model, tokenizer = build(args)
    policy = Policy(model, tokenizer)
    prompts = torch.randint(2, args.vocab, (args.batch, args.prompt_tokens)).tolist()
    input_ids = torch.tensor(prompts, device=args.device)
    generated: dict[str, int] = {}

    def ours() -> None:
        samples = ancestral_sample(policy, prompts, 1, max_new_tokens=args.new_tokens, generator=0)
        generated["ours"] = int(samples.lengths.sum())

    def hf(cache: str | None) -> None:
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            top_k=0,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,  # masks EOS: exactly batch x new_tokens tokens
            pad_token_id=0,
            cache_implementation=cache,
        )
        generated[f"hf_{cache or 'dynamic'}"] = (out.shape[1] - input_ids.shape[1]) * out.shape[0]

    # EOS masked on our side too (allowed_token_ids always keeps EOS, so set the mask by hand).
    mask = torch.ones(args.vocab, dtype=torch.bool, device=args.device)
    mask[tokenizer.eos_token_id] = False
    policy.allowed_token_ids = [i for i in range(args.vocab) if i != tokenizer.eos_token_id]
    policy._mask_cache[policy.device] = mask  # keyed by the resolved device (cuda:0, not cuda)

    contenders = {"hf_dynamic": lambda: hf(None), "ours": ours}
    static = args.static == "on" or (args.static == "auto" and args.device.startswith("cuda"))
    first_call: dict[str, float] = {}
    if static:
        contenders["hf_static"] = lambda: hf("static")
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.no_grad():
        for name, fn in contenders.items():
            sync(args.device)
            start = time.perf_counter()
            fn()  # warm-up (for the static cache: compilation)
            sync(args.device)
            first_call[name] = time.perf_counter() - start
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                sync(args.device)
                start = time.perf_counter()
                fn()
                sync(args.device)
                seconds[name].append(time.perf_counter() - start)
    rate = {name: generated[name] / statistics.median(times) for name, times in seconds.items()}
    print(
        f"sampling, batch {args.batch} x {args.new_tokens} new tokens, prompt "
        f"{args.prompt_tokens}, {args.layers} layers x {args.width}, device {args.device}"
    )
    for name in contenders:
        print(
            f"{name:>11}: {rate[name]:12,.0f} tokens/s  "
            f"(first call {first_call[name]:.2f} s, median of {args.repeats})"
        )
    print(f"ratio ours / HF dynamic: {rate['ours'] / rate['hf_dynamic']:.2f}x")
    if static:
        print(f"ratio HF static / HF dynamic: {rate['hf_static'] / rate['hf_dynamic']:.2f}x")
    emit(
        "sampling_throughput",
        device=args.device,
        batch=args.batch,
        new_tokens=args.new_tokens,
        layers=args.layers,
        width=args.width,
        hf_tokens_per_s=rate["hf_dynamic"],
        ours_tokens_per_s=rate["ours"],
        ratio=rate["ours"] / rate["hf_dynamic"],
        **(
            {
                "hf_static_tokens_per_s": rate["hf_static"],
                "hf_static_ratio": rate["hf_static"] / rate["hf_dynamic"],
                "hf_static_first_call_s": first_call["hf_static"],
            }
            if static
            else {}
        ),
    )
    return rate


if __name__ == "__main__":
    main()
