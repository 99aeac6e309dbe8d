"""A per-token viewer in the browser: the examples' JSON and a run's samples as one static HTML page.

    python -m agents.viewer examples/output --out view.html        # every example with per-token numbers
    python -m agents.viewer examples/output/15_multi_turn.json runs/ppo --out view.html

The page is one file, its data, script and style inline: it needs no server and no
network (open it from disk). Each episode's tokens are chips coloured by the quantity
chosen at the top (log pi, log pi_ref, KL, reward r_t, value V, TD error, advantage,
return, ratio rho, or any other per-token number a source holds) on one colour scale
shared by the episodes shown, with its legend: diverging for signed quantities (red
below the centre, white at it, blue above, as the examples' heatmaps), sequential for
the others. Hover a token for all its numbers; click it to keep them shown. The
environment's tokens of an episode of several turns (example 15's calculator) are
dashed and striped: context, not actions, so they have no reward, value or advantage.

What a PATH may be:

- an example's JSON (``examples/output/NN_name.json``): its per-token table
  (``tokens``, ``turns`` or ``steps``: one row per token), or example 03's token list
  with rewards and returns, or example 14's batch (one episode per row, the arrays
  over steps; that JSON holds no token strings, so its chips show step numbers);
- the examples' output folder: each of its ``NN_name.json`` with per-token numbers
  (the others, 04, 12 and 13, are listed as skipped);
- a run directory or its ``samples.jsonl`` (``agents.logger``): the logged samples.
  Rows with a ``tokens`` list show it, with each list of the same length as a
  per-token quantity (``env``, ``env_mask`` or ``whose`` marks the environment's
  tokens); rows of prompt, response and score only are shown as text.

Each token's numbers are copied from the source unchanged, under the source's own
names; ``QUANTITIES`` says which names mean the same quantity (``V(s_t)``, ``V_t`` and
``V_old`` are all the value) so that one selector colours every episode. Token texts
are untrusted: the data travels as JSON inside a ``<script type="application/json">``
with every ``<``, ``>`` and ``&`` escaped, and the page inserts text only as text.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path

TEMPLATE = Path(__file__).with_name("viewer_template.html")

# The selector's quantities: key -> (label, the names the sources use for it, centre of a diverging scale or None
# for a sequential one). A name the sources use that is not here is offered under its own name.
QUANTITIES: dict[str, tuple[str, tuple[str, ...], float | None]] = {
    "log_pi": ("log pi(a_t|s_t), the actor", ("log_pi", "log_prob", "logprob", "logprobs", "log_pi_before"), None),
    "log_pi_ref": ("log pi_ref(a_t|s_t), the reference", ("log_pi_ref", "ref_logprob", "ref_logprobs"), None),
    "kl": ("KL term, log pi - log pi_ref", ("kl",), 0.0),
    "reward": ("reward r_t", ("reward", "rewards"), 0.0),
    "value": ("value V(s_t), the critic", ("value", "values", "V(s_t)", "V_t", "V_old"), 0.0),
    "td_error": ("TD error delta_t", ("td_error",), 0.0),
    "advantage": ("advantage A_t", ("advantage", "advantages", "A_t", "advantage (ppo)"), 0.0),
    "return": ("return, the critic's target", ("return", "returns"), 0.0),
    "ratio": ("ratio rho = pi / pi_old", ("ratio",), 1.0),
}
# Per-token numbers that are positions or ids, not quantities: shown on hover, not offered for colouring.
INDEX_FIELDS = {"t", "column", "action", "context_tokens", "newest_obs_token", "next_newest_token"}
TEXT_FIELDS = ("token", "next token a_t")  # the name of a row's token text (06 names it after its meaning)
TABLE_KEYS = ("tokens", "turns", "steps")  # where an example keeps its per-token rows (01: turns, 02: steps)
ENV_KEYS = ("env", "env_mask")  # a samples row's per-token flags of the environment's tokens


class ViewerError(ValueError):
    """A path the viewer cannot show, with what is wrong with it."""


def write_viewer(paths: Iterable[str | Path] | str | Path, out: str | Path) -> Path:
    """Write the page of ``paths`` (examples' JSON, their folder, runs or samples files) to ``out``; return it."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return write_page(page_data(paths), Path(out))


def write_page(data: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data), encoding="utf-8")
    return out


def page_data(paths: list[str | Path]) -> dict:
    """What the page shows: its episodes, the quantities to colour by, the sources skipped for lack of numbers."""
    if not paths:
        raise ViewerError("no path given: pass an example's JSON, the examples' output folder or a run directory")
    episodes, skipped = [], []
    for path in paths:
        found, passed = read_path(Path(path))
        episodes += found
        skipped += passed
    if not episodes:
        raise ViewerError(f"nothing to show in {', '.join(map(str, paths))}: " + "; ".join(skipped))
    return {
        "title": "textenv tokens: " + ", ".join(Path(p).name or str(p) for p in paths),
        "quantities": quantities(episodes),
        "episodes": episodes,
        "skipped": skipped,
    }


def read_path(path: Path) -> tuple[list[dict], list[str]]:
    """(episodes, notes on files skipped) of one PATH."""
    if not path.exists():
        raise ViewerError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "samples.jsonl").is_file():
            return read_samples(path / "samples.jsonl"), []
        files = sorted(path.glob("[0-9][0-9]_*.json"))
        if not files:
            raise ViewerError(f"{path} holds no samples.jsonl (a run directory) and no examples' NN_name.json")
        episodes, skipped = [], []
        for file in files:
            found = example_episodes(load_json(file), file.name)
            if found is None:
                skipped.append(f"{file.name}: no per-token numbers")
            episodes += found or []
        return episodes, skipped
    if path.suffix == ".jsonl":
        return read_samples(path), []
    found = example_episodes(load_json(path), path.name)
    if found is None:
        raise ViewerError(
            f"{path} is not an example's JSON with per-token numbers: it has no per-token table "
            f"({', '.join(TABLE_KEYS)}: rows with a token), no token list with rewards (03) and no batch "
            "of rows with a mask (14)"
        )
    return found, []


def load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ViewerError(f"{path} is not valid JSON: {error}") from None


# --- examples' JSON -------------------------------------------------------------------------------------------


def example_episodes(data, source: str) -> list[dict] | None:
    """The episodes of one example's JSON, or None when it holds no per-token numbers."""
    if not isinstance(data, dict):
        return None
    settings = {k: v for k, v in data.items() if is_scalar(v) and k not in ("prompt", "episode")}  # kl_coef, score..
    for key in TABLE_KEYS:
        rows = data.get(key)
        if is_list_of_dicts(rows) and rows and any(text_field(r) for r in rows):
            title = f"episode {data['episode']}" if "episode" in data else "the tabulated episode"
            return [episode(source, title, data.get("prompt"), settings, [table_token(r) for r in rows])]
    if is_list_of(data.get("tokens"), str) and isinstance(data.get("rewards"), list):  # 03: returns per gamma
        return [returns_episode(data, source, settings)]
    if is_list_of_dicts(data.get("rows")) and isinstance(data.get("mask"), list):  # 14: a batch, no token texts
        return batch_episodes(data, source, settings)
    return None


def text_field(row: dict) -> str | None:
    return next((k for k in TEXT_FIELDS if isinstance(row.get(k), str)), None)


def table_token(row: dict) -> dict:
    """One row of a per-token table: its text, whether the environment wrote it (15: ``whose``), its fields."""
    text = text_field(row)
    fields = {k: v for k, v in row.items() if k != text and is_scalar(v)}
    return {"text": row.get(text, ""), "env": row.get("whose", "agent") != "agent", "fields": fields}


def returns_episode(data: dict, source: str, settings: dict) -> dict:
    """Example 03: the tokens, their rewards, and the return G_t for each discount gamma."""
    returns = dict(zip(data.get("gammas", []), data.get("returns_hand", [])))
    tokens = []
    for t, text in enumerate(data["tokens"]):
        fields = {"t": t, "reward": data["rewards"][t]}
        fields.update({f"G_t (gamma {g})": r[t] for g, r in returns.items()})
        tokens.append({"text": text, "env": False, "fields": fields})
    return episode(source, "the tabulated episode", data.get("prompt"), settings, tokens)


def batch_episodes(data: dict, source: str, settings: dict) -> list[dict]:
    """Example 14: one episode per row of the batch; the (B, T) arrays give each step's numbers."""
    names = {"rewards": "reward", "values": "value", "terminated_steps": "terminated"}  # per step: singular
    arrays = {names[k]: data[k] for k in names if isinstance(data.get(k), list)}
    for algo, a in (data.get("advantages") or {}).items():
        arrays[f"advantage ({algo})"] = a
    episodes = []
    for b, row in enumerate(data["rows"]):
        steps = [t for t, on in enumerate(data["mask"][b]) if on]
        tokens = [
            {"text": f"#{t}", "placeholder": True, "env": False,
             "fields": {"t": t, **{name: a[b][t] for name, a in arrays.items()}}}
            for t in steps
        ]  # fmt: skip
        prompts = data.get("prompts") or []
        summary = {**settings, **{k: v for k, v in row.items() if is_scalar(v) and k not in ("episode", "response")}}
        ep = episode(source, f"episode {b}", prompts[b] if b < len(prompts) else None, summary, tokens)
        ep["response"] = row.get("response")
        ep["note"] = "This JSON has no token strings: each chip is a step t; above is the response as the JSON has it."
        episodes.append(ep)
    return episodes


# --- a run's samples ------------------------------------------------------------------------------------------


def read_samples(path: Path) -> list[dict]:
    """The episodes of a run's samples.jsonl (one JSON object per line; a last line cut off by a kill is dropped)."""
    if not path.is_file():
        raise ViewerError(f"{path}: no such file")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not rows:
        raise ViewerError(f"{path} holds no samples: the run has logged no iteration yet")
    if not all(isinstance(r, dict) and ("response" in r or "tokens" in r) for r in rows):
        raise ViewerError(f"{path} is not a run's samples file: its rows need a 'response' or a 'tokens' list")
    source = f"{path.parent.name}/{path.name}"
    episodes, per_iteration = [], {}
    for row in rows:
        iteration = row.get("iteration")
        k = per_iteration[iteration] = per_iteration.get(iteration, -1) + 1
        summary = {key: v for key, v in row.items() if is_scalar(v) and key not in ("iteration", "prompt", "response")}
        title = f"iteration {iteration}, sample {k}" if iteration is not None else f"sample {k}"
        ep = episode(source, title, row.get("prompt"), summary, sample_tokens(row))
        ep["response"] = row.get("response")
        if not ep["tokens"]:
            ep["note"] = "This samples file holds text only: no per-token numbers to colour."
        episodes.append(ep)
    return episodes


def sample_tokens(row: dict) -> list[dict]:
    """A samples row's tokens, when it has a ``tokens`` list: every list of the same length is a per-token field."""
    texts = row.get("tokens")
    if not is_list_of(texts, str):
        return []
    n = len(texts)
    lists = {k: v for k, v in row.items() if k != "tokens" and isinstance(v, list) and len(v) == n}
    env = next((lists.pop(k) for k in ENV_KEYS if k in lists), None)
    if "whose" in lists:
        env = [w != "agent" for w in lists["whose"]]
    fields = {k: v for k, v in lists.items() if all(is_scalar(x) for x in v)}
    return [
        {"text": text, "env": bool(env[t]) if env else False, "fields": {k: v[t] for k, v in fields.items()}}
        for t, text in enumerate(texts)
    ]


# --- the page -------------------------------------------------------------------------------------------------


def episode(source: str, title: str, prompt, summary: dict, tokens: list[dict]) -> dict:
    """An episode of the page; ``aliases`` maps each of ``QUANTITIES`` its tokens have to the source's name."""
    names = {k for tok in tokens for k, v in tok["fields"].items() if is_number(v)}
    aliases = {}
    for key, (_, known, _) in QUANTITIES.items():
        name = next((n for n in known if n in names), None)
        if name is not None:
            aliases[key] = name
    return {"source": source, "title": title, "prompt": prompt, "summary": summary, "tokens": tokens,
            "aliases": aliases}  # fmt: skip


def quantities(episodes: list[dict]) -> list[dict]:
    """The selector's entries: ``QUANTITIES`` the episodes have, then the sources' other per-token numbers."""
    entries = [
        {"key": key, "label": label, "centre": centre}
        for key, (label, _, centre) in QUANTITIES.items()
        if any(key in ep["aliases"] for ep in episodes)
    ]
    values: dict[str, list[float]] = {}
    for ep in episodes:
        taken = set(ep["aliases"].values())
        for tok in ep["tokens"]:
            for name, v in tok["fields"].items():
                if name not in taken and name not in INDEX_FIELDS and is_number(v):
                    values.setdefault(name, []).append(v)
    for name, vs in values.items():
        signed = min(vs) < 0 < max(vs)
        entries.append({"key": name, "label": name, "centre": 0.0 if signed else None})
    return entries


def render(data: dict) -> str:
    """The page: the template with the title and the data (JSON, every <, > and & escaped) filled in."""
    embedded = json.dumps(finite(data), ensure_ascii=True, allow_nan=False)
    embedded = embedded.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    values = {"__VIEWER_TITLE__": html.escape(data["title"]), "__VIEWER_DATA__": embedded}
    return re.sub("__VIEWER_TITLE__|__VIEWER_DATA__", lambda m: values[m.group(0)], TEMPLATE.read_text("utf-8"))


def embedded_data(page: str) -> dict:
    """The data a page written by ``render`` holds (for tests and tools)."""
    match = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page, re.S)
    if match is None:
        raise ViewerError("not a viewer page: no viewer-data script")
    return json.loads(match.group(1))


def finite(value):
    """``value`` with NaN and infinities as the strings "NaN", "Infinity", "-Infinity" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def is_scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_list_of(v, kind) -> bool:
    return isinstance(v, list) and all(isinstance(x, kind) for x in v)


def is_list_of_dicts(v) -> bool:
    return is_list_of(v, dict)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m agents.viewer",
        description="Write a self-contained HTML page that shows episodes token by token, each token coloured by "
        "a chosen quantity (log pi, KL, reward, value, advantage, ...); open it in a browser, no server needed.",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", type=Path,
        help="an example's JSON, the examples' output folder, a run directory or its samples.jsonl",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("view.html"), help="the page to write (default: view.html)")
    args = parser.parse_args(argv)
    try:
        data = page_data(args.paths)
    except ViewerError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    write_page(data, args.out)
    tokens = sum(len(ep["tokens"]) for ep in data["episodes"])
    print(f"wrote {args.out}: {len(data['episodes'])} episodes, {tokens} tokens")
    for note in data["skipped"]:
        print(f"  skipped {note}")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
