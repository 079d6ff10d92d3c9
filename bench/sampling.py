"""Sampling throughput: gfn-spin's ancestral sampler against HF ``generate`` with sampling.

Same model (a GPT-2-shaped model built from a config, random weights), same batch and number of
new tokens, both under ``no_grad`` with the KV cache. Prints tokens/s of each and the ratio.

    python bench/sampling.py                      # CPU defaults
    python bench/sampling.py --device cuda --batch 256 --new-tokens 64 --layers 12 --width 768
"""

from __future__ import annotations

import argparse

import torch
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bench._timing import emit, median_seconds
from gfn_spin import Policy
from gfn_spin.samples import ancestral_sample


def build(args: argparse.Namespace) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        eos_token="t1",
        pad_token="t0",
    )
    config = GPT2Config(
        vocab_size=args.vocab,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=max(1, args.width // 64),
        n_positions=args.prompt_tokens + args.new_tokens + 8,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config).to(args.device).eval()
    if args.device != "cpu":
        model = model.to(torch.bfloat16)
    return model, tokenizer


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
    args = parser.parse_args(argv)

    model, tokenizer = build(args)
    policy = Policy(model, tokenizer)
    prompts = torch.randint(2, args.vocab, (args.batch, args.prompt_tokens)).tolist()
    input_ids = torch.tensor(prompts, device=args.device)
    generated = {}

    def ours() -> None:
        # EOS is masked out so that both sides generate exactly batch x new_tokens tokens.
        samples = ancestral_sample(policy, prompts, 1, max_new_tokens=args.new_tokens, generator=0)
        generated["ours"] = int(samples.lengths.sum())

    def hf() -> None:
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            top_k=0,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            pad_token_id=0,
        )
        generated["hf"] = int((out.shape[1] - input_ids.shape[1]) * out.shape[0])

    policy.allowed_token_ids = [i for i in range(args.vocab) if i != tokenizer.eos_token_id]
    # allowed_token_ids always keeps EOS; drop it by hand for a fixed-length comparison.
    mask = torch.ones(args.vocab, dtype=torch.bool, device=args.device)
    mask[tokenizer.eos_token_id] = False
    policy._mask_cache[torch.device(args.device)] = mask

    with torch.no_grad():
        t_hf = median_seconds(hf, args.repeats)
        t_ours = median_seconds(ours, args.repeats)
    hf_rate = generated["hf"] / t_hf
    ours_rate = generated["ours"] / t_ours
    print(f"HF generate (dynamic cache): {hf_rate:,.0f} tokens/s")
    print(f"gfn-spin ancestral sampler : {ours_rate:,.0f} tokens/s")
    print(f"ratio ours / HF            : {ours_rate / hf_rate:.2f}x")
    emit(
        "sampling_throughput",
        device=args.device,
        batch=args.batch,
        new_tokens=args.new_tokens,
        hf_tokens_per_s=hf_rate,
        ours_tokens_per_s=ours_rate,
        ratio=ours_rate / hf_rate,
    )
    return {"hf": hf_rate, "ours": ours_rate}


if __name__ == "__main__":
    main()
