"""LoRA through PEFT: only adapters train, the reference is the base with adapters off, the result loads with PEFT."""

import json

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import textenv  # noqa: F401
from agents.lora import AdaptersDisabled, add_lora
from agents.policy import ActorCritic
from agents.ppo import PPOConfig, ppo_update
from agents.rollout import collect_rollout
from agents.train import TrainConfig, train
from textenv.default_task import POLICY_DIR


def lora_agent() -> ActorCritic:
    torch.manual_seed(0)
    return ActorCritic.from_models(add_lora(AutoModelForCausalLM.from_pretrained(POLICY_DIR), rank=4, alpha=8))


def test_update_changes_only_adapters_and_value_head_and_reference_is_the_base(make_vec):
    agent = lora_agent()
    reference = AdaptersDisabled(agent.policy)
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    env = make_vec(
        8, autoreset_mode=AutoresetMode.DISABLED, reference_model=reference, tokenizer=tokenizer, max_new_tokens=10
    )
    assert any(p.requires_grad for p in agent.parameters())  # the env's freezing left the adapters trainable
    before = {name: p.detach().clone() for name, p in agent.named_parameters()}
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-2, eps=1e-5)
    for iteration in range(2):
        rollout = collect_rollout(agent.eval(), env, 1.0, iteration, torch.Generator().manual_seed(iteration))
        config = PPOConfig(epochs=1, minibatch_size=4, micro_batch_size=4)
        ppo_update(
            agent.train(), optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), kl_coef=env.kl_coef
        )
    changed = {name for name, p in agent.named_parameters() if not torch.equal(p, before[name])}
    adapters = {name for name in before if "lora_" in name}
    assert changed == adapters | {"value_head.weight", "value_head.bias"}
    lora_b = [p for name, p in agent.named_parameters() if "lora_B" in name]
    assert all(p.abs().sum() > 0 for p in lora_b)  # adapters moved away from their zero start

    # the reference (adapters off) is exactly the untouched base model; the policy is not
    base = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    ids = rollout.input_ids[:3]
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, base(input_ids=ids).logits)
        assert not torch.allclose(agent.policy(input_ids=ids).logits, base(input_ids=ids).logits)
    # and the env's reference log-probs are the base model's
    observation, _ = env.reset(seed=5, options={"prompt_index": 3})
    _, _, _, _, info = env.step(np.full(8, 10))
    prompt = observation["input_ids"][0][observation["attention_mask"][0] == 1].tolist()
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([prompt])).logits[0, -1]
    assert np.isclose(info["ref_logprob"][0], torch.log_softmax(logits, -1)[10].item(), atol=1e-5)


def test_lora_training_run_saves_adapters_that_load_with_peft(tmp_path):
    config = TrainConfig()
    config.run.iterations, config.run.batch_size, config.run.eval_every, config.run.eval_episodes = 2, 8, 2, 8
    config.run.run_dir, config.run.progress, config.run.lora_rank = tmp_path / "run", False, 4
    config.ppo.minibatch_size = config.ppo.micro_batch_size = 8
    config.env.max_new_tokens = 8
    final = train(config)
    assert (final / "adapter_config.json").is_file()
    assert not (final / "model.safetensors").exists()  # adapters only: no second copy of the base
    loaded = AutoPeftModelForCausalLM.from_pretrained(final)
    assert isinstance(loaded, PeftModel)
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(POLICY_DIR), final)
    agent = ActorCritic.from_pretrained(final)  # what --resume loads
    ids = torch.tensor([[44, 146, 50, 364]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, again(input_ids=ids).logits)
        torch.testing.assert_close(loaded(input_ids=ids).logits, agent.policy(input_ids=ids).logits)


def test_a_lora_run_from_a_relative_policy_path_loads_from_anywhere(tmp_path, monkeypatch):
    """The adapters name their base by absolute path, so ``final/`` loads from any working directory."""
    import shutil

    shutil.copytree(POLICY_DIR, tmp_path / "work" / "sft")
    monkeypatch.chdir(tmp_path / "work")
    config = TrainConfig()
    config.run.iterations, config.run.batch_size, config.run.eval_every, config.run.eval_episodes = 1, 8, 1, 8
    config.run.run_dir, config.run.progress, config.run.lora_rank = tmp_path / "run", False, 4
    config.run.policy = "sft"  # relative to the launch directory
    config.ppo.minibatch_size = config.ppo.micro_batch_size = 8
    config.env.max_new_tokens = 4
    final = train(config)
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((tmp_path / "work" / "sft").resolve())
    monkeypatch.chdir(tmp_path)
    assert isinstance(AutoPeftModelForCausalLM.from_pretrained(final), PeftModel)
