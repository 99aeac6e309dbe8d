"""Checkpoints: no code runs from a planted pickle, paths stay in the run, damage is named and survived."""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from agents.checkpoint import CheckpointError, Checkpoints, TrainerState


class TinyAgent(torch.nn.Module):
    """What a checkpoint needs of an agent: parameters and ``save_pretrained``."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((3,), value))

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        save_file({"weight": self.weight.detach()}, os.path.join(directory, "model.safetensors"))


def save(checkpoints: Checkpoints, iteration: int, agent=None) -> None:
    agent = agent or TinyAgent(float(iteration))
    generators = [[torch.Generator().get_state(), torch.Generator().get_state()]]
    state = TrainerState(iteration=iteration, kl_coef=0.05, tokens=10 * iteration, world_size=1)
    checkpoints.save(iteration, agent, {"state": {}, "param_groups": []}, generators, state)


class Payload:
    """Unpickling this runs code: it touches a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_trainer_pt_is_refused_and_runs_nothing(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    save(checkpoints, 0)
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "generators": []}, tmp_path / "checkpoint-000000" / "trainer.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint-000000/trainer.pt cannot be read safely"):
        Checkpoints(tmp_path).resume()
    assert not marker.exists()


@pytest.mark.parametrize("target", ["/etc", "../elsewhere/checkpoint-000001", "checkpoint-000001/../../x", "agent"])
def test_a_hostile_latest_pointer_is_refused(tmp_path, target):
    save(Checkpoints(tmp_path), 1)
    (tmp_path / "latest").write_text(target)
    with pytest.raises(ValueError, match=r"latest names .*not a checkpoint directory of this run"):
        Checkpoints(tmp_path).resume()


def test_only_this_runs_checkpoints_are_deleted_and_two_are_kept(tmp_path):
    foreign = [tmp_path / "checkpoint-500", tmp_path / "checkpoint-000007"]  # another tool's, and a stray one
    for directory in foreign:
        directory.mkdir()
        (directory / "keep.txt").write_text("not textenv's")
    checkpoints = Checkpoints(tmp_path)
    for iteration in range(4):
        save(checkpoints, iteration)
    assert all((d / "keep.txt").exists() for d in foreign)
    ours = sorted(p.name for p in tmp_path.glob("checkpoint-00000[0-3]"))
    assert ours == ["checkpoint-000002", "checkpoint-000003"]
    assert (tmp_path / "latest").read_text() == "checkpoint-000003"


def test_a_resumed_run_takes_over_its_checkpoints(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    for iteration in range(2):
        save(checkpoints, iteration)
    resumed = Checkpoints(tmp_path)
    assert resumed.resume().state.iteration == 1
    save(resumed, 2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000001", "checkpoint-000002"]


def state_with(**changes) -> str:
    return json.dumps({**vars(TrainerState(iteration=1, kl_coef=0.05, tokens=10, world_size=1)), **changes})


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: truncate(d / "agent" / "model.safetensors"), "agent/model.safetensors is damaged"),
        (lambda d: truncate(d / "trainer.pt"), "trainer.pt cannot be read safely"),
        (lambda d: (d / "state.json").write_text("{"), "state.json is damaged"),
        (lambda d: (d / "state.json").write_text(json.dumps({"iteration": 1})), "state.json is damaged"),
        (lambda d: (d / "state.json").write_text(state_with(kl_coef=float("nan"))), "state.json is damaged.*kl_coef"),
        (lambda d: (d / "agent" / "model.safetensors").unlink(), "holds no weights"),
    ],
)
def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, damage, named):
    checkpoints = Checkpoints(tmp_path)
    save(checkpoints, 0)
    save(checkpoints, 1)
    damage(tmp_path / "checkpoint-000001")
    with pytest.warns(UserWarning, match=named + r".*resuming from the checkpoint before it"):
        resumed = Checkpoints(tmp_path).resume()
    assert resumed.state.iteration == 0 and resumed.directory.name == "checkpoint-000000"

    (tmp_path / "checkpoint-000000" / "state.json").write_text("not json")
    with pytest.raises(CheckpointError, match=named + r".*state.json is damaged.*no complete checkpoint"):
        Checkpoints(tmp_path).resume()


def test_a_missing_checkpoint_folder_is_named(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    save(checkpoints, 0)
    (tmp_path / "latest").write_text("checkpoint-000009")
    with pytest.warns(UserWarning, match="checkpoint-000009 is missing; resuming from .*checkpoint-000000"):
        assert Checkpoints(tmp_path).resume().state.iteration == 0
    (tmp_path / "latest").write_text("checkpoint-000000")
    (tmp_path / "checkpoint-000000").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="checkpoint-000000 is missing; no complete checkpoint"):
        Checkpoints(tmp_path).resume()


def test_non_finite_weights_are_never_checkpointed_and_the_good_one_stays(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    save(checkpoints, 0)
    with pytest.raises(FloatingPointError, match=r"parameter weight .*NaN or inf.*previous checkpoint is kept"):
        save(checkpoints, 1, TinyAgent(float("nan")))
    assert (tmp_path / "latest").read_text() == "checkpoint-000000"
    assert not (tmp_path / "checkpoint-000001").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean resume: no fallback needed
        assert Checkpoints(tmp_path).resume().state.iteration == 0
