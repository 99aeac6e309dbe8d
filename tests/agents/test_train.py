"""agents/train.py: what the trainer refuses to import or trust, how a run fails and goes on, what it builds.

1. ``--resume`` imports nothing that config.json names unless the command line names it again or passes
   ``--trust-run-config``; code inside the run directory and standard-library callables are never imported.
   Each payload below writes a marker file when it runs: the tests assert that the marker never appears.
2. Resume robustness: another name for the run directory, settings added or unknown, functions recorded by a
   stable name (a callable object is refused at start).
3. ``textenv-train`` (a console script) imports ``--reward-fn mod:f`` from the working folder as ``python -m`` does.
4. A reward function or an interaction that raises mid-run: the message names it, the last completed iteration is
   in a checkpoint (written if ``--checkpoint-every`` skipped it), ``--resume`` goes on to the weights of an
   uninterrupted run; at iteration 0 a run directory the run made is removed.
5. ``--kl-penalty loss`` takes k3 unless told, and refuses k1.
6. The learning-rate schedule of a run and of a resumed one: a function of the iteration and the settings in force.
7. What the trainer builds: its fused Adam steps as the per-tensor loop does; ``samples.jsonl`` shows the prompt the
   policy saw; the eval env scores with the reward model's own tokenizer, as the training env does.

The command line runs in-process (``agents.__main__.main(argv)``): refusals are ``SystemExit`` with a message on
stderr. Every run is tiny (batch 4 or 8, responses of 4 tokens, one torch thread).
"""

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

import agents.train
from agents.__main__ import main
from agents.policy import ActorCritic
from agents.ppo import PPOConfig
from agents.train import TrainConfig, Trainer, TrainingStopped, cli, learning_rate, train
from tests.models import character_tokenizer
from textenv import TokenEnvConfig
from textenv.default_task import POLICY_DIR
from textenv.reward_fns import describe
from textenv.scorers import TextScorer

TINY = [
    "--iterations", "1", "--batch-size", "4", "--minibatch-size", "4", "--micro-batch-size", "4", "--epochs", "1",
    "--eval-every", "10", "--eval-episodes", "4", "--max-new-tokens", "4", "--no-progress", "--threads", "1",
]  # fmt: skip


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder, first on sys.path as under ``python -m``; sys.path and planted modules restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:  # only the modules of this folder: libraries stay imported
        module = sys.modules[name]
        places = [getattr(module, "__file__", None) or "", *list(getattr(module, "__path__", None) or [])]
        if any(Path(place).is_relative_to(tmp_path) for place in places if place):
            del sys.modules[name]


def plant(path: Path, marker: Path) -> None:
    """A module that writes ``marker`` when it is imported and when its ``fn`` or ``Interaction`` runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        def fn(**kwargs):
            pathlib.Path({str(marker)!r}).write_text("called")
            return 0.0
        s = fn
        class Interaction:
            def respond(self, turn):
                pathlib.Path({str(marker)!r}).write_text("called")
        """)
    )


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def refused(argv, capsys, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    return " ".join(capsys.readouterr().err.split())


def edit_config(run_dir: Path, change) -> None:
    data = json.loads((run_dir / "config.json").read_text())
    change(data)
    (run_dir / "config.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 1-iteration run of the default task, copied by the tests that edit it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    main(["--run-dir", str(run_dir), *TINY])
    return run_dir


def copy_run(finished_run, target: Path) -> Path:
    shutil.copytree(finished_run, target)
    return target


# --------------------------------------------------------------------------- 1. no code from a run directory
def test_resume_does_not_import_what_config_json_names(finished_run, workdir, capsys):
    run_dir = copy_run(finished_run, workdir / "run")
    marker, module = workdir / "MARKER", unique("payload")
    plant(workdir / f"{module}.py", marker)
    edit_config(run_dir, lambda d: d["env"].update(reward_fns=[f"{module}:fn"]))
    err = refused(["--run-dir", str(run_dir), "--resume", "--iterations", "2"], capsys)
    assert f"names code that resuming would import (and so run): reward function '{module}:fn'" in err
    assert f"add --reward-fn {module}:fn to the command if you trust it, or --trust-run-config" in err
    assert not marker.exists() and module not in sys.modules


def test_resume_does_not_import_this_s(finished_run, workdir, capsys):
    """The reported payload: config.json edited to name ``this:s`` (importing ``this`` prints the Zen of Python)."""
    run_dir = copy_run(finished_run, workdir / "run")
    edit_config(run_dir, lambda d: d["env"].update(reward_fns=["this:s"]))
    imported_before = "this" in sys.modules
    err = refused(["--run-dir", str(run_dir), "--resume", "--iterations", "2"], capsys)
    assert "reward function 'this:s'" in err and "--trust-run-config" in err
    err = refused(["--run-dir", str(run_dir), "--resume", "--iterations", "2", "--trust-run-config"], capsys)
    assert "reward function 'this:s' names Python's standard library (module 'this')" in err
    assert ("this" in sys.modules) == imported_before
    assert "Beautiful is better than ugly" not in capsys.readouterr().out


@pytest.mark.parametrize("how", ["plain", "trusted", "named again"])
def test_a_module_planted_in_the_run_directory_never_runs(finished_run, workdir, capsys, how):
    """The default layout: the run in runs/ppo under the working folder, a module planted there, named as
    runs.ppo.evil:fn (importable as a namespace package from the working folder)."""
    run_dir = copy_run(finished_run, workdir / "runs" / "ppo")
    edit_config(run_dir, lambda d: d["run"].update(run_dir="runs/ppo"))
    marker = workdir / "MARKER"
    plant(run_dir / "evil.py", marker)
    edit_config(run_dir, lambda d: d["env"].update(reward_fns=["runs.ppo.evil:fn"]))
    argv = ["--run-dir", "runs/ppo", "--resume", "--iterations", "2"]
    argv += {"plain": [], "trusted": ["--trust-run-config"], "named again": ["--reward-fn", "runs.ppo.evil:fn"]}[how]
    err = refused(argv, capsys)
    if how == "plain":
        assert "names code that resuming would import" in err
    else:
        assert f"would be imported from inside {run_dir.resolve()} (found at {(run_dir / 'evil.py').resolve()})" in err
        assert "code is never imported from there" in err
    assert not marker.exists()
    assert not any(name == "runs" or name.startswith("runs.") for name in sys.modules)


def test_a_module_in_the_run_directory_is_refused_for_a_new_run_too(workdir, capsys):
    run_dir, marker = workdir / "runs" / "mine", workdir / "MARKER"
    plant(run_dir / "helper.py", marker)
    err = refused(
        ["--run-dir", "runs/mine", "--allow-existing-run-dir", "--reward-fn", "runs.mine.helper:fn", *TINY], capsys
    )
    assert "would be imported from inside" in err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("flag", "spec"),
    [
        ("--reward-fn", "os:system"),
        ("--reward-fn", "subprocess:run"),
        ("--reward-fn", "builtins:eval"),
        ("--step-reward-fn", "os:system"),
        ("--interaction", "subprocess:Popen"),
    ],
)
def test_standard_library_callables_are_refused_before_import(workdir, capsys, monkeypatch, flag, spec):
    marker = workdir / "MARKER"
    monkeypatch.setattr(os, "system", lambda *a, **k: marker.write_text("called"))
    err = refused(["--run-dir", str(workdir / "run"), flag, spec, *TINY], capsys)
    assert f"'{spec}' names Python's standard library (module '{spec.split(':')[0]}')" in err
    assert "pass module:function of a module you wrote" in err
    assert not marker.exists() and not (workdir / "run").exists()


def test_a_standard_library_callable_under_another_name_is_refused(workdir, capsys):
    module = unique("reexport")
    (workdir / f"{module}.py").write_text("from os import system\nfrom builtins import eval as score\n")
    for name, origin in (("system", "posix"), ("score", "builtins")):
        err = refused(["--run-dir", str(workdir / "run"), "--reward-fn", f"{module}:{name}", *TINY], capsys)
        assert f"reward function '{module}:{name}' is a built-in callable ({origin}), not one of yours" in err


def test_resume_imports_what_the_command_names_again_or_trusts(workdir, capsys):
    module = unique("rewards")
    (workdir / f"{module}.py").write_text("def short(response, **kwargs):\n    return -len(response) / 10\n")
    run = ["--run-dir", "run", "--no-progress"]
    main([*run, "--reward-fn", f"{module}:short", *TINY])
    err = refused([*run, "--resume", "--iterations", "2"], capsys)
    assert f"add --reward-fn {module}:short" in err
    main([*run, "--resume", "--iterations", "2", "--reward-fn", f"{module}:short"])
    main([*run, "--resume", "--iterations", "3", "--trust-run-config"])
    assert "final policy:" in capsys.readouterr().out
    err = refused([*run, "--resume", "--iterations", "4"], capsys)  # the trust of one command is not kept
    assert f"add --reward-fn {module}:short" in err
    err = refused([*run, "--resume", "--iterations", "4", "--reward-fn", f"{module}:other"], capsys)
    assert f"reward_fns: ['{module}:short'] -> ['{module}:other']" in err  # compared before the import


# --------------------------------------------------------------------------- 2. resume robustness
def test_resume_accepts_the_run_directory_under_another_name(workdir, capsys):
    main(["--run-dir", "runs/a", *TINY])
    main(["--run-dir", str(workdir / "runs" / "a"), "--resume", "--iterations", "2", "--no-progress"])
    main(["--run-dir", "runs/../runs/a/", "--resume", "--iterations", "3", "--no-progress"])
    shutil.move(workdir / "runs" / "a", workdir / "moved")
    main(["--run-dir", "moved", "--resume", "--iterations", "4", "--no-progress"])
    assert capsys.readouterr().out.count("final policy:") == 4


def test_a_setting_config_json_lacks_takes_its_default_with_a_note(finished_run, workdir, capsys):
    run_dir = copy_run(finished_run, workdir / "run")
    edit_config(run_dir, lambda d: (d["run"].pop("max_skipped_updates"), d["run"].pop("trust_run_config")))
    main(["--run-dir", str(run_dir), "--resume", "--iterations", "2", "--no-progress"])
    err = " ".join(capsys.readouterr().err.split())
    assert "has no run.max_skipped_updates = 3, run.trust_run_config = False (settings added since" in err
    assert "the resumed run takes these defaults" in err
    assert json.loads((run_dir / "config.json").read_text())["run"]["max_skipped_updates"] == 3


def test_a_setting_this_version_does_not_know_is_named(finished_run, workdir, capsys):
    run_dir = copy_run(finished_run, workdir / "run")
    edit_config(run_dir, lambda d: (d["env"].update(future_knob=1), d.update(extra={"x": 1})))
    err = refused(["--run-dir", str(run_dir), "--resume", "--iterations", "2"], capsys)
    assert "holds settings this version of textenv does not know: env.future_knob, extra" in err
    assert "Traceback" not in err


def scaled_length(response, scale, **kwargs):
    return scale * len(response)


class Scorer:
    def __call__(self, response, **kwargs):
        return 0.0


def tiny_config(run_dir, **env) -> TrainConfig:
    config = TrainConfig()
    config.run.iterations, config.run.batch_size, config.run.eval_every, config.run.eval_episodes = 1, 4, 10, 4
    config.run.run_dir, config.run.progress, config.run.threads = run_dir, False, 1
    config.ppo.minibatch_size = config.ppo.micro_batch_size = 4
    config.ppo.epochs = 1
    config.env.max_new_tokens = 4
    for key, value in env.items():
        setattr(config.env, key, value)
    return config


def test_functions_are_recorded_by_a_stable_name_and_a_callable_object_is_refused_at_start(tmp_path):
    fn = functools.partial(scaled_length, scale=0.1)
    assert describe(fn) == f"functools.partial({__name__}:scaled_length, scale=0.1)"
    train(tiny_config(tmp_path / "run", reward_fns=[fn]))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["env"]["reward_fns"]
    assert saved == [describe(fn)]
    resumed = tiny_config(tmp_path / "run", reward_fns=[functools.partial(scaled_length, scale=0.1)])
    resumed.run.iterations, resumed.run.resume = 2, True
    train(resumed)  # a partial made again in another process is the same setting

    with pytest.raises(ValueError, match=r"would be recorded in config.json as '<.*Scorer object at 0x.*memory addr"):
        train(tiny_config(tmp_path / "other", reward_fns=[Scorer()]))
    assert not (tmp_path / "other").exists()


# --------------------------------------------------------------------------- 3. the console script
def test_the_command_imports_a_reward_module_from_the_working_folder(workdir, monkeypatch, capsys):
    """A console script's sys.path holds its own folder, not the working one; main() puts the working one first."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(workdir))])
    module = unique("local_rewards")
    (workdir / f"{module}.py").write_text("def brief(response, **kwargs):\n    return -len(response) / 10\n")
    main(["--run-dir", "run", "--reward-fn", f"{module}:brief", *TINY])
    assert "final policy:" in capsys.readouterr().out


@pytest.mark.slow
def test_textenv_train_imports_a_reward_module_from_the_working_folder(tmp_path):
    script = Path(sys.executable).with_name("textenv-train")
    if not script.exists():
        pytest.skip("textenv-train is not installed beside this interpreter")
    (tmp_path / "my_rewards.py").write_text("import pathlib\npathlib.Path('IMPORTED').write_text('yes')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [str(script), "--reward-fn", "my_rewards:missing", "--run-dir", "run"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "'my_rewards' has no attribute 'missing'" in done.stderr  # found and imported: only the name is wrong
    assert (tmp_path / "IMPORTED").exists() and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 4. failures mid-run
def flaky_module(workdir: Path, fail_after: int) -> str:
    """A reward module whose ``fn`` raises from its call ``fail_after + 1`` on (``FAIL_AFTER = None``: never)."""
    module = unique("flaky")
    (workdir / f"{module}.py").write_text(
        textwrap.dedent(f"""
        FAIL_AFTER = {fail_after}
        calls = 0
        def fn(response, **kwargs):
            global calls
            calls += 1
            if FAIL_AFTER is not None and calls > FAIL_AFTER:
                raise ConnectionError("the grader is down")
            return -len(response) / 10
        """)
    )
    return module


def test_a_reward_function_that_raises_mid_run_is_named_and_the_run_goes_on(workdir, capsys):
    # iteration 0: 4 eval episodes and 4 rollout episodes, each scored once; iteration 1's rollout fails
    module = flaky_module(workdir, fail_after=8)
    argv = ["--run-dir", "run", "--reward-fn", f"{module}:fn", *TINY, "--iterations", "3"]
    err = refused(argv, capsys, code=1)
    assert "iteration 1 failed: reward function 'fn' raised ConnectionError: the grader is down" in err
    assert f"the grader is down (at {workdir / module}.py:8). The checkpoint" in err
    assert (
        "The checkpoint run/checkpoint-000000 holds iteration 0: fix the cause and continue with --run-dir run --resume"
        in err
    )
    assert "Traceback" not in err
    sys.modules[module].FAIL_AFTER = None
    main(["--run-dir", "run", "--resume", "--reward-fn", f"{module}:fn"])
    rows = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["iteration"] for r in rows if "env/score" in r}) == [0, 1, 2]


def test_a_failure_between_checkpoints_writes_the_last_iteration_and_resumes_to_the_same_weights(workdir, capsys):
    """--checkpoint-every 10: iteration 1 would have no checkpoint; the failure in iteration 2 writes it (the
    generators as they were before iteration 2), and the resumed run ends with an uninterrupted run's weights."""
    steady = flaky_module(workdir, fail_after=10**9)
    main(
        ["--run-dir", "straight", "--reward-fn", f"{steady}:fn", *TINY, "--iterations", "3", "--checkpoint-every", "10"]
    )
    module = flaky_module(workdir, fail_after=12)  # iteration 0: 4 + 4 calls, iteration 1: 4, iteration 2 fails
    argv = ["--run-dir", "run", "--reward-fn", f"{module}:fn", *TINY, "--iterations", "3", "--checkpoint-every", "10"]
    err = refused(argv, capsys, code=1)
    assert "iteration 2 failed" in err and "checkpoint run/checkpoint-000001 holds iteration 1" in err
    sys.modules[module].FAIL_AFTER = None
    main(["--run-dir", "run", "--resume", "--reward-fn", f"{module}:fn"])
    straight = load_file(workdir / "straight" / "final" / "model.safetensors")
    resumed = load_file(workdir / "run" / "final" / "model.safetensors")
    assert all(torch.equal(resumed[key], straight[key]) for key in straight), "the resumed run diverged"


def test_a_failure_in_the_first_iteration_leaves_no_run_directory(workdir, capsys):
    module = flaky_module(workdir, fail_after=2)
    err = refused(["--run-dir", "run", "--reward-fn", f"{module}:fn", *TINY], capsys, code=1)
    assert "iteration 0 failed: reward function 'fn' raised ConnectionError" in err
    assert "No iteration completed, so run was removed: fix the cause and start the run again" in err
    assert not (workdir / "run").exists()


def test_an_interaction_that_raises_is_named(workdir, capsys):
    module = unique("broken_tool")
    (workdir / f"{module}.py").write_text(
        textwrap.dedent("""
        class Calculator:
            def respond(self, turn):
                raise RuntimeError("the calculator service is down")
        """)
    )
    argv = ["--run-dir", "run", "--task", "calculator", "--interaction", f"{module}:Calculator", *TINY]
    err = refused(argv, capsys, code=1)
    assert "iteration 0 failed: Calculator.respond raised RuntimeError: the calculator service is down" in err
    assert f"(at {workdir / module}.py:4)" in err
    assert not (workdir / "run").exists()


# --------------------------------------------------------------------------- 5. the KL as a loss term
def test_kl_penalty_loss_takes_k3_and_refuses_k1(tmp_path, capsys):
    assert PPOConfig(kl_penalty="loss").kl_estimator == "k3" and PPOConfig().kl_estimator == "k1"
    config = cli(["--kl-penalty", "loss", "--run-dir", str(tmp_path / "run")])
    assert config.ppo.kl_estimator == "k3"
    assert "note: --kl-penalty loss uses --kl-estimator k3 (k1's gradient as a loss term" in capsys.readouterr().err
    assert cli(["--kl-penalty", "loss", "--kl-estimator", "k2"]).ppo.kl_estimator == "k2"
    assert "note" not in capsys.readouterr().err
    err = refused(["--kl-penalty", "loss", "--kl-estimator", "k1", "--run-dir", str(tmp_path / "run")], capsys)
    assert "kl_estimator 'k1' with kl_penalty 'loss' would apply no KL" in err and "Use 'k3'" in err
    with pytest.raises(ValueError, match="would apply no KL"):
        PPOConfig(kl_penalty="loss", kl_estimator="k1")


# --------------------------------------------------------------------------- 6. the schedule
def schedule_config(run_dir, iterations: int) -> TrainConfig:
    config = TrainConfig()
    config.run.iterations, config.run.batch_size, config.run.eval_every, config.run.eval_episodes = iterations, 8, 10, 8
    config.run.run_dir, config.run.progress, config.run.threads = run_dir, False, 1
    config.ppo.minibatch_size = config.ppo.micro_batch_size = 8
    config.ppo.epochs = 1
    config.env.max_new_tokens = 4
    return config


def logged_rates(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["iteration"]: row["perf/lr"] for row in rows if "perf/lr" in row}


def test_the_rate_decays_linearly_to_zero_at_the_last_iteration():
    config = schedule_config("unused", iterations=4)
    rate = config.ppo.learning_rate
    assert [learning_rate(config, i) for i in range(5)] == [rate, rate * 0.75, rate * 0.5, rate * 0.25, 0.0]
    config.run.iterations = 8  # what a resumed run with --iterations 8 does from its next iteration on
    assert learning_rate(config, 4) == rate * 0.5


def test_a_resumed_run_with_more_iterations_follows_the_new_schedule(tmp_path):
    run_dir = tmp_path / "run"
    train(schedule_config(run_dir, iterations=2))
    longer = schedule_config(run_dir, iterations=4)
    longer.run.resume = True
    train(longer)
    rate = longer.ppo.learning_rate
    # iterations 0-1 ran under --iterations 2, the resumed 2-3 under --iterations 4 (the first resumed one
    # included: it does not keep the rate the checkpoint's optimizer held, 0 at the end of the first schedule)
    assert logged_rates(run_dir) == {0: rate, 1: rate * 0.5, 2: rate * 0.5, 3: rate * 0.25}


@pytest.mark.parametrize("value_lr_scale", [1.0, 3.0])  # 3: two Adam groups, each with its rate, resumed
def test_a_resumed_run_with_the_same_iterations_ends_with_the_same_weights(tmp_path, monkeypatch, value_lr_scale):
    def configured(run_dir):
        config = schedule_config(run_dir, iterations=3)
        config.ppo.value_lr_scale = value_lr_scale
        return config

    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    train(configured(straight_dir))

    def stop_after_the_first_iteration(self, dist):  # as Ctrl-C during iteration 0 does
        return True

    with monkeypatch.context() as patch:
        patch.setattr(agents.train.StopSignals, "requested", stop_after_the_first_iteration)
        patch.setattr(agents.train.StopSignals, "signal_name", property(lambda self: "SIGTERM"))
        with pytest.raises(TrainingStopped):
            train(configured(stopped_dir))
    assert sorted(logged_rates(stopped_dir)) == [0]
    resumed = configured(stopped_dir)
    resumed.run.resume = True
    train(resumed)
    assert logged_rates(stopped_dir) == logged_rates(straight_dir)
    straight = load_file(straight_dir / "final" / "model.safetensors")
    final = load_file(stopped_dir / "final" / "model.safetensors")
    assert straight.keys() == final.keys()
    assert all(torch.equal(final[key], straight[key]) for key in straight), "the resumed run diverged"
    heads = [load_file(run / "final" / "value_head.safetensors") for run in (straight_dir, stopped_dir)]
    assert all(torch.equal(heads[0][key], heads[1][key]) for key in heads[0]), "the resumed value head diverged"


# --------------------------------------------------------------------------- 7. what it builds
def test_fused_adam_steps_as_the_per_tensor_loop_does():
    """The trainer's ``Adam(fused=True)``: one kernel over every parameter, the same update to float rounding."""
    agent = ActorCritic.from_models(POLICY_DIR)
    start = [p.detach().clone() for p in agent.parameters()]
    generator = torch.Generator().manual_seed(0)
    gradients = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(3)]
    weights = []
    for options in ({"fused": True}, {"foreach": False}):
        model = copy.deepcopy(agent)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, eps=1e-5, **options)
        for step in gradients:
            for parameter, gradient in zip(model.parameters(), step):
                parameter.grad = gradient.clone()
            optimizer.step()
        weights.append([p.detach() for p in model.parameters()])
    moved = max(float((p - q).abs().max()) for p, q in zip(weights[0], start))
    apart = max(float((p - q).abs().max()) for p, q in zip(*weights))
    assert moved > 5e-4 and apart <= 1e-4 * moved, (moved, apart)  # apart by a rounding of the weights (1.5e-8)


def test_samples_show_the_prompt_the_policy_saw(tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    long = "The film opened with a long and slow shot of the sea, and then the actors"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{long}\n{long} were\n{long} said\n{long} felt\n")
    flags = ["--prompts", str(prompts), "--eval-prompts", str(prompts), "--prompt-truncation", "left"]
    main(["--run-dir", str(tmp_path / "run"), *flags, "--max-prompt-tokens", "4", *TINY])
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples
    for sample in samples:
        kept = tokenizer(sample["prompt_text"])["input_ids"][-4:]
        assert sample["prompt"] == tokenizer.decode(kept) and sample["prompt_text"].startswith(long)


def test_the_eval_env_scores_with_the_reward_models_own_tokenizer(tmp_path):
    tokenizer = character_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=16, n_layer=1, n_head=2, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "char_rm")
    tokenizer.save_pretrained(tmp_path / "char_rm")

    train = TrainConfig()
    train.env.reward_model, train.env.max_new_tokens = str(tmp_path / "char_rm"), 4
    train.run.run_dir, train.run.progress, train.run.device, train.run.threads = tmp_path / "run", False, "cpu", 1
    train.run.batch_size, train.run.eval_episodes = 16, 4
    trainer = Trainer(train)
    try:
        assert isinstance(trainer.env.unwrapped.core.scorer, TextScorer)
        assert isinstance(trainer.eval_env.unwrapped.core.scorer, TextScorer)  # not the policy's token ids
        trainer.evaluate(0)
    finally:
        trainer.logger.close()
    shutil.rmtree(tmp_path / "run")


def test_samples_carry_each_tokens_numbers_for_the_viewer(multi_turn_rollout_and_agent, tmp_path):
    """A samples row holds every token after the prompt with its step numbers (None on the environment's tokens),
    which ``python -m agents.viewer`` reads as a per-token episode."""
    from agents.train import logged_samples
    from agents.viewer import page_data

    rollout, _ = multi_turn_rollout_and_agent
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    samples = logged_samples(rollout, tokenizer, count=8)
    assert any(any(sample["env"]) for sample in samples)  # replies are in the rows, marked
    for row, sample in enumerate(samples):
        n = len(sample["tokens"])
        assert all(len(sample[key]) == n for key in ("env", "logprob", "ref_logprob", "kl", "reward"))
        steps = rollout.mask[row, :n]
        assert int(steps.sum()) == int(rollout.mask[row].sum())  # every agent step is in the row
        for t in range(n):
            if steps[t]:
                assert sample["logprob"][t] == float(rollout.logprobs[row, t]) and not sample["env"][t]
            else:
                assert sample["logprob"][t] is None and sample["reward"][t] is None and sample["env"][t]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    episodes = page_data([path])["episodes"]
    assert [len(episode["tokens"]) for episode in episodes] == [len(sample["tokens"]) for sample in samples]


def test_code_given_from_python_as_one_callable_or_object_is_checked_without_error():
    """``reward_fns`` may be one callable and ``interaction`` an object: only text names are checked as code names."""
    from agents.train import code_names
    from textenv.turns import SingleTurn

    def length(response_ids, **kwargs):
        return float(len(response_ids))

    config = TrainConfig(env=TokenEnvConfig(reward_fns=length, interaction=SingleTurn()))
    config.validate()
    assert code_names(config.env) == []
    named = TokenEnvConfig(reward_fns={"a": "mod:a", "b": length}, step_reward_fn="mod:step", interaction="mod:Talk")
    assert code_names(named) == [
        ("reward function", "mod:a"),
        ("step_reward_fn", "mod:step"),
        ("interaction", "mod:Talk"),
    ]


def test_the_value_heads_learning_rate_is_value_lr_scale_times_the_trunks(tmp_path):
    """One Adam step (tiny_config: one minibatch, one epoch) from a zero head moves each of the head's weights by
    about the learning rate, so the step at value_lr_scale 3 is 3 times the step at 1; the trunk's step is the same."""
    heads, trunks = {}, {}
    for scale in (1.0, 3.0):
        config = tiny_config(tmp_path / f"run{scale}")
        config.ppo.value_lr_scale = scale
        train(config)
        heads[scale] = load_file(tmp_path / f"run{scale}" / "final" / "value_head.safetensors")
        trunks[scale] = load_file(tmp_path / f"run{scale}" / "final" / "model.safetensors")
    assert heads[1.0]["weight"].abs().max() > 0  # the step moved the head
    for name in ("weight", "bias"):
        torch.testing.assert_close(heads[3.0][name], 3 * heads[1.0][name], rtol=1e-5, atol=1e-9)
    assert trunks[1.0].keys() == trunks[3.0].keys()
    assert all(torch.equal(trunks[1.0][k], trunks[3.0][k]) for k in trunks[1.0])
    with pytest.raises(ValueError, match="value_lr_scale must be > 0"):
        PPOConfig(value_lr_scale=0.0)


def test_an_iteration_leaves_no_gradients_for_the_next_rollout_to_carry(tmp_path):
    config = tiny_config(tmp_path / "run")
    trainer = Trainer(config)
    try:
        metrics, _ = trainer.iterate(1)  # no evaluation at iteration 1
    finally:
        trainer.logger.close()
    assert metrics["ppo/steps"] >= 1 and metrics["ppo/skipped_steps"] == 0  # a step was taken, with gradients
    assert all(p.grad is None for p in trainer.agent.parameters())
