"""Memory of one PPO iteration per model size: the formula behind docs/scaling.md, checked on the CPU.

The formula (``iteration_memory``) adds up, in bytes:

- weights: the trained ones (fp32 master), the frozen reference and reward models (bf16 on
  a GPU, as a bf16 checkpoint loads), a separate critic trunk, LoRA's adapters;
- the update: a gradient and Adam's two moments per trained weight; under bf16 autocast
  the bf16 copy of each trained weight that the forward casts and the backward reads; the
  activations autograd saves, per token and layer (``ACTIVATION``: elements
  ``8h + 2kv + 4f`` for a Qwen2 layer of width h, key/value width kv and MLP width f,
  times bytes per element measured with ``--calibrate``), or with gradient checkpointing
  the residual stream per layer plus one layer recomputed; and the log-softmax over the
  vocabulary at each action token (``logits``: peak bytes per action token and vocabulary
  entry, from ``--calibrate``);
- the rollout: the KV caches of the policy and the reference model, per token.

The peak is the weights plus the larger of the rollout and the update.

    python benchmarks/memory_scaling.py               # formula vs measured peak RSS: 10M, 30M, 100M on the CPU
    python benchmarks/memory_scaling.py --table       # Qwen2.5 0.5B, 1.5B, 7B on 24 and 80 GB GPUs
    python benchmarks/memory_scaling.py --calibrate   # the bytes per activation element and per logit, measured

The measured runs build a Qwen2-shaped policy and reward model of each size in code
(random weights, a 32,000-word tokenizer, the default task's prompts), then run one
rollout of 16 episodes of 32 new tokens and one update (1 epoch, minibatches and
micro-batches of 8 episodes: two optimizer steps, so the second backward runs with
Adam's moments allocated), each in its own process on one thread. Peak RSS is read
from ``/proc/self/status`` (VmHWM, reset between phases through ``/proc/self/clear_refs``)
less the process's RSS before any model was built.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
MB = 1e6


# ---------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """A Qwen2-family decoder: biased q/k/v, unbiased o, SwiGLU MLP, RMSNorm, grouped key/value heads."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        h, kv, f = self.hidden, self.kv_dim, self.intermediate
        return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * f + 2 * h

    @property
    def trunk_params(self) -> int:
        """The model without its LM head (a separate critic's trunk; the reward model's, less its score head)."""
        return self.layers * self.layer_params + self.vocab * self.hidden + self.hidden

    @property
    def params(self) -> int:
        return self.trunk_params + (0 if self.tied else self.vocab * self.hidden)

    @property
    def reward_params(self) -> int:
        return self.trunk_params + self.hidden  # a one-label score head, no bias

    def lora_params(self, rank: int) -> int:
        """PEFT's default for Qwen2: adapters on q_proj (h -> h) and v_proj (h -> kv) of every layer."""
        return self.layers * rank * (3 * self.hidden + self.kv_dim)

    @property
    def activation_elements(self) -> int:
        """Elements autograd saves per token and layer (8h + 2kv + 4f; ``--calibrate`` measures the bytes)."""
        return 8 * self.hidden + 2 * self.kv_dim + 4 * self.intermediate

    def config(self, **kwargs):
        from transformers import Qwen2Config

        fields = dict(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
            tie_word_embeddings=self.tied,
        )
        return Qwen2Config(**fields | kwargs)


# from the models' public config.json files
QWEN = [
    Shape("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151_936, True),
    Shape("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151_936, True),
    Shape("Qwen2.5-7B", 3584, 28, 28, 4, 18_944, 152_064, False),
]
# the measured sizes: the same family, a 32,000-word vocabulary, 512 positions
SMALL = [
    Shape("10M", 256, 4, 4, 2, 1024, 32_000, True),
    Shape("30M", 512, 6, 8, 2, 1536, 32_000, True),
    Shape("100M", 768, 12, 12, 2, 2048, 32_000, True),
]


# ---------------------------------------------------------------- precisions and the formula
@dataclass(frozen=True)
class Precision:
    """Bytes per number, in each role."""

    name: str
    master: int  # a trained weight
    frozen: int  # a weight of the reference or reward model, or of LoRA's base
    grad: int  # a trained weight's gradient
    adam: int  # Adam's two moments of a trained weight
    cast: int  # autocast's copy of a trained weight, held from the forward to the backward
    activation: float  # an activation element saved for backward (Shape.activation_elements; --calibrate)
    frozen_activation: float  # the same through a frozen base in its own dtype (LoRA)
    residual: int  # the residual stream per hidden unit (gradient checkpointing keeps it at each layer)
    inference: int  # a number a no-grad forward keeps: a KV-cache entry, a logit of the prefill
    logits: float  # peak bytes per action token and vocabulary entry in the update's log-softmax (--calibrate)


# CPU: everything fp32. CUDA: fp32 master weights under bf16 autocast; the frozen models in bf16, the dtype a
# bf16 checkpoint loads in (transformers >= 5 loads dtype "auto"). The activation and logit bytes are measured by
# --calibrate on the CPU (CPU autocast casts the same matmuls to bf16 as CUDA's)
CPU_FP32 = Precision("cpu, fp32", 4, 4, 4, 8, 0, 4.0, 4.0, 4, 4, 13.0)
CUDA_BF16 = Precision("cuda, fp32 master, bf16 autocast", 4, 2, 4, 8, 2, 2.5, 2.15, 4, 2, 13.0)
SETUPS = ("shared critic", "separate critic", "LoRA r=16")


@dataclass
class Workload:
    prompt: float  # tokens per episode: the prompt block's width (the widest prompt; packing makes it less)
    response: float
    rollout_episodes: int
    micro_batch: int  # episodes per forward and backward
    checkpointing: bool = False
    prefill_logits: bool = True  # the prefill's logits at every prompt position (today's CachedStepper)
    shards: int = 1  # FSDP processes: the trained weights, gradients and moments are split; nothing else is


def iteration_memory(shape: Shape, setup: str, p: Precision, w: Workload, rank: int = 16) -> dict[str, float]:
    """Bytes of each part of one PPO iteration, and its peak: weights + max(rollout, update)."""
    lora, separate = setup.startswith("LoRA"), setup == "separate critic"
    head = shape.hidden + 1  # the value head
    trained = (shape.lora_params(rank) if lora else shape.params) + (shape.trunk_params if separate else 0) + head
    dense_trained = 0 if lora else trained  # what autocast casts to bf16 for the forward
    weights = {
        "policy": (shape.params * (p.frozen if lora else p.master / w.shards) + (shape.lora_params(rank) + head) * 4),
        "critic": shape.trunk_params * p.master / w.shards if separate else 0,
        "reference": 0 if lora else shape.params * p.frozen,  # LoRA: the policy's base, adapters off
        "reward model": shape.reward_params * p.frozen,
    }
    tokens = w.micro_batch * (w.prompt + w.response)
    context = w.prompt + w.response
    reference_cache = w.rollout_episodes * context * 2 * shape.layers * shape.kv_dim * p.inference
    per_layer = shape.activation_elements * (p.frozen_activation if lora else p.activation)
    if w.checkpointing:  # each layer's input kept; one layer's activations at a time in the recomputation
        per_token = shape.layers * shape.hidden * p.residual + per_layer
    else:
        per_token = shape.layers * per_layer
    update = {
        "gradients": trained * p.grad / w.shards,
        "adam": trained * p.adam / w.shards,
        "autocast copies": dense_trained * p.cast,  # cast from the gathered weights: whole in every process
        "activations": tokens * per_token * (2 if separate else 1),
        "logits": w.micro_batch * w.response * shape.vocab * p.logits,
        "reference cache": reference_cache,  # the env keeps its last KV cache until the next reset
    }
    rollout = {
        "kv caches": 2 * reference_cache,  # the policy's and the reference model's
        # the prefill's logits at every prompt position (CachedStepper asks for all), held until the first step
        "prefill logits": 2 * w.rollout_episodes * w.prompt * shape.vocab * p.inference * w.prefill_logits,
        "sampling logits": 3 * w.rollout_episodes * shape.vocab * 4,
    }
    parts = {**weights, **update, **rollout}
    parts["peak"] = sum(weights.values()) + max(sum(update.values()), sum(rollout.values()))
    parts["weights"], parts["update"], parts["rollout"] = (sum(d.values()) for d in (weights, update, rollout))
    return parts


# ---------------------------------------------------------------- the GPU table
def largest_micro_batch(shape, setup, p, w: Workload, memory: float, reserve: float) -> int:
    """The most episodes per micro-batch whose update fits ``memory`` less ``reserve`` (0: none fits)."""
    fits = 0
    for m in range(1, 257):
        if iteration_memory(shape, setup, p, replace(w, micro_batch=m))["peak"] > memory - reserve:
            break
        fits = m
    return fits


def largest_rollout(shape, setup, p, w: Workload, memory: float, reserve: float) -> int:
    """The most episodes per rollout (a power of 2) whose KV caches fit beside the weights."""
    fits = 0
    for b in (8, 16, 32, 64, 128, 256, 512, 1024, 2048):
        parts = iteration_memory(shape, setup, p, replace(w, rollout_episodes=b, micro_batch=1))
        if parts["weights"] + parts["rollout"] > memory - reserve:
            break
        fits = b
    return fits


def table(prompt: int = 256, response: int = 256, reserve: float = 2 * GB) -> None:
    import torch
    from transformers import Qwen2ForCausalLM

    for shape in QWEN:  # the parameter count of the formula is the built model's, to the parameter
        with torch.device("meta"):
            assert sum(p.numel() for p in Qwen2ForCausalLM(shape.config()).parameters()) == shape.params, shape
    print(f"episodes of {prompt} prompt + {response} response tokens; {reserve / GB:.0f} GB kept for the CUDA")
    print("context and the allocator's fragmentation; micro-batch = episodes per forward and backward\n")
    print(f"{'model':14}{'params':>8}  {'setup':16}{'weights':>9}{'+optimizer':>11}{'act/token':>10}"
          f"{'act/token ckpt':>15}{'logits/ep':>10}{'KV/token':>9}   24 GB: micro (ckpt) rollout (*)"
          f"   80 GB: micro (ckpt) rollout (*)")  # fmt: skip
    for shape in QWEN:
        for setup in SETUPS:
            w = Workload(prompt, response, 64, 1)
            one = iteration_memory(shape, setup, CUDA_BF16, w)
            act = iteration_memory(shape, setup, CUDA_BF16, Workload(1, 0, 64, 1))["activations"]
            ckpt = iteration_memory(shape, setup, CUDA_BF16, Workload(1, 0, 64, 1, True))["activations"]
            kv = iteration_memory(shape, setup, CUDA_BF16, Workload(1, 0, 1, 1))["kv caches"] / 2
            fits = []
            for memory in (24 * GB, 80 * GB):
                micro = largest_micro_batch(shape, setup, CUDA_BF16, w, memory, reserve)
                micro_ckpt = largest_micro_batch(shape, setup, CUDA_BF16, Workload(prompt, response, 64, 1, True),
                                                 memory, reserve)  # fmt: skip
                rollout = largest_rollout(shape, setup, CUDA_BF16, w, memory, reserve)
                last_only = largest_rollout(
                    shape, setup, CUDA_BF16, Workload(prompt, response, 64, 1, prefill_logits=False), memory, reserve
                )
                cell = f"{micro:5d} ({micro_ckpt:3d}) {rollout:7d} ({last_only:4d})"
                fits.append(cell if micro_ckpt else f"{'does not fit':>28}")
            optimizer = one["gradients"] + one["adam"] + one["autocast copies"]
            print(f"{shape.name:14}{shape.params / 1e9:7.2f}B  {setup:16}{one['weights'] / GB:8.1f}G"
                  f"{optimizer / GB:10.1f}G{act / MB:9.2f}M{ckpt / MB:14.2f}M"
                  f"{one['logits'] / MB:9.0f}M{kv / 1e3:8.0f}K   {fits[0]}   {fits[1]}")  # fmt: skip
    print("\n(*) rollout episodes if the prefill kept the last position's logits only (logits_to_keep=1)")
    print("\nFSDP (--fsdp), per process of 8; the frozen models and autocast's copies are whole in each:")
    for shape in QWEN[1:]:
        for setup in SETUPS[:2]:
            sharded = [Workload(prompt, response, 64, 1, c, shards=8) for c in (False, True)]
            parts = iteration_memory(shape, setup, CUDA_BF16, sharded[0])
            micro = [largest_micro_batch(shape, setup, CUDA_BF16, s, 80 * GB, reserve) for s in sharded]
            print(f"{shape.name:14}{setup:16} weights {parts['weights'] / GB:5.1f}G, gradients + moments + copies "
                  f"{(parts['gradients'] + parts['adam'] + parts['autocast copies']) / GB:5.1f}G: on 80 GB a "
                  f"micro-batch of {micro[0]} ({micro[1]} with checkpointing)")  # fmt: skip


# ---------------------------------------------------------------- calibration
def rss(field: str = "VmRSS") -> float:
    """Bytes of this process's resident set (VmRSS) or its peak since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to VmRSS


def saved_bytes(shape: Shape, layers: int, tokens: int, mode: str) -> int:
    """Bytes autograd saves for backward in a forward of ``tokens`` through ``layers`` layers of ``shape`` (no LM
    head), the parameters themselves not counted. mode: fp32, autocast (fp32 weights), bf16 (bf16 weights)."""
    import torch
    from transformers import Qwen2Model

    config = shape.config(vocab_size=1000, num_hidden_layers=layers, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2Model(config)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 1000, (1, tokens))
    if mode == "bf16":  # LoRA: the adapters train, so the frozen base's activations are saved all the same
        model.embed_tokens.weight.requires_grad_(False)
        inputs = {"inputs_embeds": model.embed_tokens(ids).requires_grad_()}
    else:
        inputs = {"input_ids": ids}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            model(**inputs)
    return sum(storages.values())


def logits_peak(vocab: int, actions: int, hidden: int, autocast: bool, entropy: bool) -> float:
    """Peak bytes per action token and vocabulary entry of the update's LM head, log-softmax, chosen log-prob,
    entropy (in the loss or, at ent_coef 0, not) and their backward, as ``agents.ppo.score_rollout`` and the loss
    run them."""
    import torch

    from agents.ppo import EntropyOfLogprobs
    from textenv.lm import logprobs_from_logits

    head = torch.nn.Linear(hidden, vocab, bias=False)
    x = torch.randn(actions, hidden, requires_grad=True)
    chosen = torch.randint(0, vocab, (actions,))
    base = rss()
    reset_peak()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logprobs = logprobs_from_logits(head(x), 1.0)
    loss = logprobs.gather(-1, chosen[:, None]).sum()
    if entropy:
        loss = loss - 0.01 * EntropyOfLogprobs.apply(logprobs).sum()
    loss.backward()
    return (rss("VmHWM") - base) / (actions * vocab)


def calibrate() -> None:
    import torch

    torch.set_num_threads(1)
    for shape in [SMALL[0], *QWEN[:2]]:
        for mode in ("fp32", "autocast", "bf16"):
            # per token and layer: the slope between two lengths of the difference between two depths
            short, long = 64, 128
            per = [saved_bytes(shape, 2, t, mode) - saved_bytes(shape, 1, t, mode) for t in (short, long)]
            slope = (per[1] - per[0]) / (long - short)
            copies = per[0] - slope * short  # held whatever the length: autocast's bf16 copies of the weights
            print(f"{shape.name:14} {mode:9} {slope / shape.activation_elements:5.2f} bytes per activation element "
                  f"({slope / 1e3:6.1f} KB per token and layer); {copies / shape.layer_params:4.2f} bytes per "
                  "weight held from the forward to the backward")  # fmt: skip
    for autocast in (False, True):
        for entropy in (False, True):  # each in a fresh process: its tensors (> 32 MB) are mmapped and given back
            command = [sys.executable, __file__, "--logits", json.dumps([autocast, entropy])]
            peak = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])
            print(f"log-softmax, {'bf16 autocast' if autocast else 'fp32':13} entropy {'in' if entropy else 'out of'}"
                  f" the loss: {peak:5.1f} bytes per action token and vocabulary entry at the peak")  # fmt: skip


# ---------------------------------------------------------------- the measured runs
def tokenizer_and_prompts(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from textenv.default_task import load_prompts

    prompts = [p for p in load_prompts("train") if len(p.split()) <= 16]
    specials = ["[PAD]", "[UNK]", "[EOS]"]
    words = sorted({w for p in prompts for w in p.split()})
    entries = specials + words + [f"<w{i}>" for i in range(vocab - len(specials) - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(entries)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", bos_token="[EOS]"
    )
    return fast, prompts


def worker(spec: dict) -> None:
    """One rollout and one update of ``spec``'s shape and setup; prints the RSS of each phase (JSON)."""
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from agents.lora import AdaptersDisabled, add_lora
    from agents.policy import ActorCritic
    from agents.ppo import PPOConfig, ppo_update
    from agents.rollout import collect_rollout, make_rollout_env
    from textenv import TokenEnvConfig

    torch.set_num_threads(1)
    shape, setup = Shape(**spec["shape"]), spec["setup"]
    tokenizer, prompts = tokenizer_and_prompts(shape.vocab)
    base = rss()
    ids = dict(pad_token_id=0, eos_token_id=2, bos_token_id=2, max_position_embeddings=512)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(shape.config(**ids))
    reward_model = Qwen2ForSequenceClassification(shape.config(num_labels=1, **ids))
    if setup.startswith("LoRA"):
        policy = add_lora(policy, 16, 32.0)
        reference = AdaptersDisabled(policy)
    else:
        reference = copy.deepcopy(policy)
    agent = ActorCritic.from_models(policy, share_backbone=setup != "separate critic", critic_init=reward_model).train()
    env_config = TokenEnvConfig(
        reward_model=reward_model,
        reference_model=reference,
        tokenizer=tokenizer,
        prompts=prompts,
        max_new_tokens=32,
        kl_coef=0.05,
        device="cpu",
    )
    env = make_rollout_env(16, env_config)
    trainable = [p for p in agent.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=3e-4, eps=1e-5, fused=True)
    weights = rss() - base
    reset_peak()
    generator = torch.Generator().manual_seed(0)
    rollout = collect_rollout(agent, env, 1.0, seed=0, generator=generator)
    rollout_peak = rss("VmHWM") - base
    reset_peak()
    config = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8)
    ppo_update(agent, optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), kl_coef=0.05)
    update_peak = rss("VmHWM") - base
    print(json.dumps(dict(
        weights=weights, rollout=rollout_peak, update=update_peak,
        prompt=rollout.prompt_ids.shape[1], response=float(rollout.mask.sum(1).float().mean()),
        trained=sum(p.numel() for p in trainable), params=sum(p.numel() for p in policy.parameters()),
    )))  # fmt: skip


def measure() -> None:
    print("one rollout (16 episodes, 32 new tokens) and one update (micro-batches of 8 episodes) on the CPU, fp32, one")
    print("thread; MB above the process before its models; formula / measured\n")
    print(f"{'size':6}{'params':>8}  {'setup':16}{'weights':>22}{'rollout peak':>22}{'update peak':>22}")
    for shape in SMALL:
        for setup in SETUPS:
            spec = json.dumps({"shape": asdict(shape), "setup": setup})
            env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
            done = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            got = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
            if not setup.startswith("LoRA"):
                assert got["params"] == shape.params, (got["params"], shape.params)  # the count is exact
            w = Workload(got["prompt"], got["response"], 16, 8)
            parts = iteration_memory(shape, setup, CPU_FP32, w)
            cells = []
            for formula, measured in (
                (parts["weights"], got["weights"]),
                (parts["weights"] + parts["rollout"], got["rollout"]),
                (parts["weights"] + parts["update"], got["update"]),
            ):
                cells.append(f"{formula / MB:7.0f} / {measured / MB:5.0f} ({formula / measured:4.2f})")
            print(f"{shape.name:6}{shape.params / 1e6:7.1f}M  {setup:16}" + "".join(f"{c:>22}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="the formula for Qwen2.5 0.5B/1.5B/7B on GPUs")
    parser.add_argument("--calibrate", action="store_true", help="measure bytes per activation element and logit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
    elif args.logits:
        print(logits_peak(32_000, 2048, 256, *json.loads(args.logits)))
    elif args.calibrate:
        calibrate()
    elif args.table:
        table()
    else:
        measure()


if __name__ == "__main__":
    main()
