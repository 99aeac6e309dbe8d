"""The KV-cached stepping loop of a rollout: the growing cache against the preallocated one, and sampling before/after.

    python benchmarks/kv_cache.py
    python benchmarks/kv_cache.py --layers 4 --repeats 5

A rollout-shaped loop at the GPT-2-small shape (random-init ``GPT2LMHeadModel``, 12 layers,
width 768, vocabulary 50,257): ``--batch`` left-padded prompts of 8 to 16 tokens
prefilled by ``textenv.lm.CachedStepper``, then ``--new-tokens`` steps of sampling one
token per row and ``advance``. Every row is live at every step, as in a lockstep rollout
of full-length responses. Four modes, timed in turn within each repeat (the order
reversed every other repeat), one torch thread:

- ``before`` **[baseline]**: ``preallocate=False``, transformers' ``DynamicLayer``s (one
  ``torch.cat`` of each layer's keys and values per step), and sampling as the code did
  before: ``torch.multinomial(exp(log_softmax(logits)), 1)``;
- ``cache``: the preallocated cache with ``room=new_tokens`` (allocated once), sampling
  as before;
- ``cache, room=None``: the preallocated cache with the default room (the prompts' width;
  it moves to a larger buffer once), what a caller that does not pass ``room`` gets;
- ``after``: the preallocated cache (``room=new_tokens``) and ``textenv.lm.sample_tokens``.

Each loop records its tokens and logits: with one seed every mode must draw the same
tokens and see the same logits to the bit (printed as checks). Then sampling alone:
milliseconds per step of the old and the new sampling over the vocabulary at batches
``--sampling-batches``.

Times are the CPU seconds of the benchmark's thread (``time.thread_time``; with one torch
thread every kernel runs on it): on a shared machine they leave out the time other
processes hold the core, not their contention for caches and memory. The loop's wall
time is printed beside them, and the load average before and after: compare within one
run.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import tyro

MODES = ("before", "cache", "cache, room=None", "after")


@dataclass
class KVCacheArgs:
    layers: int = 12
    """Transformer layers of the GPT-2-shaped model (GPT-2 small: 12)."""
    batch: int = 16
    """Rows stepped together (episodes of the rollout)."""
    new_tokens: int = 32
    """Steps after the prefill (the response length)."""
    repeats: int = 3
    """Timed repeats of every mode (after one warm-up each)."""
    sampling_batches: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Batches at which sampling alone is timed."""
    sampling_repeats: int = 20
    threads: int = 1
    """torch's CPU threads."""
    seed: int = 0


def old_sample(logits, generator):
    """Sampling before: softmax (as exp of the log-softmax) and ``torch.multinomial``. (B, V) -> (B,), (B,)."""
    import torch

    from textenv.lm import logprobs_from_logits

    logprobs = logprobs_from_logits(logits)
    tokens = torch.multinomial(logprobs.exp(), 1, generator=generator)
    return tokens[:, 0], logprobs.gather(-1, tokens)[:, 0]


def rollout_loop(model, prompts, mode: str, args: KVCacheArgs):
    """One prefill and ``new_tokens`` steps; returns (CPU s stepping, CPU s sampling, wall s, tokens, logits)."""
    import torch

    from textenv.lm import CachedStepper, sample_tokens

    room = None if mode == "cache, room=None" else args.new_tokens
    stepper = CachedStepper(model, pad_token_id=0, room=room, preallocate=mode != "before")
    sample = sample_tokens if mode == "after" else old_sample
    generator = torch.Generator().manual_seed(args.seed)
    stepping = sampling = 0.0
    tokens, seen = [], []
    wall, start = time.perf_counter(), time.thread_time()
    logits = stepper.prefill(*prompts)
    for _ in range(args.new_tokens):
        middle = time.thread_time()
        stepping += middle - start
        token, _ = sample(logits, generator=generator)
        start = time.thread_time()
        sampling += start - middle
        logits = stepper.advance(token)
        tokens.append(token)
        seen.append(logits[:, :64].clone())  # a slice of each step's logits, for the bitwise check
    stepping += time.thread_time() - start
    return stepping, sampling, time.perf_counter() - wall, torch.stack(tokens), torch.stack(seen)


def time_sampling(vocab: int, args: KVCacheArgs) -> list[tuple[int, float, float, bool]]:
    """Per batch: CPU ms per step of the old and the new sampling, and whether they drew the same tokens."""
    import torch

    from textenv.lm import sample_tokens

    rows = []
    for batch in args.sampling_batches:
        logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(args.seed)) * 3
        times = {"old": [], "new": []}
        drawn = {}
        for repeat in range(args.sampling_repeats + 1):
            for name, fn in [("old", old_sample), ("new", sample_tokens)][:: 1 if repeat % 2 == 0 else -1]:
                generator = torch.Generator().manual_seed(args.seed + repeat)
                start = time.thread_time()
                drawn[name], _ = fn(logits, generator=generator)
                if repeat:  # the first is the warm-up
                    times[name].append(time.thread_time() - start)
            same = torch.equal(drawn["old"], drawn["new"])
        old, new = (1e3 * statistics.median(times[name]) for name in ("old", "new"))
        rows.append((batch, old, new, same))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(KVCacheArgs, args=argv, description=__doc__)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from textenv.lm import pad_batch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch.manual_seed(args.seed)
    config = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(8, 17, (args.batch,), generator=generator).tolist()
    prompts = pad_batch([torch.randint(3, 50257, (n,), generator=generator).tolist() for n in lengths], 0)

    results = {mode: [] for mode in MODES}
    outputs = {}
    for mode in MODES:  # the warm-up, and the outputs every mode must share
        *_, tokens, seen = rollout_loop(model, prompts, mode, args)
        outputs[mode] = (tokens, seen)
    for repeat in range(args.repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            results[mode].append(rollout_loop(model, prompts, mode, args)[:3])
    sampling = time_sampling(config.vocab_size, args)
    load_after = os.getloadavg()

    print(
        f"GPT-2 shape: {args.layers} layers, width 768, vocabulary 50,257 (random init); {args.batch} rows, prompts "
        f"of {min(lengths)}-{max(lengths)} tokens, {args.new_tokens} steps; median of {args.repeats} after one "
        f"warm-up; torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print("load average before " + " ".join(f"{x:.2f}" for x in load_before), end="; ")
    print("after " + " ".join(f"{x:.2f}" for x in load_after))
    tokens, seen = outputs["before"]
    same_tokens = all(torch.equal(tokens, outputs[mode][0]) for mode in MODES)
    same_logits = all(torch.equal(seen, outputs[mode][1]) for mode in MODES)
    print(f"check: every mode drew the same tokens: {same_tokens}; saw the same logits, to the bit: {same_logits}")
    print("baseline: before = growing DynamicCache (torch.cat per layer and step) + torch.multinomial sampling")
    print("CPU s: the loop's CPU seconds (stepping: prefill and advance; sampling), wall s its wall time")
    print(f"{'mode':18s} {'CPU s':>7s} {'stepping':>9s} {'sampling':>9s} {'x before':>9s} {'wall s':>7s}")
    base = statistics.median(a + b for a, b, _ in results["before"])
    for mode in MODES:
        total = statistics.median(a + b for a, b, _ in results[mode])
        stepping, sample, wall = (statistics.median(r[i] for r in results[mode]) for i in (0, 1, 2))
        print(f"{mode:18s} {total:7.3f} {stepping:9.3f} {sample:9.3f} {total / base:9.3f} {wall:7.3f}")
    print(f"\nsampling alone, CPU ms per step over 50,257 tokens (median of {args.sampling_repeats}):")
    print(f"{'batch':>6s} {'multinomial':>12s} {'sample_tokens':>14s} {'x multinomial':>14s}  same tokens")
    for batch, old, new, same in sampling:
        print(f"{batch:6d} {old:12.2f} {new:14.2f} {new / old:14.3f}  {same}")


if __name__ == "__main__":
    main()
