"""One policy-gradient update on a rollout: re-score, advantages, K epochs of clipped losses.

The same update serves four algorithms; they differ only in their advantages and
in whether a critic is trained:

- ``ppo``: GAE(gamma, lambda) from the critic's values; clipped value loss.
- ``rloo``: the episode's return minus the mean return of the other episodes on the
  same prompt (leave-one-out baseline), on every token; no critic.
- ``grpo``: the episode's return minus its group's mean, divided by the group's std
  (``advantage_scaling`` picks another divisor); no critic.
- ``reinforce``: each token's reward-to-go, no baseline but the whitening; no critic.

The algorithm picks its advantage function once (``ADVANTAGES``); the rest of
the update is the same code for all four. ``recipe`` names a published algorithm
(GRPO, Dr. GRPO, DAPO, GSPO, CISPO, dual-clip PPO, REINFORCE++) and sets the
fields its paper sets (``RECIPES``; ``docs/algorithms.md`` has each formula).

Where this departs from the textbook PPO (Schulman et al. 2017) and why:

- old log-probs and values come from a teacher-forced, no-grad pass over the
  rollout in the exact micro-batches of the first epoch, not from the sampling
  pass. The two agree to about 1e-6 in float32 but not bitwise (a KV cache sums in
  another order), and far less under bf16; re-scoring makes the first minibatch's
  ratio exactly 1. The sampling log-probs still feed the env's KL penalty.
- the critic is a value head on the policy's trunk (or a separate trunk) and one
  combined loss ``pg + vf_coef * vf - ent_coef * entropy (+ beta * KL)`` trains both.
- the value loss is divided by the variance of the rollout's returns, or the old values' mean squared error
  where larger (``normalize_value_loss``); with it,
  ``vf_coef`` 2, ``clip_range_value`` 1.0 and the head on the trunk's middle block (``ActorCritic``) a value
  head on the policy's trunk learns to explain the returns; with the older defaults (the plain loss, 0.1, 0.2,
  the last hidden state) it explained almost nothing (``docs/design.md``).
- advantages are whitened over valid tokens (not with ``advantage_scaling`` 'none', Dr. GRPO's
  unscaled advantages); rewards optionally scaled (no shift).
- the per-token losses are a token mean over the minibatch by default
  (``loss_aggregation``: per-sequence means, or Dr. GRPO's constant divisor);
  micro-batches are weighted so that accumulation gives the minibatch's aggregate.
- the ratio may be clipped asymmetrically (``clip_range_high``, DAPO's clip-higher).
- by default the KL penalty stays in the reward, where the env puts it (k1 per
  token), unlike the GRPO paper's loss term; ``kl_estimator`` swaps in k2 or k3,
  ``kl_penalty='loss'`` moves it into the loss and ``'none'`` drops it (with either the
  env's kl_coef must be 0).
- the rollout's own log-probs (the sampler's, from the KV cache) are compared with the
  first re-score every update (``mismatch/*`` metrics); ``sampler_correction`` weights the
  policy loss by their truncated or masked ratio (TRL's ``vllm_importance_sampling_mode``).
- rloo/grpo can drop the groups whose returns are all equal (``filter_equal_groups``,
  DAPO's dynamic-sampling filter, without its resampling): they leave the mask.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from agents.advantages import (
    GroupScaling,
    compute_gae,
    equal_groups,
    explained_variance,
    group_centered,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
    scale_advantages,
)
from agents.losses import (
    Aggregation,
    KLEstimator,
    RatioLevel,
    SamplerCorrection,
    Surrogate,
    aggregate,
    aggregation_size,
    kl_estimate,
    mismatch_stats,
    policy_loss,
    sampler_weights,
    value_loss,
)
from agents.packing import packing_works, plan_packing, unwrapped
from agents.policy import ActorCritic
from agents.rollout import Rollout
from textenv.config import check_choice, check_float, check_int
from textenv.lm import crop_left_padding, logprobs_from_logits, position_ids_from_mask

Algo = Literal["ppo", "rloo", "grpo", "reinforce"]
KLPenalty = Literal["reward", "loss", "none"]
Recipe = Literal["grpo", "dr_grpo", "dapo", "gspo", "cispo", "dual_clip", "reinforce_pp"]

# What each recipe sets, as its paper does (docs/algorithms.md gives the paper and the formula of each). Every
# field not named keeps its default or the value given; a field given a value other than both its default and
# the recipe's is refused (PPOConfig.implied_settings).
GROUP_NORMALISED = {"algo": "grpo", "advantage_scaling": "group", "whiten_advantages": False}
RECIPES: dict[str, dict[str, object]] = {
    # Shao et al. 2024: per-sequence means, symmetric clip, KL as a k3 loss term
    "grpo": GROUP_NORMALISED
    | {"loss_aggregation": "sequence_mean", "clip_range": 0.2, "clip_range_high": None}
    | {"kl_penalty": "loss", "kl_estimator": "k3"},
    # Liu et al. 2025: no std division, no length normalisation (a constant), no whitening, no KL
    "dr_grpo": {"algo": "grpo", "advantage_scaling": "none", "whiten_advantages": False}
    | {"loss_aggregation": "constant", "clip_range": 0.2, "clip_range_high": None, "kl_penalty": "none"},
    # Yu et al. 2025: token mean, clip-higher, no KL, dynamic sampling's filter (without resampling)
    "dapo": GROUP_NORMALISED
    | {"loss_aggregation": "token_mean", "clip_range": 0.2, "clip_range_high": 0.28}
    | {"kl_penalty": "none", "filter_equal_groups": True},
    # Zheng et al. 2025: one length-normalised ratio per sequence, clipped to [1 - 3e-4, 1 + 4e-4], no KL
    "gspo": GROUP_NORMALISED
    | {"loss_aggregation": "sequence_mean", "importance_sampling_level": "sequence"}
    | {"clip_range": 3e-4, "clip_range_high": 4e-4, "kl_penalty": "none"},
    # MiniMax-M1 (Chen et al. 2025): the detached, clipped weight times log pi; token mean, no KL
    "cispo": GROUP_NORMALISED
    | {"loss_aggregation": "token_mean", "surrogate": "cispo", "clip_range_high": 0.28, "kl_penalty": "none"},
    # Ye et al. 2020: PPO, and for A < 0 the loss bounded by -3 A
    "dual_clip": {"algo": "ppo", "clip_range": 0.2, "dual_clip_c": 3.0},
    # Hu 2025: no critic, k1 KL in the reward, reward-to-go whitened over the batch, token mean
    "reinforce_pp": {"algo": "reinforce", "whiten_advantages": True, "loss_aggregation": "token_mean"}
    | {"clip_range": 0.2, "clip_range_high": None, "kl_penalty": "reward", "kl_estimator": "k1"},
}


@dataclass
class PPOConfig:
    """The PPO update. Defaults are tuned for the embedded default task on a CPU."""

    recipe: Recipe | None = None
    """A published algorithm by the name TRL and verl give it: 'grpo', 'dr_grpo', 'dapo', 'gspo', 'cispo',
    'dual_clip' (PPO) or 'reinforce_pp' (REINFORCE++). It sets the fields its paper sets (advantages, whitening,
    aggregation, clipping, where the KL goes; agents.ppo.RECIPES, docs/algorithms.md). A flag that gives one of
    them another value than the recipe's is refused, naming both; from Python, a field left at its default takes
    the recipe's value."""
    algo: Algo = "ppo"
    """'ppo' (critic + GAE), 'rloo' or 'grpo' (critic-free group baselines), 'reinforce' (reward-to-go, no
    critic)."""
    group_size: int = 4
    """rloo/grpo: episodes per prompt (each rollout holds batch_size / group_size prompts)."""
    epochs: int = 4
    """K: passes over each rollout."""
    minibatch_size: int = 16
    """Episodes per optimizer step."""
    micro_batch_size: int = 16
    """Episodes per forward/backward; gradients accumulate up to ``minibatch_size``."""
    pack_episodes: bool = True
    """Pack a micro-batch's episodes several to a row (no padding between them) where that saves work; the same
    numbers to float rounding (``agents.packing``). Off: one episode per padded row."""
    learning_rate: float = 3e-4
    """Adam learning rate at the start; it decays linearly to 0 over the run."""
    value_lr_scale: float = 1.0
    """The value head's learning rate as a multiple of learning_rate (the trunk and the rest take learning_rate).
    On a shared trunk a faster head fits more of the returns itself and asks less of the trunk the actor uses
    (docs/design.md)."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Epsilon of the clipped surrogate."""
    clip_range_high: float | None = None
    """Upper epsilon: the ratio is clipped to [1 - clip_range, 1 + clip_range_high] ("clip-higher", DAPO,
    Yu et al. 2025). None: clip_range."""
    dual_clip_c: float | None = None
    """Dual-clip PPO (Ye et al. 2020): where the advantage is negative the policy loss is at most -c * A (c > 1;
    3 in the paper). None: off."""
    importance_sampling_level: RatioLevel = "token"
    """The ratio pi / pi_old per 'token', or per 'sequence': exp of the mean log-ratio over the response, clipped
    per sequence (GSPO, Zheng et al. 2025)."""
    surrogate: Surrogate = "clip"
    """'clip': PPO's clipped surrogate. 'cispo': -sg(min(r, 1 + clip_range_high)) * A * log pi, the clipped and
    detached ratio as a weight, so every token keeps a gradient (CISPO, MiniMax-M1 2025; no lower bound)."""
    clip_range_value: float = 1.0
    """Epsilon of the clipped value loss, in the returns' units: how far a value may move from its old value in one
    update. The values start at 0 and the default task's returns span about [-3, 3]; at 0.2 (an older default) the
    clip held them back (docs/design.md)."""
    vf_coef: float = 2.0
    """Weight of the value loss in the combined loss. With normalize_value_loss it is the critic's share of the
    shared trunk's gradient against the policy loss's (whitened, of unit scale); at 0.1 (an older default) the trunk
    was the actor's and the value head explained almost nothing of the returns (docs/design.md)."""
    normalize_value_loss: bool = True
    """Divide the value loss by the variance of the rollout's returns over valid tokens, or by the old values' mean
    squared error where that is larger (``value_loss_scale``), so the critic's share of the gradient holds whatever
    the scale and spread of the scores, and stays bounded where the values lag a mean that moved."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    loss_aggregation: Aggregation = "token_mean"
    """Per-token losses (policy, value, entropy, KL alike) to one: 'token_mean' (every token alike; DAPO),
    'sequence_mean' (mean of sequence means; GRPO), 'constant' (sum / (sequences * max_new_tokens); Dr. GRPO)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the valid tokens of the rollout. advantage_scaling 'none' turns
    it off (Dr. GRPO's unscaled advantages; 'batch' with whitening is the whitened one)."""
    whiten_rewards: bool = False
    """Scale rewards to unit std over valid tokens (no mean shift) before GAE."""
    advantage_scaling: GroupScaling | None = None
    """rloo/grpo: divide advantages by the group's return std ('group', GRPO), the batch's advantage std ('batch',
    REINFORCE++ with a group baseline, Hu 2025) or nothing ('none', Dr. GRPO: it also turns whiten_advantages
    off). None: grpo 'group', rloo 'none' (whitened)."""
    filter_equal_groups: bool = False
    """rloo/grpo: drop groups whose returns are all equal (within 1e-6) from the loss and its denominators
    (DAPO's dynamic-sampling filter, Yu et al. 2025, without resampling)."""
    kl_estimator: KLEstimator | None = None
    """Per-token KL(pi || pi_ref) estimate, log r = log pi_ref - log pi: 'k1' -log r, 'k2' (log r)^2 / 2,
    'k3' (r - 1) - log r (Schulman, "Approximating KL divergence"). None: 'k1' with kl_penalty 'reward' (and
    'none', where nothing reads it), 'k3' with 'loss'. 'k1' with 'loss' is refused: as a loss term its expected
    gradient is 0, so it would apply no KL."""
    kl_penalty: KLPenalty = "reward"
    """Where beta * KL goes: 'reward' (each step's reward, from the env), 'loss' (a loss term, as in GRPO,
    Shao et al. 2024) or 'none' (no KL at all: DAPO, Dr. GRPO, GSPO, CISPO). With 'loss' and 'none' the trainer
    sets the env's kl_coef to 0."""
    sampler_correction: SamplerCorrection | None = None
    """Weight each token's policy loss by rho = pi_learner / pi_sampler (the update's first re-score over the
    rollout's own log-probs), per token or per sequence (the product over it), truncated at sampler_correction_cap
    ('*_truncate') or 0 beyond it ('*_mask'); TRL's vllm_importance_sampling_mode. None: no correction (the
    mismatch is logged either way)."""
    sampler_correction_cap: float = 3.0
    """The cap C of sampler_correction."""

    def __post_init__(self):
        apply_settings(self, self.implied_settings())
        if self.kl_estimator is None:  # the estimator that fits where the KL goes
            self.kl_estimator = "k3" if self.kl_penalty == "loss" else "k1"
        self.validate()

    def implied_settings(self) -> dict[str, tuple[object, str]]:
        """Field -> (value, what sets it): the recipe's fields, and advantage_scaling 'none''s no whitening."""
        if self.recipe is not None:
            check_choice("recipe", self.recipe, Recipe)
        implied = {name: (value, f"recipe {self.recipe!r}") for name, value in RECIPES.get(self.recipe, {}).items()}
        scaling = implied.get("advantage_scaling", (self.advantage_scaling,))[0]
        if scaling == "none" and "whiten_advantages" not in implied:
            source = "advantage_scaling 'none' (Dr. GRPO: no whitening; 'batch' is the whitened one)"
            implied["whiten_advantages"] = (False, source)
        return implied

    def validate(self) -> None:
        """Raise on a setting out of range, of the wrong type or not finite, naming the field."""
        check_choice("algo", self.algo, Algo)
        check_choice("loss_aggregation", self.loss_aggregation, Aggregation)
        check_choice("kl_estimator", self.kl_estimator, KLEstimator)
        check_choice("kl_penalty", self.kl_penalty, KLPenalty)
        if self.kl_penalty == "loss" and self.kl_estimator == "k1":
            raise ValueError(
                "kl_estimator 'k1' with kl_penalty 'loss' would apply no KL: k1 = log pi - log pi_ref, as a loss "
                "term, has the gradient of log pi, whose mean over the policy's own samples is 0. Use 'k3' (the "
                "default with 'loss') or 'k2'"
            )
        if self.advantage_scaling is not None:
            check_choice("advantage_scaling", self.advantage_scaling, GroupScaling)
        check_choice("importance_sampling_level", self.importance_sampling_level, RatioLevel)
        check_choice("surrogate", self.surrogate, Surrogate)
        if self.clip_range_high is not None:
            check_float("clip_range_high", self.clip_range_high, "> 0", lambda v: v > 0)
        if self.dual_clip_c is not None:
            check_float("dual_clip_c", self.dual_clip_c, "> 1", lambda v: v > 1)
            if self.surrogate != "clip":
                raise ValueError(f"dual_clip_c bounds PPO's clipped surrogate; surrogate {self.surrogate!r} has none")
        if self.sampler_correction is not None:
            check_choice("sampler_correction", self.sampler_correction, SamplerCorrection)
        check_float("sampler_correction_cap", self.sampler_correction_cap, "> 0", lambda v: v > 0)
        for name in ("filter_equal_groups", "pack_episodes", "normalize_value_loss"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not self.uses_groups and (self.advantage_scaling is not None or self.filter_equal_groups):
            name = "advantage_scaling" if self.advantage_scaling is not None else "filter_equal_groups"
            raise ValueError(
                f"{name} applies to the group baselines (algo 'rloo' or 'grpo'), not to algo {self.algo!r}"
            )
        for name in ("group_size", "epochs", "minibatch_size", "micro_batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_float("learning_rate", self.learning_rate, "> 0", lambda v: v > 0)
        check_float("value_lr_scale", self.value_lr_scale, "> 0", lambda v: v > 0)
        for name in ("gamma", "lam"):
            check_float(name, getattr(self, name), "in [0, 1]", lambda v: 0 <= v <= 1)
        for name in ("clip_range", "clip_range_value", "max_grad_norm"):
            check_float(name, getattr(self, name), "> 0", lambda v: v > 0)
        for name in ("vf_coef", "ent_coef"):
            check_float(name, getattr(self, name), ">= 0", lambda v: v >= 0)
        if self.minibatch_size % self.micro_batch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )

    @property
    def uses_critic(self) -> bool:
        return self.algo == "ppo"

    @property
    def uses_groups(self) -> bool:
        """Whether the episodes come in groups of group_size on one prompt (rloo, grpo)."""
        return self.algo in ("rloo", "grpo")

    @property
    def group_scaling(self) -> GroupScaling:
        """advantage_scaling, or the algorithm's own: 'group' for grpo, 'none' for rloo (and ppo, unused)."""
        return self.advantage_scaling or ("group" if self.algo == "grpo" else "none")


def apply_settings(config: PPOConfig, implied: dict[str, tuple[object, str]]) -> None:
    """Set each implied field still at its default; refuse one given another value, naming both settings."""
    defaults = {f.name: f.default for f in fields(config)}
    for name, (value, source) in implied.items():
        given = getattr(config, name)
        if given == defaults[name]:
            setattr(config, name, value)
        elif given != value:
            raise ValueError(
                f"{source} sets {name}={value!r}, but {name}={given!r} was given: drop one of the two settings"
            )


@dataclass
class Scored:
    """A teacher-forced forward over rollout episodes."""

    logprobs: Tensor  # (B, T)
    values: Tensor  # (B, T + 1): V(s_0) .. V(s_T)
    entropy: Tensor  # (B, T)


class EntropyOfLogprobs(torch.autograd.Function):
    """``-(exp(logprobs) * logprobs).sum(-1)``, (..., V) -> (...), as ``textenv.lm.entropy_from_logits`` computes it.

    Its backward is autograd's gradient of that same expression, except that it is skipped
    (no gradient, exactly what a zero gradient would add) when every incoming gradient is
    zero: with ``ent_coef`` 0 the entropy is only logged, and its (..., V) backward was a
    sixth of a GPT-2-sized update's backward. The update itself leaves the entropy out of
    the loss at ``ent_coef`` 0 (``micro_batch_loss``), so its backward never runs there: the
    test of the incoming gradient reads it on the host, a wait for a GPU.
    """

    @staticmethod
    def forward(ctx, logprobs: Tensor) -> Tensor:
        ctx.save_for_backward(logprobs)  # log_softmax keeps this tensor for its own backward anyway
        return -(logprobs.exp() * logprobs).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor | None:
        if not bool(grad.any()):
            return None
        (logprobs,) = ctx.saved_tensors
        with torch.enable_grad():
            x = logprobs.detach().requires_grad_()
            return torch.autograd.grad(-(x.exp() * x).sum(-1), x, grad)[0]


def crop_to_episodes(rollout: Rollout) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The episodes cropped to their own longest prompt and response: (ids, attention mask, actions, mask).

    A micro-batch drawn from the rollout carries the whole rollout's padding (its widest
    prompt, its longest episode); none of it changes an output that is used.
    """
    prompt_ids, prompt_mask = crop_left_padding(rollout.prompt_ids, rollout.prompt_mask)
    context = rollout.attention_mask[:, rollout.prompt_ids.shape[1] :]  # agent and environment tokens
    taken = int(context.any(0).nonzero().max()) + 1 if context.any() else 1  # last column any row used
    actions, mask = rollout.actions[:, :taken], rollout.mask[:, :taken]
    return torch.cat([prompt_ids, actions], 1), torch.cat([prompt_mask, context[:, :taken]], 1), actions, mask


def score_rollout(
    agent: ActorCritic,
    rollout: Rollout,
    temperature: float,
    autocast=None,
    pack: bool = True,
    sparse_embedding_grad: bool = False,
) -> Scored:
    """One forward over prompt + response: log-probs of the taken actions, values, entropies.

    The forward runs on the episodes cropped to their own longest prompt and response
    (``crop_to_episodes``), packed several to a row where that saves cells (``pack``,
    ``agents.packing``), and the LM head only at the positions that predict a taken
    action (``ActorCritic.forward``'s ``logits_at``), never over the prompt or padding.
    Log-probs and entropies are 0 on steps the episode did not take; values are 0 past the
    episodes' longest (the losses and GAE read neither) and, when packed, at padding.
    ``sparse_embedding_grad``: passed to the agent, for a caller that backpropagates the scores.
    """
    device = next(agent.parameters()).device
    batch, steps = rollout.actions.shape
    # every selection is planned where the rollout lives (the host), then moved without waiting: on a GPU a
    # boolean selection makes the host wait for its size (tests/agents/test_host_syncs.py counts such waits)
    ids, attention, actions, mask = crop_to_episodes(rollout)
    width, taken = ids.shape[1] - actions.shape[1], actions.shape[1]
    # position p predicts token p + 1: step t's action is predicted at width - 1 + t
    logits_at = torch.cat([mask.new_zeros(batch, width - 1), mask, mask.new_zeros(batch, 1)], 1)
    # the taken steps in row-major order, the order of the logits: their actions and their cells in a (B, T) output
    cells = (torch.arange(batch, device=mask.device)[:, None] * steps + torch.arange(taken, device=mask.device))[mask]
    chosen = actions[mask]
    packing = plan_packing(ids, attention) if pack and packing_works(agent) else None
    prior = value_prior_layout(agent, rollout, width, taken)
    embed = {"sparse_embedding_grad": sparse_embedding_grad}
    with autocast or torch.autocast(device.type, enabled=False):
        if packing is None:
            inputs = (ids, attention, position_ids_from_mask(attention), logits_at)
            ids, attention, positions, logits_at = (to_device(t, device) for t in inputs)
            prior = {} if prior is None else {"value_prior": to_device(prior, device)}
            out = agent(ids, attention, positions, logits_at=logits_at, **embed, **prior)
            logits, values = out.logits, out.values
        else:  # no attention mask: the position ids' restarts keep the episodes apart
            at, order = packing.packed_positions(logits_at), packing.reorder(logits_at)
            prior = {} if prior is None else {"value_prior": to_device(packing.pack(prior), device)}
            at, order, packing = to_device(at, device), to_device(order, device), packing.to(device)
            out = agent(packing.ids, None, packing.position_ids, logits_at=at, **embed, **prior)
            logits, values = out.logits[order], packing.unpack(out.values)
    logprobs = logprobs_from_logits(logits, temperature)  # (N, V), N taken steps
    cells, chosen = to_device(cells, device), to_device(chosen, device)
    zeros = logprobs.new_zeros(batch * steps)
    # put in their cells by index: masked_scatter's backward selects by the mask, a wait for the device per backward
    return Scored(
        logprobs=zeros.index_put((cells,), logprobs.gather(-1, chosen[:, None])[:, 0]).view(batch, steps),
        values=F.pad(values[:, width - 1 :], (0, steps - taken)),
        entropy=zeros.index_put((cells,), EntropyOfLogprobs.apply(logprobs)).view(batch, steps),
    )


def value_prior_layout(agent: torch.nn.Module, rollout: Rollout, width: int, taken: int) -> Tensor | None:
    """The rollout's value prior (B, T + 1) in the layout of the cropped episodes (B, width + taken) that
    ``score_rollout`` runs (value t is read at position width - 1 + t); None where the agent's critic has none."""
    if not unwrapped(agent).value_prior:
        return None
    if rollout.value_prior is None:
        raise ValueError(
            "the agent's critic adds the reward model's prefix scores to its values (value_prior) but the rollout has "
            "none: collect it with agents.rollout.collect_rollout from an env with a reward model"
        )
    return F.pad(rollout.value_prior[:, : taken + 1], (width - 1, 0))


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host ``tensor`` on ``device``, copied without waiting for the device's queue to drain (a blocking copy to a
    GPU synchronises its stream). Safe from ordinary host memory, which the copy stages before it returns."""
    return tensor.to(device, non_blocking=True)


# ---------------------------------------------------------------- advantages, one function per algorithm
AdvantageFn = Callable[[Tensor, Tensor, Tensor, Tensor, PPOConfig], tuple[Tensor, Tensor]]


def gae(rewards: Tensor, values: Tensor, terminated: Tensor, mask: Tensor, config: PPOConfig) -> tuple[Tensor, Tensor]:
    """PPO: GAE(gamma, lambda) from the critic's values V(s_0) .. V(s_T). Returns (advantages, returns).

    The recursion runs over the agent's steps only (``mask``): in an episode of several
    turns the environment's tokens sit between them, and the next state of a turn's last
    token is the state before the agent's next token, after the reply (``agent_steps``).
    """
    return gae_over_agent_steps(rewards, values, terminated, mask, config.gamma, config.lam)


def reward_to_go(rewards: Tensor, values: Tensor, terminated: Tensor, mask: Tensor, config: PPOConfig):
    """REINFORCE (REINFORCE++, Hu 2025): A_t = sum over the agent's steps k >= t of gamma^(k - t) r_k; no critic.

    GAE with V = 0 and lambda = 1 is exactly this sum (a truncated episode bootstraps from V = 0). No returns.
    """
    advantages, _ = gae_over_agent_steps(rewards, torch.zeros_like(values), terminated, mask, config.gamma, 1.0)
    return advantages, torch.zeros_like(rewards)


def gae_over_agent_steps(
    rewards: Tensor, values: Tensor, terminated: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """``compute_gae`` over each row's agent steps gathered to its front (``agent_steps``), scattered back."""
    order, next_columns, steps = agent_steps(mask)
    advantages, returns = compute_gae(
        rewards.gather(1, order),
        values.gather(1, order),
        values.gather(1, next_columns),
        terminated.gather(1, order),
        steps,
        gamma,
        lam,
    )
    back = torch.zeros_like(rewards)
    return back.scatter(1, order, advantages), back.scatter(1, order, returns)


def agent_steps(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's agent columns first, in order: (order (B, T), next column of each (B, T), compacted mask (B, T)).

    ``order`` is a permutation of the columns (gather with it compacts, scatter restores). The
    next column of an agent step is the row's next agent column, or the column after it for
    its last step (V(s_{T}) for a truncated episode's bootstrap). With no environment tokens
    the permutation is the identity and this is ordinary GAE.
    """
    columns = mask.shape[1]
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    count = mask.sum(1, keepdim=True)
    position = torch.arange(columns, device=mask.device).expand_as(order)
    following = torch.cat([order[:, 1:], order[:, -1:] + 1], dim=1)
    next_columns = torch.where(position + 1 < count, following, order + 1).clamp(max=columns)
    return order, next_columns, position < count


def group_baseline(baseline: Callable[[Tensor, int], Tensor]) -> AdvantageFn:
    """RLOO/GRPO: each episode's undiscounted return against its group's, on every token; no returns.

    The baselined returns are then scaled as ``config.group_scaling`` says; a 'batch' std
    counts only the episodes with a valid step (filtered groups have none).
    """

    def advantages(rewards: Tensor, values: Tensor, terminated: Tensor, mask: Tensor, config: PPOConfig):
        episode_returns = (rewards * mask).sum(1)  # score - beta * KL of the episode
        centered = baseline(episode_returns, config.group_size)
        scaled = scale_advantages(centered, episode_returns, config.group_size, config.group_scaling, mask.any(1))
        return scaled[:, None] * mask, torch.zeros_like(rewards)

    return advantages


ADVANTAGES: dict[str, AdvantageFn] = {
    "ppo": gae,
    "rloo": group_baseline(rloo_advantages),
    "grpo": group_baseline(group_centered),
    "reinforce": reward_to_go,
}


def swap_kl_estimator(
    rewards: Tensor, kl: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float, estimator
) -> Tensor:
    """The env's rewards with their penalty -beta * k1 (``kl``) swapped for -beta * ``estimator`` on valid steps."""
    swap = kl_coef * (kl - kl_estimate(logprobs, ref_logprobs, estimator))
    return rewards + torch.where(mask, swap, torch.zeros_like(swap))


def rollout_advantages(rollout: Rollout, old_values: Tensor, config: PPOConfig, kl_coef: float):
    """Rewards (KL estimator swapped), advantages and returns (B, T), and the mask left after filtering groups."""
    device = old_values.device
    mask, rewards = rollout.mask.to(device), rollout.rewards.to(device)
    if config.kl_penalty == "reward" and config.kl_estimator != "k1":
        on_device = (t.to(device) for t in (rollout.kl, rollout.logprobs, rollout.ref_logprobs))
        rewards = swap_kl_estimator(rewards, *on_device, mask, kl_coef, config.kl_estimator)
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if config.filter_equal_groups:  # no advantage, no gradient: out of the mask and every denominator
        mask = mask & ~equal_groups((rewards * mask).sum(1), config.group_size)[:, None]
    advantages, returns = ADVANTAGES[config.algo](
        rewards, old_values, rollout.terminated_steps.to(device), mask, config
    )
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns, mask


# ---------------------------------------------------------------- the update
def rescore(
    agent: ActorCritic, rollout: Rollout, micro_batches: list[Tensor], temperature: float, autocast, pack: bool = True
):
    """Old log-probs (B, T) and values (B, T + 1), no-grad, in the micro-batches of the first epoch."""
    device = next(agent.parameters()).device
    batch, steps = rollout.actions.shape
    logprobs, values = torch.zeros(batch, steps, device=device), torch.zeros(batch, steps + 1, device=device)
    with torch.no_grad():
        for rows in micro_batches:
            scored = score_rollout(agent, rollout.select(rows), temperature, autocast, pack)
            rows_d = to_device(rows, device)
            logprobs[rows_d], values[rows_d] = scored.logprobs, scored.values
    return logprobs, values


@dataclass
class Targets:
    """What the losses compare against, for every episode of the rollout: (B, T) each, values (B, T + 1)."""

    old_logprobs: Tensor
    old_values: Tensor
    ref_logprobs: Tensor
    advantages: Tensor
    returns: Tensor
    mask: Tensor  # the rollout's, less the filtered groups
    sampler_weights: Tensor | None = None  # sampler_correction's importance weights, no gradient
    value_scale: Tensor | None = None  # the value loss's divisor (normalize_value_loss): Var(returns), a scalar


def micro_batch_loss(
    scored: Scored, targets: Targets, rows: Tensor, config: PPOConfig, kl_coef: float, max_new_tokens: int | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The combined loss of the episodes ``rows`` (on the targets' device), aggregated as configured; its stats."""
    mask = targets.mask[rows]
    agg = {"aggregation": config.loss_aggregation, "max_new_tokens": max_new_tokens}
    pg_loss, stats = policy_loss(
        scored.logprobs,
        targets.old_logprobs[rows],
        targets.advantages[rows],
        mask,
        config.clip_range,
        clip_range_high=config.clip_range_high,
        level=config.importance_sampling_level,
        surrogate=config.surrogate,
        dual_clip_c=config.dual_clip_c,
        weights=None if targets.sampler_weights is None else targets.sampler_weights[rows],
        **agg,
    )
    if config.uses_critic:
        old_values = targets.old_values[rows, :-1]
        vf_loss, vf_stats = value_loss(
            scored.values[:, :-1], old_values, targets.returns[rows], mask, config.clip_range_value, **agg
        )
        stats |= vf_stats
        if targets.value_scale is not None:
            vf_loss = vf_loss / targets.value_scale
    else:  # no critic; the zero term gives the unused value head zero gradients (DDP needs one)
        vf_loss = 0.0 * scored.values.sum()
    loss = pg_loss + config.vf_coef * vf_loss
    if config.ent_coef:  # at 0 the entropy is only logged: no zero gradient through its (tokens x vocabulary) backward
        loss = loss - config.ent_coef * aggregate(scored.entropy, mask, **agg)
    if config.kl_penalty == "loss":  # GRPO's KL term, its gradient through the new log-probs
        kl = aggregate(kl_estimate(scored.logprobs, targets.ref_logprobs[rows], config.kl_estimator), mask, **agg)
        loss = loss + kl_coef * kl
        stats |= {"loss/kl": kl.detach(), "ppo/kl_in_loss": kl_coef * kl.detach()}
    stats |= {
        "loss/policy": pg_loss.detach(),
        "loss/value": vf_loss.detach(),
        "loss/total": loss.detach(),
        "policy/entropy": masked_mean(scored.entropy.detach(), mask),  # a token mean whatever the aggregation
    }
    return loss, stats


def minibatch_step(
    agent,
    optimizer,
    rollout: Rollout,
    minibatch: Tensor,
    targets: Targets,
    config: PPOConfig,
    temperature,
    autocast,
    kl_coef: float,
    max_new_tokens: int | None,
) -> dict[str, list[float]]:
    """One optimizer step on ``minibatch``, accumulating gradients over its micro-batches; returns their stats.

    The stats stay on the device until the step, when the host reads them in one transfer with the gradient norm
    that decides the step: a ``float`` per stat and micro-batch would make it wait for a GPU each time.
    """
    pending: dict[str, list[Tensor]] = defaultdict(list)
    device = targets.mask.device
    optimizer.zero_grad(set_to_none=True)
    # the tied embedding's gradient as sparse rows (ActorCritic.forward), the same to the bit; not under torchrun,
    # where DDP and FSDP reduce the gradients and are tested with autograd's dense lookup gradient only
    sparse_rows = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    minibatch_size = aggregation_size(targets.mask[to_device(minibatch, device)], config.loss_aggregation).clamp(min=1)
    for rows in minibatch.split(config.micro_batch_size):
        rows_d = to_device(rows, device)
        scored = score_rollout(agent, rollout.select(rows), temperature, autocast, config.pack_episodes, sparse_rows)
        loss, micro_stats = micro_batch_loss(scored, targets, rows_d, config, kl_coef, max_new_tokens)
        # weighted by its share of the minibatch's tokens (or sequences): the accumulated gradient is the
        # minibatch's aggregate (see losses.aggregation_size)
        (loss * aggregation_size(targets.mask[rows_d], config.loss_aggregation) / minibatch_size).backward()
        # every micro-batch logs every key (ranks must log the same ones): one of filtered groups only logs zeros
        for key, value in micro_stats.items():
            pending[key].append(value)
    grad_norm = torch.nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the norm of the whole gradient
        grad_norm = grad_norm.full_tensor()
    norm, *values = torch.stack([grad_norm.double(), *(v.double() for vs in pending.values() for v in vs)]).tolist()
    read = iter(values)
    stats: dict[str, list[float]] = defaultdict(list, {key: [next(read) for _ in vs] for key, vs in pending.items()})
    # every token filtered out, on every rank (the norm is of the averaged gradient): nothing to learn from, and
    # Adam would still move the weights on its momentum
    idle = config.filter_equal_groups and norm == 0
    if math.isfinite(norm) and not idle:
        optimizer.step()
        stats["ppo/grad_norm"].append(norm)
    stats["ppo/skipped_steps"].append(float(not math.isfinite(norm)))  # a NaN or inf gradient: no step
    if config.filter_equal_groups:
        stats["ppo/idle_steps"].append(float(idle))
    return stats


def ppo_update(
    agent: ActorCritic,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    config: PPOConfig,
    temperature: float,
    generator: torch.Generator,
    autocast=None,
    *,
    kl_coef: float,
    max_new_tokens: int | None = None,
    max_turns: int | None = None,
) -> dict[str, float]:
    """K epochs of clipped PPO over ``rollout``; returns the update's metrics.

    ``max_turns``: in episodes of several turns, the per-turn figures are logged for turns 0 .. max_turns - 1
    (``turn_stats``; the same keys in every process under torchrun), else for the turns the rollout reached.

    ``kl_coef`` (required: 0 would silently drop the k2/k3 swap and the KL loss term): the
    beta of the KL penalty, the one the env's rewards were computed with (kl_penalty 'reward';
    needed to swap in k2 or k3), or the loss term's (kl_penalty 'loss', the env's own kl_coef 0).
    ``max_new_tokens``: the env's, the constant L of loss_aggregation 'constant' (needed there).
    """
    check_update_arguments(rollout, config, kl_coef, max_new_tokens)
    permutations = [torch.randperm(len(rollout.actions), generator=generator) for _ in range(config.epochs)]
    first_epoch = [
        micro for mb in permutations[0].split(config.minibatch_size) for micro in mb.split(config.micro_batch_size)
    ]
    old_logprobs, old_values = rescore(agent, rollout, first_epoch, temperature, autocast, config.pack_episodes)
    advantages, returns, mask = rollout_advantages(rollout, old_values, config, kl_coef)
    ref_logprobs = rollout.ref_logprobs.to(mask.device)
    weights, mismatch = sampler_mismatch(old_logprobs, rollout, config)
    normalize = config.uses_critic and config.normalize_value_loss
    value_scale = value_loss_scale(returns, old_values[:, :-1], mask) if normalize else None
    targets = Targets(old_logprobs, old_values, ref_logprobs, advantages, returns, mask, weights, value_scale)

    stats: dict[str, list[float]] = defaultdict(list)
    for perm in permutations:
        for minibatch in perm.split(config.minibatch_size):
            for key, values in minibatch_step(
                agent, optimizer, rollout, minibatch, targets, config, temperature, autocast, kl_coef, max_new_tokens
            ).items():
                stats[key].extend(values)

    metrics = {key: sum(values) / len(values) for key, values in stats.items() if values}
    metrics["ppo/skipped_steps"] = sum(stats["ppo/skipped_steps"])
    metrics["ppo/steps"] = len(stats["ppo/skipped_steps"])
    metrics["ppo/first_ratio_mean"] = stats["ppo/ratio_mean"][0]
    # one read of the device for the advantages' mean, the mismatch and the per-turn figures
    per_turn = turn_stats(rollout, old_values, advantages, mask, config.uses_critic, max_turns)
    read_out = {**mismatch, **per_turn}
    advantage_mean, *read = torch.stack([masked_mean(advantages, mask), *read_out.values()]).tolist()
    metrics["ppo/advantage_mean"] = advantage_mean
    metrics |= dict(zip(read_out, read))
    if config.filter_equal_groups:  # a group is filtered when its episodes lost every step
        metrics["ppo/filtered_groups"] = float((~mask.any(1)).float().mean())
        metrics["ppo/idle_steps"] = sum(stats["ppo/idle_steps"])  # steps not taken: every token filtered
    if config.uses_critic:
        metrics["ppo/explained_variance"] = explained_variance(old_values[:, :-1], returns, mask)
        metrics["ppo/return_mean"] = float(masked_mean(returns, mask))
        metrics["ppo/value_mean"] = float(masked_mean(old_values[:, :-1], mask))
    return metrics


def turn_stats(
    rollout: Rollout, values: Tensor, advantages: Tensor, mask: Tensor, critic: bool, turns: int | None = None
) -> dict[str, Tensor]:
    """Episodes of several turns, per agent turn k (from 0, up to ``turns``, else the last one reached): the share of
    episodes that reached it (``turn/k/episodes``) and, over those, the reward earned in it (``turn/k/reward``: its
    steps' KL terms, score terms and the turn's reward), its tokens' mean advantage (``turn/k/advantage``) and, with
    a critic, the value at its first token (``turn/k/value``); 0 where no episode reached it. Device scalars; none
    for single-turn rollouts. The turns are read from where the environment's replies sit (``env_mask``, on the host
    with the rollout: no wait for the device)."""
    if rollout.env_mask is None:
        return {}
    env, taken = rollout.env_mask, rollout.mask
    turn = (env & ~F.pad(env[:, :-1], (1, 0))).long().cumsum(1)  # each column's turn: the replies begun before it
    count = turns if turns is not None else int(turn[taken].max()) + 1 if taken.any() else 0
    stats: dict[str, Tensor] = {}
    for k in range(count):
        steps = taken & (turn == k)
        reached = steps.any(1)
        first = steps & (steps.long().cumsum(1) == 1)  # each episode's first token of turn k
        device_steps, device_first = to_device(steps, mask.device), to_device(first, mask.device)
        reward = (rollout.rewards * steps).sum(1).sum() / reached.sum().clamp(min=1)
        stats[f"turn/{k}/episodes"] = to_device(reached.float().mean(), mask.device)
        stats[f"turn/{k}/reward"] = to_device(reward, mask.device)
        stats[f"turn/{k}/advantage"] = masked_mean(advantages, device_steps & mask)
        if critic:
            stats[f"turn/{k}/value"] = masked_mean(values[:, :-1], device_first)
    return stats


def value_loss_scale(returns: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """The divisor of ``normalize_value_loss``: the larger of Var(returns) and the old values' mean squared error
    over the mask; 1 where both are below 1e-8 (nothing to explain: the plain loss). A tensor on the device: no wait.

    Divided by the variance, the value loss is 0.5 x (1 - explained variance) at the update's start, whatever the
    scale of the rewards and however narrow the returns. The mean squared error bounds it where the values lag the
    returns' mean (which moves as the policy improves): an offset divided by the variance alone would be multiplied by
    as much as the returns had narrowed (a task that succeeds nearly always: Var(returns) near 0), and its gradient
    would pull the shared trunk as far."""
    scale = torch.maximum(masked_var(returns, mask), masked_mean((returns - values) ** 2, mask))
    return torch.where(scale > 1e-8, scale, torch.ones_like(scale))


def sampler_mismatch(
    old_logprobs: Tensor, rollout: Rollout, config: PPOConfig
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The sampler correction's weights (None without one) and the ``mismatch/*`` stats, on the device.

    The sampler's log-probs are the rollout's own (the KV-cached sampling pass); the learner's
    are the update's first re-score, before any step: any gap is the two computations', not
    the policy's change. With a correction, also the mean weight and the share of tokens whose
    weight the cap changed.
    """
    sampler, mask = rollout.logprobs.to(old_logprobs.device), rollout.mask.to(old_logprobs.device)
    stats = mismatch_stats(old_logprobs, sampler, mask)
    if config.sampler_correction is None:
        return None, stats
    mode, cap = config.sampler_correction, config.sampler_correction_cap
    weights = sampler_weights(old_logprobs, sampler, mask, mode, cap)
    uncapped = sampler_weights(old_logprobs, sampler, mask, mode.split("_")[0] + "_truncate", math.inf)
    stats["mismatch/weight_mean"] = masked_mean(weights, mask)
    stats["mismatch/capped_frac"] = masked_mean((weights != uncapped).float(), mask)
    return weights, stats


def check_update_arguments(rollout: Rollout, config: PPOConfig, kl_coef: float, max_new_tokens: int | None) -> None:
    """Raise on a ``ppo_update`` keyword that is missing, out of range or at odds with the rollout."""
    check_float("kl_coef", kl_coef, ">= 0", lambda v: v >= 0)
    if config.loss_aggregation != "constant":
        return
    if max_new_tokens is None:
        raise ValueError("loss_aggregation 'constant' needs ppo_update(..., max_new_tokens=<the env's>)")
    # the constant L bounds an episode's agent steps (in episodes of several turns the rollout's columns also hold
    # the environment's tokens, which are not steps)
    check_int("max_new_tokens", max_new_tokens, minimum=int(rollout.mask.sum(1).max()))
