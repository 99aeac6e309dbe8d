"""The critic on the policy's trunk: its loss on the scale of the returns' spread, strong enough for the value head to
fit the returns (``normalize_value_loss``, ``vf_coef``, ``clip_range_value``), and the block the head reads
(``value_layer``); docs/design.md."""

import pytest
import torch
from gymnasium.vector import AutoresetMode
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from agents.advantages import explained_variance
from agents.policy import VALUE_HEAD_FILE, ActorCritic
from agents.ppo import PPOConfig, ppo_update, rescore, rollout_advantages, value_loss_scale
from agents.rollout import collect_rollout
from agents.train import RunConfig
from tests.agents.test_ppo import tiny_agent, tiny_rollout
from tests.models import tiny_causal_lm, tiny_reward_model
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.lm import position_ids_from_mask

OLD_CRITIC = {"vf_coef": 0.1, "clip_range_value": 0.2, "normalize_value_loss": False}  # the defaults before
PLAIN = {"normalize_value_loss": False}


def first_value_loss(returns: list[float], **settings) -> float:
    """``loss/value`` of one step of one epoch over ``tiny_rollout(returns)``: the loss before any weight moved."""
    config = PPOConfig(epochs=1, minibatch_size=4, micro_batch_size=4, **settings)
    agent = tiny_agent()
    torch.nn.init.zeros_(agent.value_head.weight)  # V = 0: the returns are the only scale in the loss
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.0)
    metrics = ppo_update(agent, optimizer, tiny_rollout(returns), config, 1.0, torch.Generator(), kl_coef=0.0)
    return metrics["loss/value"]


def test_the_value_loss_is_in_units_of_the_returns_variance():
    # with the value head at 0 the loss is 0.5 * mean(R^2) / Var(R): scaling the returns by 10 leaves it as it is
    returns = [1.0, -0.5, 2.0, 0.3]
    loss = first_value_loss(returns, vf_coef=0.0)  # vf_coef weighs it, the log is the same
    assert first_value_loss([10 * r for r in returns]) == pytest.approx(loss, rel=1e-5)
    plain = first_value_loss(returns, **PLAIN)
    assert first_value_loss([10 * r for r in returns], **PLAIN) == pytest.approx(100 * plain, 1e-5)


def test_returns_that_do_not_vary_are_measured_against_the_values_offset():
    # lambda 1 and V = 0: every step's return is its episode's, 0.7 (lambda < 1 would discount the earlier steps').
    # Var(returns) = 0: the divisor is the old values' mean squared error, 0.49, so the loss starts at 0.5, not at
    # 0.5 x 0.49 / 0 (an offset blown up by the returns' narrowness)
    same = {"lam": 1.0}
    assert first_value_loss([0.7] * 4, **PLAIN, **same) == pytest.approx(0.5 * 0.49, rel=1e-5)
    assert first_value_loss([0.7] * 4, **same) == pytest.approx(0.5, rel=1e-5)
    # returns of 0 and values of 0: nothing to explain, the plain loss (0)
    assert first_value_loss([0.0] * 4, **same) == 0.0


def test_the_divisor_is_the_larger_of_the_returns_variance_and_the_values_squared_error():
    returns, values = torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    mask = torch.tensor([[True, True], [True, False]])
    variance = torch.tensor([1.0, 2.0, 3.0]).var()  # unbiased, over the mask: 1
    assert value_loss_scale(returns, values, mask) == pytest.approx(float(variance))  # values exact: the variance
    lagging = values - 4.0  # an offset of 4: squared error 16 > 1
    assert value_loss_scale(returns, lagging, mask) == pytest.approx(16.0)
    assert value_loss_scale(torch.zeros(2, 2), torch.zeros(2, 2), mask) == 1.0  # nothing to explain


def fitted_explained_variance(make_vec, updates: int, value_layer: int | None = None, **settings) -> float:
    """Explained variance of a shared-trunk critic, from the default task's SFT policy, on a rollout of 64 episodes
    it was updated on ``updates`` times (Adam, the trainer's learning rate)."""
    torch.manual_seed(0)
    agent = ActorCritic.from_models(POLICY_DIR, value_layer=value_layer)
    env = make_vec(64, autoreset_mode=AutoresetMode.DISABLED)
    rollout = collect_rollout(agent.eval(), env, 1.0, seed=0, generator=torch.Generator().manual_seed(0))
    config = PPOConfig(**settings)
    optimizer = torch.optim.Adam(agent.parameters(), lr=config.learning_rate, eps=1e-5)
    for update in range(updates):
        generator = torch.Generator().manual_seed(update)
        ppo_update(agent.train(), optimizer, rollout, config, 1.0, generator, kl_coef=env.unwrapped.kl_coef)
    _, values = rescore(agent, rollout, [torch.arange(64)], 1.0, None)
    _, returns, mask = rollout_advantages(rollout, values, config, env.unwrapped.kl_coef)
    return explained_variance(values[:, :-1], returns, mask)


def test_a_shared_trunk_critic_fits_the_returns_it_was_trained_on(make_vec):
    # the value head on the actor's trunk, after 3 updates on one rollout. On the last hidden state: with the
    # normalized loss, vf_coef 2 and clip 1 it explains most of that rollout's returns (0.64 when written), with the
    # older defaults (the plain loss, 0.1, 0.2) almost none (0.05). On the middle block (the default) it fits one
    # rollout less closely (0.31) than on the last hidden state, and explains more of the next ones' over a run
    # (docs/design.md; benchmarks/critic_ev.py): still far above the older defaults here.
    last = fitted_explained_variance(make_vec, updates=3, value_layer=2)
    before = fitted_explained_variance(make_vec, updates=3, value_layer=2, **OLD_CRITIC)
    middle = fitted_explained_variance(make_vec, updates=3)
    assert last > 0.45, (last, middle, before)
    assert before < 0.2, (last, middle, before)
    assert middle > before + 0.15, (last, middle, before)


@pytest.mark.parametrize(("family", "layers", "middle"), [("gpt2", 2, 1), ("llama", 3, 2), ("qwen3", 4, 2)])
def test_the_value_head_reads_the_middle_block_by_default(family, layers, middle):
    model = tiny_causal_lm(family, num_hidden_layers=layers)
    agent = ActorCritic.from_models(model).eval()
    torch.nn.init.normal_(agent.value_head.weight)  # not 0: values that differ from block to block
    assert agent.value_layer == middle
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 3]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        values = agent(ids, mask, position_ids_from_mask(mask)).values
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    # by hand: the head on the output of block `middle` (hidden_states[0] is the embeddings)
    assert torch.allclose(values, agent.value_head(hidden[middle]).squeeze(-1), atol=1e-6)
    assert not torch.allclose(values, agent.value_head(hidden[-1]).squeeze(-1), atol=1e-3)


def test_the_block_the_head_reads_is_saved_with_it(tmp_path):
    agent = ActorCritic.from_models(POLICY_DIR, value_layer=2)
    agent.save_pretrained(tmp_path / "last")
    assert ActorCritic.from_pretrained(tmp_path / "last").value_layer == 2
    ActorCritic.from_models(POLICY_DIR).save_pretrained(tmp_path / "middle")
    assert ActorCritic.from_pretrained(tmp_path / "middle").value_layer == 1
    # a head saved before it could read another block (no metadata) read the last hidden state
    head = load_file(tmp_path / "middle" / VALUE_HEAD_FILE)
    save_file(head, tmp_path / "middle" / VALUE_HEAD_FILE)
    assert ActorCritic.from_pretrained(tmp_path / "middle").value_layer == 2
    separate = ActorCritic.from_models(POLICY_DIR, share_backbone=False, critic_init=REWARD_MODEL_DIR)
    separate.save_pretrained(tmp_path / "separate")
    assert ActorCritic.from_pretrained(tmp_path / "separate").value_layer is None


@pytest.mark.parametrize("value_layer", [0, 3, -1, 1.0, True, "1"])
def test_a_block_the_trunk_does_not_have_is_refused(value_layer):
    with pytest.raises(
        ValueError, match=r"value_layer=.* is not a block of the policy's trunk, which has 2: pass 1 \.\. 2"
    ):
        ActorCritic.from_models(POLICY_DIR, value_layer=value_layer)


def test_a_separate_critic_takes_no_value_layer():
    with pytest.raises(ValueError, match="separate critic's head reads its own trunk's last hidden state"):
        ActorCritic.from_models(POLICY_DIR, share_backbone=False, critic_init=REWARD_MODEL_DIR, value_layer=1)
    with pytest.raises(ValueError, match="drop --value-layer"):
        RunConfig(share_backbone=False, value_layer=1)
    with pytest.raises(ValueError, match="value_layer"):
        RunConfig(value_layer=0)


@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.parametrize("critic_init", [None, "reward", "policy"])
def test_a_separate_critic_starts_from_the_weights_critic_init_names(critic_init, lora_rank):
    from agents.train import TrainConfig, build_agent

    config = TrainConfig(run=RunConfig(share_backbone=False, critic_init=critic_init, lora_rank=lora_rank))
    critic = build_agent(config, None, torch.device("cpu")).critic.state_dict()
    source = POLICY_DIR if critic_init == "policy" else REWARD_MODEL_DIR  # None: the reward model, same architecture
    other = REWARD_MODEL_DIR if source == POLICY_DIR else POLICY_DIR
    expected, elsewhere = (AutoModel.from_pretrained(d).state_dict() for d in (source, other))
    assert critic.keys() == expected.keys()
    assert all(torch.equal(critic[k], expected[k]) for k in critic)
    assert not all(torch.equal(critic[k], elsewhere[k]) for k in critic)


def test_critic_init_is_refused_where_it_cannot_apply():
    from agents.train import TrainConfig, build_agent
    from textenv import TokenEnvConfig

    with pytest.raises(ValueError, match="add --no-share-backbone or drop --critic-init"):
        RunConfig(critic_init="policy")
    with pytest.raises(ValueError, match="critic_init must be one of"):
        RunConfig(share_backbone=False, critic_init="rm")
    config = TrainConfig(
        env=TokenEnvConfig(task="arithmetic"), run=RunConfig(share_backbone=False, critic_init="reward")
    )
    with pytest.raises(ValueError, match="the task has no reward model.*pass --critic-init policy"):
        build_agent(config, None, torch.device("cpu"))


def test_the_design_docs_critic_tables_agree_with_their_results():
    """docs/design.md's tables of the critic's runs are what benchmarks/critic_ev.py wrote (``--doc-table``)."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("critic_ev", root / "benchmarks" / "critic_ev.py")
    critic_ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(critic_ev)
    report = json.loads((root / "docs" / "results" / "critic_ev.json").read_text())
    text = (root / "docs" / "design.md").read_text()
    for labels in (DESIGN_TABLE, OTHER_SETTINGS):
        for row in critic_ev.doc_rows(report, labels):
            assert row in text, row


DESIGN_TABLE = ["before", "before, separate", "after"]
OTHER_SETTINGS = ["after, seeds 3-4", "loss only", "middle block, Var(returns) only", "middle block, vf_coef 1",
                  "middle block, plain loss, vf_coef 2", "middle block, plain loss, vf_coef 3",
                  "after, separate from the policy", "value head at 3x", "value prior"]  # fmt: skip


def test_a_critic_trunk_from_a_reward_models_directory_shows_no_load_report_and_refuses_missing_weights(tmp_path):
    import logging

    from transformers.utils import logging as hf_logging

    from agents.policy import critic_trunk

    shown = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    logger = hf_logging.get_logger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        critic_trunk(REWARD_MODEL_DIR)  # the directory holds the reward model's head too, which a trunk leaves out
        AutoModel.from_pretrained(REWARD_MODEL_DIR)  # transformers itself reports it
    finally:
        logger.removeHandler(handler)
    assert len(shown) == 1 and "LOAD REPORT" in shown[0] and "score.weight" in shown[0]
    reward_model = tiny_reward_model("gpt2")
    reward_model.save_pretrained(tmp_path / "rm")
    weights = load_file(tmp_path / "rm" / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, tmp_path / "rm" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the checkpoint has no h\.1\.mlp\.c_fc\.weight; a trunk needs all of its"):
        critic_trunk(tmp_path / "rm")


def test_a_critic_trunk_is_refused_from_a_peft_model():
    from agents.lora import add_lora
    from agents.policy import load_policy

    policy = add_lora(load_policy(POLICY_DIR), 4, 16.0, None)
    with pytest.raises(ValueError, match="cannot start from a PEFT model.*pass critic_init= the base model"):
        ActorCritic.from_models(policy, share_backbone=False)
    agent = ActorCritic.from_models(policy, share_backbone=False, critic_init=POLICY_DIR)
    assert agent.critic is not None
