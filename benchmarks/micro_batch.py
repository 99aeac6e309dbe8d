"""One micro-batch of the update, forward and backward, with each of the agent's speed paths on and off.

    python benchmarks/micro_batch.py --shape gpt2-small
    python benchmarks/micro_batch.py --shape default --repeats 201

A micro-batch as ``agents.ppo.minibatch_step`` runs it: ``ActorCritic.forward`` with the
LM head at the positions that predict a response token, log-softmax, the log-probs of the
taken tokens and the values, one ``backward``. Random tokens, every row full length
(nothing to pack). Two agents with the same weights, three modes timed in turn within each
repeat (the order reversed every other repeat), one torch thread:

- ``dense``: the trainer's agent with autograd's own embedding lookup;
- ``sparse``: the same agent, ``sparse_embedding_grad=True`` (what the update asks for): the
  tied embedding's gradient as the looked-up rows;
- ``gelu_new``: the model's own ``gelu_new`` activation (transformers' Python
  ``NewGELUActivation``), not the fused ``gelu_pytorch_tanh`` the agent loads.

It first checks that ``sparse`` gives ``dense``'s gradients to the bit. Shapes: ``gpt2-small``
(12 layers, width 768, vocabulary 50,257, random init; 4 rows of 16 prompt + 32 response
tokens, ``ppo_iteration.py``'s micro-batch) and ``default`` (the embedded default task's
policy; 16 rows of 8 + 24). Medians over ``--repeats``; the load average is printed (other
processes on the machine slow every mode, not equally: compare within one run). ``--json`` keeps the
figures under the shape's name in a JSON file (other shapes' entries in it are kept):

    python benchmarks/micro_batch.py --shape gpt2-small --json docs/results/micro_batch.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

MODES = ("dense", "sparse", "gelu_new")


@dataclass
class MicroBatchArgs:
    shape: Literal["default", "gpt2-small"] = "gpt2-small"
    """The model and micro-batch."""
    repeats: int = 21
    """Timed repeats of every mode (after one warm-up)."""
    threads: int = 1
    """torch's CPU threads."""
    seed: int = 0
    json: Path | None = None
    """Write the figures to this JSON file, under the shape's name (the file's other shapes are kept)."""


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(MicroBatchArgs, args=argv, description=__doc__)
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from agents.policy import ActorCritic
    from textenv.default_task import POLICY_DIR
    from textenv.lm import disable_dropout

    torch.set_num_threads(args.threads)

    def agent(activation: str) -> ActorCritic:
        torch.manual_seed(args.seed)
        if args.shape == "gpt2-small":
            config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, activation_function=activation)
            model = GPT2LMHeadModel(config)
        else:
            model = AutoModelForCausalLM.from_pretrained(POLICY_DIR, activation_function=activation)
        built = ActorCritic(model)
        disable_dropout(built)
        return built.train()

    fused = agent("gelu_pytorch_tanh")
    agents = {"dense": fused, "sparse": fused, "gelu_new": agent("gelu_new")}  # dense and sparse: one agent
    agents["gelu_new"].load_state_dict(fused.state_dict())
    vocab = agents["dense"].policy.config.vocab_size
    rows, prompt, response = (4, 16, 32) if args.shape == "gpt2-small" else (16, 8, 24)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, vocab, (rows, prompt + response), generator=generator)
    mask, positions = torch.ones_like(ids), torch.arange(prompt + response).expand(rows, -1)
    logits_at = torch.zeros_like(ids, dtype=torch.bool)
    logits_at[:, prompt - 1 : prompt + response - 1] = True  # position p predicts token p + 1

    def micro_batch(mode: str) -> tuple[float, float]:
        model = agents[mode]
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(ids, mask, positions, logits_at=logits_at, sparse_embedding_grad=mode == "sparse")
        logprobs = torch.log_softmax(out.logits.float(), -1).gather(-1, ids[:, prompt:].reshape(-1, 1))
        loss = -logprobs.sum() + 0.1 * out.values.sum()
        forward = time.perf_counter()
        loss.backward()
        return forward - start, time.perf_counter() - forward

    gradients = {}
    for mode in MODES:  # the warm-up
        micro_batch(mode)
        gradients[mode] = {name: p.grad.clone() for name, p in agents[mode].named_parameters()}
    same = all(torch.equal(gradients["sparse"][name], grad) for name, grad in gradients["dense"].items())
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            times[mode].append(micro_batch(mode))
    print(
        f"{args.shape}: {rows} x {prompt + response} tokens, logits at {response} per row, vocabulary {vocab:,}; "
        f"median of {args.repeats}; torch {torch.__version__}, {args.threads} thread(s); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"sparse embedding gradient equal to autograd's dense one, to the bit: {same}")
    dense = statistics.median(f + b for f, b in times["dense"])
    print(f"{'mode':10s} {'forward s':>10s} {'backward s':>11s} {'total s':>8s} {'x dense':>8s}")
    figures = {}
    for mode in MODES:
        forward, backward = (statistics.median(t[i] for t in times[mode]) for i in (0, 1))
        total = statistics.median(f + b for f, b in times[mode])
        figures[mode] = {"forward_s": forward, "backward_s": backward, "total_s": total, "x_dense": total / dense}
        print(f"{mode:10s} {forward:10.4f} {backward:11.4f} {total:8.4f} {total / dense:8.3f}")
    if args.json is not None:
        entry = {
            "command": "python benchmarks/micro_batch.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "torch": torch.__version__,
            "threads": args.threads,
            "repeats": args.repeats,
            "tokens": {"rows": rows, "prompt": prompt, "response": response, "vocabulary": vocab},
            "load_average": round(os.getloadavg()[0], 2),
            "sparse_equals_dense": same,
            "modes": figures,
        }
        known = json.loads(args.json.read_text()) if args.json.is_file() else {}
        args.json.write_text(json.dumps(known | {args.shape: entry}, indent=1) + "\n")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
