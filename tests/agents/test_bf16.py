"""--precision bf16 in training: the agent's forwards under bf16 autocast on the CPU, fp32 master weights.

1. A rollout and an update under bf16 autocast: the sampler/learner log-prob mismatch stays small (and is not the
   fp32 run's), the critic's values are fp32 arithmetic, the weights and Adam's moments stay fp32; the rollout
   casts the weights once (one autocast context) and steps the env outside autocast.
2. A bf16 run stopped after its first iteration and resumed ends with the same weights to the bit.
3. bf16 where the CPU lacks it is refused before anything loads, by training and by evaluation; --bf16 is
   refused, naming --precision; a run written before --precision resumes with its meaning.

The tests that run bf16 run on every CPU: natively with AVX512-BF16 or AMX, else emulated by torch's kernels (the
``bf16_cpu`` fixture of tests/conftest.py passes textenv's refusal).
"""

import pytest
import torch
from safetensors.torch import load_file

import agents.train
from agents.__main__ import main
from agents.evaluate import EvalConfig, run_evaluation
from agents.policy import ActorCritic, agent_autocast
from agents.ppo import PPOConfig, ppo_update
from agents.rollout import collect_rollout
from agents.train import TrainingStopped, retire_bf16, train
from tests.agents.test_train import logged_rates, schedule_config
from textenv import TokenEnvConfig
from textenv.default_task import POLICY_DIR

needs_bf16 = pytest.mark.usefixtures("bf16_cpu")  # native or emulated bf16 (tests/conftest.py)
CPU = torch.device("cpu")


def rollout_and_update(env, precision: str) -> tuple[ActorCritic, torch.optim.Adam, dict[str, float]]:
    """One rollout and one update of a fresh agent at ``precision``, as the trainer runs them."""
    autocast = agent_autocast(precision, CPU)
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    rollout = collect_rollout(agent, env, 1.0, seed=0, generator=torch.Generator().manual_seed(0), autocast=autocast)
    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5)
    config = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8)
    metrics = ppo_update(
        agent.train(), optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), autocast, kl_coef=0.05
    )
    return agent, optimizer, metrics


@needs_bf16
def test_bf16_keeps_the_mismatch_small_and_the_master_state_fp32(env):
    _, _, fp32 = rollout_and_update(env, "fp32")
    agent, optimizer, bf16 = rollout_and_update(env, "bf16")
    # the cached bf16 sampler and the full-sequence bf16 learner round differently: small, but not fp32's ~0
    assert fp32["mismatch/abs_log_ratio_mean"] < 1e-5 < bf16["mismatch/abs_log_ratio_mean"] < 0.01
    assert bf16["mismatch/abs_log_ratio_max"] < 0.1 and bf16["mismatch/ess"] > 0.999
    assert {p.dtype for p in agent.parameters()} == {torch.float32}
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    assert moments and {t.dtype for t in moments} == {torch.float32}


@needs_bf16
def test_the_rollout_samples_under_autocast_and_steps_the_env_outside_it(env, monkeypatch):
    """The policy's forwards run in one bf16 autocast context, which casts each weight once a rollout; the env's
    frozen models at the env's own precision, as its uncached recomputation does (tests/textenv/test_bf16.py)."""
    seen = {"policy": set(), "env": set()}
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    hook = agent.policy.register_forward_pre_hook(lambda *_: seen["policy"].add(torch.is_autocast_enabled("cpu")))
    step = env.step
    monkeypatch.setattr(env, "step", lambda *a, **k: seen["env"].add(torch.is_autocast_enabled("cpu")) or step(*a, **k))
    clear = torch.clear_autocast_cache
    cleared = []  # autocast drops its cast weights when the outermost context exits: once a rollout, not a step
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: cleared.append(1) or clear())
    autocast = agent_autocast("bf16", CPU)
    try:
        collect_rollout(agent, env, 1.0, seed=0, generator=torch.Generator().manual_seed(0), autocast=autocast)
    finally:
        hook.remove()
    assert seen == {"policy": {True}, "env": {False}}
    assert len(cleared) == 1
    assert not torch.is_autocast_enabled("cpu")  # and left as it was


@needs_bf16
def test_the_value_head_runs_in_fp32_under_bf16_autocast():
    """Under autocast a linear layer's output is bf16: every value would then be a bf16 number."""
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    torch.nn.init.normal_(agent.value_head.weight, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(3, 11)[None]
    with torch.no_grad(), agent_autocast("bf16", CPU):
        values = agent(ids, torch.ones_like(ids), torch.arange(8)[None]).values
    assert values.dtype == torch.float32
    assert not torch.equal(values, values.bfloat16().float())


@needs_bf16
def test_a_bf16_run_resumed_after_its_first_iteration_ends_with_the_same_weights(tmp_path, monkeypatch):
    def bf16_config(run_dir):
        config = schedule_config(run_dir, iterations=3)
        config.env.precision = "bf16"
        return config

    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    train(bf16_config(straight_dir))
    with monkeypatch.context() as patch:  # as SIGTERM during iteration 0 does
        patch.setattr(agents.train.StopSignals, "requested", lambda self, dist: True)
        patch.setattr(agents.train.StopSignals, "signal_name", property(lambda self: "SIGTERM"))
        with pytest.raises(TrainingStopped):
            train(bf16_config(stopped_dir))
    resumed = bf16_config(stopped_dir)
    resumed.run.resume = True
    train(resumed)
    assert logged_rates(stopped_dir) == logged_rates(straight_dir)
    straight = load_file(straight_dir / "final" / "model.safetensors")
    final = load_file(stopped_dir / "final" / "model.safetensors")
    assert straight.keys() == final.keys() and {t.dtype for t in final.values()} == {torch.float32}
    assert all(torch.equal(final[key], straight[key]) for key in straight), "the resumed bf16 run diverged"


def test_bf16_is_refused_before_loading_where_the_cpu_lacks_it(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    config = schedule_config(tmp_path / "run", iterations=1)
    config.env.precision, config.run.device = "bf16", "cpu"
    with pytest.raises(ValueError, match=r"precision 'bf16' \(--precision bf16\)"):
        train(config)
    assert not (tmp_path / "run").exists()
    evaluation = EvalConfig(env=TokenEnvConfig(split="eval", precision="bf16"), device="cpu")
    with pytest.raises(ValueError, match=r"precision 'bf16' \(--precision bf16\)"):
        run_evaluation(evaluation, progress=False)


@pytest.mark.parametrize("flag", ["--bf16", "--no-bf16"])
def test_the_bf16_flag_is_refused_naming_precision(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([flag, "--run-dir", "unused"])
    assert exit_info.value.code == 2
    assert f"error: {flag} was replaced by --precision bf16|fp32" in capsys.readouterr().err


@pytest.mark.parametrize(("bf16", "precision"), [(True, None), (False, "fp32")])
def test_a_run_written_with_bf16_resumes_at_the_precision_it_meant(bf16, precision):
    """run.bf16 true was bf16 autocast on CUDA and fp32 elsewhere: precision's default; false was fp32."""
    data = {"env": {"task": "reviews"}, "run": {"bf16": bf16, "seed": 0}}
    retire_bf16(data)
    assert data == {"env": {"task": "reviews", "precision": precision}, "run": {"seed": 0}}
