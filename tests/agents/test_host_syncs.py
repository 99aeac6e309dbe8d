"""Host synchronisations on the GPU path, counted on the CPU.

On CUDA, Python queues kernels and runs ahead of the GPU until it asks for a value:
``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``if tensor:`` (``__bool__``),
``int(tensor)``, and every op whose output size depends on the data (``nonzero``,
boolean-mask indexing, ``unique``, ``masked_select``, ``masked_scatter``'s backward) make
the host wait until the device has caught up ("sync"). A blocking copy from the host
(``.to(device)``, ``torch.as_tensor(array, device=...)``) synchronises the stream too
("h2d"); ``non_blocking=True`` from ordinary host memory does not. Each wait drains the
queue, and the GPU idles while Python queues the next kernels.

There is no GPU here, so ``HostSyncs`` replays the GPU path's placement on the CPU: it
tags each tensor "device" (the models' parameters and buffers, what is made from them,
or with ``device=`` a device tensor's ``.device``) or "host" (made without ``device=``,
by ``.cpu()``, from numpy), and records every call above that a device tensor takes part
in, with the file:line of the call (the innermost frame outside torch) and of the nearest
frame in ``agents/`` or ``textenv/``. A tensor made out of its sight (autograd's
gradients) counts as the device's. It patches the Tensor methods and torch functions
that wait, so it sees them in custom backward functions too; of autograd's own C++
backward formulas it knows the one that waits here (``WAITING_BACKWARDS``). A wait inside
a CUDA kernel's own C++ (one that reads a size back) is out of its sight, so the counts
are lower bounds: ``torch.cuda.set_sync_debug_mode("warn")`` on a GPU would show those.

Placement: a device tensor meeting a host one of more than one element in an op that is
not a copy or an index is an error on CUDA; ``HostSyncs.mismatches`` lists them, and the
tests below assert there are none in the rollout and the update.

The tests hold the counts to what the Gymnasium contract needs: per token of the
rollout, the sampled tokens and their log-probs go to the host for ``env.step``; per
micro-batch of the update, a small constant that does not grow with the batch, all of
it inside transformers' forward but the sparse embedding gradient's ``unique``; per
optimizer step, one transfer.
"""

from __future__ import annotations

import inspect
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gymnasium.vector import AutoresetMode
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

import agents.ppo
import agents.rollout
from agents.policy import ActorCritic, SparseRowsLookup
from agents.ppo import PPOConfig, ppo_update
from agents.rollout import collect_rollout
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR

HOST, DEVICE = "host", "device"
REPO = Path(__file__).resolve().parents[2]
PACKAGES = tuple(str(REPO / name) + "/" for name in ("agents", "textenv"))
SKIPPED = (str(Path(torch.__file__).parent) + "/", sysconfig.get_paths()["stdlib"] + "/", __file__)

# calls that wait for the device when ``self`` (or an argument) is on it
RESULT_TO_HOST = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__")
RESULT_TO_HOST += ("__array__", "__repr__", "__format__")
DATA_SHAPED = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "equal", "allclose")
DATA_SHAPED += ("is_nonzero",)
PATCHED_METHODS = (*RESULT_TO_HOST, *DATA_SHAPED, "to", "copy_", "__getitem__", "__setitem__", "repeat_interleave")
PATCHED_FUNCTIONS = (*DATA_SHAPED, "where", "repeat_interleave")
# autograd nodes whose backward waits for the device: masked_scatter's is a masked_select of the gradient
WAITING_BACKWARDS = {"MaskedScatterBackward0": "masked_scatter's backward (masked_select)"}
# ops that move or index: a host tensor among their arguments is a copy, not an error
MOVES = ("to", "cpu", "cuda", "copy_", "as_tensor", "tensor", "asarray", "__getitem__", "__setitem__", "index_put_")


@dataclass(frozen=True)
class Event:
    kind: str  # "sync": the host waits for a device value; "h2d": a blocking host-to-device copy
    what: str  # the call, e.g. "Tensor.__bool__", "boolean-mask index"
    site: str  # file:line of the call (innermost frame outside torch and the standard library)
    caller: str  # file:line of the nearest frame in agents/ or textenv/
    window: str  # the phase it fell in (HostSyncs.mark)
    instance: int  # which occurrence of that phase


def short(path: str) -> str:
    if path.startswith(str(REPO) + "/") and "site-packages" not in path:
        return path[len(str(REPO)) + 1 :]
    return path.split("site-packages/")[-1]


def call_sites() -> tuple[str, str]:
    """(the innermost frame outside torch, the standard library and this file; the nearest in agents/ or textenv/)."""
    frame, site = sys._getframe(2), None
    while frame is not None:
        path = frame.f_code.co_filename
        if site is None and not path.startswith(SKIPPED):
            site = f"{short(path)}:{frame.f_lineno}"
        if path.startswith(PACKAGES):
            return site, f"{short(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return site or "?", "?"


def tensors_in(value):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


DEVICE_DESCRIPTOR = Tensor.device  # the mode sees ``tensor.device`` as this descriptor's __get__


class HostSyncs(TorchFunctionMode):
    """Count, by call site, the host synchronisations the code in the ``with`` block would make on CUDA."""

    def __init__(self, device_modules=(), host_tensors=()):
        super().__init__()
        self.places = WeakIdKeyDictionary()
        for module in device_modules:
            for tensor in (*module.parameters(), *module.buffers()):
                self.places[tensor] = DEVICE
        for tensor in host_tensors:
            self.places[tensor] = HOST
        self.events: list[Event] = []
        self.mismatches: list[str] = []
        self.device_places: dict[int, tuple[torch.device, str]] = {}  # id -> (the object, kept alive; its place)
        self.window, self.instances = "setup", Counter({"setup": 1})
        self._inside = 0  # depth of patched calls: a call through another is counted once
        self._saved = {}

    # ------------------------------------------------------------ bookkeeping
    def place(self, tensor: Tensor) -> str:
        return self.places.get(tensor, DEVICE)

    def device_named(self, device) -> str:
        """Where ``device=`` puts a tensor. Here every ``torch.device`` is the CPU, so each one ``tensor.device``
        returns is remembered with that tensor's place; a string "cpu" is the host; any other is the device."""
        if isinstance(device, torch.device):
            return self.device_places.get(id(device), (None, DEVICE))[1]
        return HOST if isinstance(device, str) and device.startswith("cpu") else DEVICE

    def to_target(self, args, kwargs) -> str | None:
        """Where ``Tensor.to(*args, **kwargs)`` sends a tensor, or None (a dtype only: where it was)."""
        for value in (*args, kwargs.get("device"), kwargs.get("other")):
            if isinstance(value, Tensor):
                return self.place(value)
            if isinstance(value, (str, torch.device, int)) and not isinstance(value, bool):
                return self.device_named(value)
        return None

    def on_device(self, *values) -> bool:
        return any(self.place(t) == DEVICE for t in tensors_in(values))

    def mark(self, window: str) -> None:
        """Events from here on fall in a new occurrence of ``window``."""
        self.window = window
        self.instances[window] += 1

    def record(self, kind: str, what: str) -> None:
        site, caller = call_sites()
        self.events.append(Event(kind, what, site, caller, self.window, self.instances[self.window]))

    def counts(self, window: str, kind: str = "sync") -> list[int]:
        """The number of ``kind`` events in each occurrence of ``window``, in order."""
        per = Counter(e.instance for e in self.events if e.window == window and e.kind == kind)
        return [per[i] for i in range(1, self.instances[window] + 1)]

    def sites(self, window: str, instance: int | None = None, kind: str = "sync") -> Counter:
        """(what, site, caller) -> count, over one occurrence of ``window`` (or all)."""
        return Counter(
            (e.what, e.site, e.caller)
            for e in self.events
            if e.window == window and e.kind == kind and instance in (None, e.instance)
        )

    # ------------------------------------------------------------ the calls that wait
    def check_call(self, name: str, self_: Tensor | None, args, kwargs) -> None:
        """Record a sync of ``name`` called on ``self_`` (None: a torch function) with ``args``."""
        if name in RESULT_TO_HOST:
            if self.on_device(self_):
                self.record("sync", f"Tensor.{name}")
        elif name in DATA_SHAPED:
            if self.on_device(self_, args):
                self.record("sync", f"{'Tensor.' if self_ is not None else 'torch.'}{name}")
        elif name == "where":  # torch.where(condition) alone is nonzero
            if len(args) == 1 and not kwargs and self.on_device(args):
                self.record("sync", "torch.where(condition)")
        elif name == "repeat_interleave":  # tensor repeats: the output length is their sum
            repeats = args[0] if self_ is not None and args else kwargs.get("repeats", args[1:2] or None)
            repeats = repeats[0] if isinstance(repeats, list) else repeats
            if isinstance(repeats, Tensor) and kwargs.get("output_size") is None and self.on_device(self_, repeats):
                self.record("sync", "repeat_interleave(tensor repeats)")
        elif name == "to":
            if self.to_target(args, kwargs) == HOST and self.on_device(self_):
                self.record("sync", "Tensor.to(host)")
        elif name == "copy_":
            if self.place(self_) == HOST and self.on_device(args[0]):
                self.record("sync", "Tensor.copy_(device into host)")
        elif name in ("__getitem__", "__setitem__"):
            index = args[0]
            masks = [t for t in tensors_in(index) if t.dtype in (torch.bool, torch.uint8)]
            value = args[1] if name == "__setitem__" else None
            scalar = not isinstance(value, Tensor) or (value.numel() == 1 and self.place(value) == HOST)
            if masks and self.on_device(self_, masks) and (name == "__getitem__" or not scalar):
                self.record("sync", "boolean-mask index")  # nonzero: the selection's size
            if name == "__setitem__" and self.place(self_) == HOST and self.on_device(value):
                self.record("sync", "device value written into a host tensor")

    def check_graph(self, loss: Tensor) -> None:
        """Record the nodes of ``loss``'s graph whose backward waits for the device (autograd runs them in C++,
        out of the patched methods' sight)."""
        seen, todo = set(), [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ in WAITING_BACKWARDS:
                self.record("sync", WAITING_BACKWARDS[type(node).__name__])
            todo.extend(next_node for next_node, _ in node.next_functions)

    def patch(self, owner, name: str, method: bool) -> None:
        original = owner.__dict__.get(name)
        fallback = getattr(owner, name)
        counter = self

        def counted(*args, **kwargs):
            if counter._inside:
                return fallback(*args, **kwargs)
            counter._inside += 1
            try:
                if method:
                    counter.check_call(name, args[0], args[1:], kwargs)
                else:
                    counter.check_call(name, None, args, kwargs)
                return fallback(*args, **kwargs)
            finally:
                counter._inside -= 1

        counted.__name__ = name
        self._saved[owner, name] = original
        setattr(owner, name, counted)

    def __enter__(self):
        for name in PATCHED_METHODS:
            self.patch(torch.Tensor, name, method=True)
        for name in PATCHED_FUNCTIONS:
            self.patch(torch, name, method=False)
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        for (owner, name), original in self._saved.items():
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()
        return result

    # ------------------------------------------------------------ placement
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = list(tensors_in((args, kwargs)))
        if name == "backward":
            self.check_graph(args[0])
        self.check_placement(name, args, kwargs, inputs)
        out = func(*args, **kwargs)
        if getattr(func, "__self__", None) is DEVICE_DESCRIPTOR:
            self.device_places[id(out)] = out, self.place(args[0])
            return out
        if isinstance(out, torch.device):  # torch.device(...) itself
            self.device_places[id(out)] = out, self.device_named(str(out))
            return out
        if name == "__setitem__" or (name.endswith("_") and not name.startswith("__")):
            return out  # in place: the tensor stays where it was
        place = self.result_place(name, args, kwargs, inputs)
        if isinstance(out, Tensor) and any(out is t for t in inputs) and self.place(out) != place:
            out = out.view_as(out)  # .to(device) returns its input on the CPU; on the GPU path it is a new tensor
        for tensor in tensors_in(out):
            self.places[tensor] = place
        return out

    def result_place(self, name: str, args, kwargs, inputs) -> str:
        if name in ("cpu", "numpy", "tolist", "item"):
            return HOST
        if name == "to":
            target = self.to_target(args[1:], kwargs)
            return self.place(args[0]) if target is None else target
        if kwargs.get("device") is not None:
            return self.device_named(kwargs["device"])
        if inputs:
            return DEVICE if self.on_device(inputs) else HOST
        return HOST  # a factory without device=: the host's default device

    def check_placement(self, name: str, args, kwargs, inputs) -> None:
        """Record blocking host-to-device copies, and device tensors meeting host ones (an error on CUDA)."""
        explicit = [(t, self.places.get(t)) for t in inputs]
        if name == "to" and self.place(args[0]) == HOST and not kwargs.get("non_blocking"):
            if self.to_target(args[1:], kwargs) == DEVICE:
                self.record("h2d", "Tensor.to(device)")
        elif name in ("as_tensor", "tensor", "asarray") and kwargs.get("device") is not None:
            if self.device_named(kwargs["device"]) == DEVICE and not self.on_device(inputs):
                self.record("h2d", f"torch.{name}(host data, device=)")
        elif name in ("__getitem__", "__setitem__"):
            index = list(tensors_in(args[1]))
            if self.place(args[0]) == DEVICE and any(self.places.get(t) == HOST for t in index):
                self.record("h2d", "host index into a device tensor")
            if self.places.get(args[0]) == HOST and any(self.places.get(t) == DEVICE for t in index):
                self.mismatches.append(f"device index into a host tensor at {call_sites()[0]}")
            value = args[2] if name == "__setitem__" else None
            if isinstance(value, Tensor) and self.places.get(args[0]) == DEVICE and self.places.get(value) == HOST:
                if value.dim() > 0:
                    self.record("h2d", "host tensor written into a device tensor")
        elif name == "copy_" and self.places.get(args[0]) == DEVICE and self.places.get(args[1]) == HOST:
            if not kwargs.get("non_blocking") and not (len(args) > 2 and args[2]):
                self.record("h2d", "Tensor.copy_(host into device)")
        if name in MOVES:
            return
        on_device = any(where == DEVICE for _, where in explicit)
        host = [t for t, where in explicit if where == HOST and t.dim() > 0]
        if on_device and host:
            site, caller = call_sites()
            self.mismatches.append(f"{name}: a host tensor {tuple(host[0].shape)} meets a device one at {site}")


# ---------------------------------------------------------------- the tests
LOCKSTEP = AutoresetMode.DISABLED


def device_modules(agent, env) -> list[torch.nn.Module]:
    """The modules that live on the device: the agent and the env's frozen models."""
    core = env.unwrapped.core
    return [agent, core.reference.model, *([core.reward_model] if isinstance(core.reward_model, nn.Module) else [])]


def line_of(function, text: str) -> str:
    """``file:line`` of the first line of ``function`` that holds ``text``."""
    lines, first = inspect.getsourcelines(function)
    offset = next(i for i, line in enumerate(lines) if text in line)
    return f"{short(inspect.getsourcefile(function))}:{first + offset}"


def ours(sites: Counter) -> Counter:
    """The syncs called from agents/ itself: (what, file:line) -> count."""
    mine = Counter()
    for (what, site, _), count in sites.items():
        if site.startswith("agents/"):
            mine[what, site] += count
    return mine


def marking(patch, syncs: HostSyncs, owner, name: str, enter: str, leave: str | None = None) -> None:
    """Calls of ``owner.name`` start a new occurrence of the window ``enter`` (and ``leave`` after them)."""
    real = getattr(owner, name)

    def marked(*args, **kwargs):
        syncs.mark(enter)
        try:
            return real(*args, **kwargs)
        finally:
            if leave is not None:
                syncs.mark(leave)

    patch.setattr(owner, name, marked)


def test_the_counter_sees_syncs_copies_and_misplaced_tensors():
    model = nn.Linear(3, 1)
    with HostSyncs([model]) as syncs:
        device = model.weight.device
        x = torch.ones(4, 3, device=device)  # made on the device: no copy
        host = torch.ones(4, 3)
        out = model(x)[:, 0]
        if (out > 0).any():  # __bool__ of a device tensor
            pass
        out.sum().item()  # item
        host.sum().item()  # a host tensor: no sync
        out[out > 0]  # a boolean mask: nonzero
        out.cpu()  # a copy to the host
        host.to(device)  # a blocking copy to the device
        host.to(device, non_blocking=True)  # not blocking: no wait
        model(host)  # a host input meets the device's weight: an error on CUDA
        zeros = torch.zeros(4, device=device).requires_grad_()
        even = torch.arange(4, device=device) % 2 == 0
        zeros.masked_scatter(even, out[:2]).sum().backward()  # its backward: masked_select
    syncs_seen = Counter(e.what for e in syncs.events if e.kind == "sync")
    assert syncs_seen == {
        "Tensor.__bool__": 1,
        "Tensor.item": 1,
        "boolean-mask index": 1,
        "Tensor.cpu": 1,
        "masked_scatter's backward (masked_select)": 1,
    }
    assert [e.what for e in syncs.events if e.kind == "h2d"] == ["Tensor.to(device)"]
    assert len(syncs.mismatches) == 1 and "linear" in syncs.mismatches[0]
    assert model.weight.grad is not None
    assert "item" not in vars(torch.Tensor)  # the patched methods are restored


def test_a_rollout_waits_for_the_device_only_for_what_env_step_exchanges(make_vec, monkeypatch):
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    env = make_vec(8, autoreset_mode=LOCKSTEP, max_new_tokens=12)
    syncs = HostSyncs(device_modules(agent, env))
    marking(monkeypatch, syncs, env, "step", "env.step", "agent")
    with syncs:
        rollout = collect_rollout(agent, env, 1.0, seed=0, generator=torch.Generator().manual_seed(0))
    steps = rollout.actions.shape[1]
    assert syncs.instances["env.step"] == steps > 2
    # "agent" k: after env.step k, the agent's next token (its cache advanced, a token sampled, env.step's inputs)
    env_step = line_of(agents.rollout.step_until_all_end, "env.step(action.cpu()")
    for token in range(1, steps):
        sites = syncs.sites("agent", token)
        # inherent to the Gymnasium contract: env.step takes numpy, so the sampled tokens and their log-probs
        # come to the host (the second copy finds the device idle)
        assert ours(sites) == {("Tensor.cpu", env_step): 2}, sites
        # the rest is in the policy's cached forward over the token: transformers' test of the padding mask
        # (masking_utils, whether SDPA may skip the mask) and CachedStepper._trim's test of the cache's first
        # column (textenv/lm.py): avoidable there, not here
        assert sum(sites.values()) <= 4, sites
        # the episodes that ended (the env's numpy terminated | truncated) go back to the device: one small copy
        assert sum(syncs.sites("agent", token, "h2d").values()) == 1
    # the loop ends on the host's arrays: nothing after the last env.step but the rollout's columns coming back
    assert syncs.counts("agent")[-1] == 3  # actions, log-probs, mask: (B, T) each, once per rollout
    # env.step, per token: inherent, its numpy results leave the device (the rewards, six float infos: seven
    # copies, which one stacked copy could make one), and the reference model's forward (its mask test). The
    # others are the env's own and avoidable: the caller's log-probs checked on the device after the copy there
    # (textenv/core.py check_logprob_values), numpy ends tested on the device (core.py's ``continuing``,
    # scorers.py's ``ended.nonzero()``), two finiteness checks of the scores, CachedStepper._trim. At most 17 on
    # a step where episodes end (the reward model's forward, its rows read back)
    assert max(syncs.counts("env.step")) <= 17
    assert syncs.mismatches == []


def run_update(make_vec, share_backbone: bool, batch: int, ent_coef: float) -> HostSyncs:
    """One PPO update (2 epochs, minibatches of 8, micro-batches of 4) under ``HostSyncs``, with its windows."""
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=share_backbone, critic_init=REWARD_MODEL_DIR)
    env = make_vec(batch, autoreset_mode=LOCKSTEP, max_new_tokens=12)
    rollout = collect_rollout(agent.eval(), env, 1.0, seed=1, generator=torch.Generator().manual_seed(1))
    syncs = HostSyncs([agent], tensors_in(list(rollout._asdict().values())))  # the rollout lives on the host
    rescoring = []
    score, rescore = agents.ppo.score_rollout, agents.ppo.rescore

    def scored(*args, **kwargs):
        syncs.mark("rescore micro-batch" if rescoring else "micro-batch")
        return score(*args, **kwargs)

    def rescored(*args, **kwargs):
        rescoring.append(True)
        try:
            return rescore(*args, **kwargs)
        finally:
            rescoring.clear()
            syncs.mark("update")

    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5, fused=True)
    config = PPOConfig(epochs=2, minibatch_size=8, micro_batch_size=4, ent_coef=ent_coef)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(agents.ppo, "score_rollout", scored)
        patch.setattr(agents.ppo, "rescore", rescored)
        marking(patch, syncs, agents.ppo, "minibatch_step", "minibatch", "update")
        marking(patch, syncs, torch.nn.utils, "clip_grad_norm_", "minibatch")  # the step ends the minibatch
        with syncs:
            generator = torch.Generator().manual_seed(0)
            ppo_update(agent.train(), optimizer, rollout, config, 1.0, generator, kl_coef=0.05)
    assert syncs.instances["micro-batch"] == 2 * batch // 4 and syncs.instances["rescore micro-batch"] == batch // 4
    return syncs


@pytest.mark.parametrize("share_backbone, ent_coef", [(True, 0.0), (False, 0.0), (True, 0.01)])
def test_an_update_waits_for_the_device_a_constant_number_of_times_per_micro_batch(make_vec, share_backbone, ent_coef):
    trunks = 1 if share_backbone else 2
    lookup = line_of(SparseRowsLookup.backward, "torch.unique")
    entropy_test = line_of(agents.ppo.EntropyOfLogprobs.backward, "grad.any()")
    step = line_of(agents.ppo.minibatch_step, "torch.stack([grad_norm")
    for batch in (8, 16):  # the counts per micro-batch and per step do not grow with the batch
        syncs = run_update(make_vec, share_backbone, batch, ent_coef)
        for micro_batch, count in enumerate(syncs.counts("micro-batch"), 1):
            sites = syncs.sites("micro-batch", micro_batch)
            # agents/ itself: the tied embedding's sparse gradient sums the rows of each distinct token
            # (torch.unique: its size is the data's), and at ent_coef > 0 the entropy's backward tests its
            # incoming gradient (EntropyOfLogprobs); at 0 the entropy is out of the loss and its backward never runs
            assert ours(sites) == {("torch.unique", lookup): 1} | (
                {("Tensor.__bool__", entropy_test): 1} if ent_coef else {}
            ), sites
            # inside transformers, per trunk: the SDPA mask tests of a padded forward (two) or the packed-sequence
            # test of a packed one (one, and a padding-warning test on a trunk given token ids), and for the
            # policy the selection of the logits to keep (a boolean mask; its size is the data's)
            assert count - sum(ours(sites).values()) <= 3 * trunks, sites
            assert syncs.sites("micro-batch", micro_batch, "h2d") == {}  # inputs copied without waiting
        # the optimizer step: one transfer of the gradient norm (does it step?) and every stat of its micro-batches
        assert syncs.counts("minibatch") == [0, 1] * (batch // 8 * 2)  # (its start, from clip_grad_norm_ on)
        for minibatch in range(2, syncs.instances["minibatch"] + 1, 2):
            assert syncs.sites("minibatch", minibatch) == {("Tensor.tolist", step, step): 1}
        assert sum(syncs.counts("minibatch", "h2d")) == 0
        # the no-grad re-score of the first epoch's micro-batches: transformers' alone (the first also probes once
        # whether the model keeps packed sequences apart)
        for micro_batch in range(2, syncs.instances["rescore micro-batch"] + 1):
            sites = syncs.sites("rescore micro-batch", micro_batch)
            assert ours(sites) == {} and sum(sites.values()) <= 3 * trunks, sites
        # once per update: the advantages' mean, the explained variance (two), the returns' and values' means
        assert sum(syncs.counts("update")) == 5
        assert syncs.mismatches == []
