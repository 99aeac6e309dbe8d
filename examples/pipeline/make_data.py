"""Write the three-step example's data: a small support-desk domain, made up here, offline.

    python examples/pipeline/make_data.py [--out examples/pipeline]

writes

    demonstrations.jsonl    {"prompt", "response"}: a customer's complaint and an agent's reply
    preferences.jsonl       {"prompt", "chosen", "rejected"}: two replies to one complaint, the better one chosen
    prompts_train.txt       complaints for RL (the demonstrations and preferences use only these)
    prompts_eval.txt        held-out complaints, never seen in steps 1 and 2

A reply is helpful (an apology, a remedy, maybe a closing), curt (a deflection) or
half-way (it asks for something first). The demonstrations mix the three evenly, as a
help desk's logs might; the preferences rank them by ``quality``: helpful over
half-way over curt, and among helpful replies, a remedy over none. So the SFT policy
of step 1 writes a helpful reply about a third of the time, the reward model of step 2
learns ``quality``, and RL in step 3 has somewhere to go.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ITEMS = ["order", "parcel", "laptop", "phone", "jacket", "book", "lamp", "chair", "camera", "kettle", "watch", "desk"]
PROBLEMS = ["arrived late", "arrived broken", "never arrived", "is the wrong size", "stopped working", "has a scratch"]
APOLOGIES = ["I am so sorry about your {item}.", "Sorry to hear that your {item} {problem}.", "I apologise for this."]
REMEDIES = ["We will send a new one today.", "I have started a full refund.", "A replacement is on its way."]
CLOSINGS = ["Thank you for your patience.", "Is there anything else I can do?", ""]
ASKS = ["Please send us a photo of the {item}.", "Can you tell me your order number?", "Please wait a few days."]
DEFLECTIONS = ["That is not our problem.", "Please read the manual.", "We cannot help with that.", "Ask the shop."]
STYLES = ("helpful", "half-way", "curt")


def prompt(item: str, problem: str) -> str:
    return f"Customer: my {item} {problem}. Agent:"


def reply(style: str, item: str, problem: str, rng: random.Random) -> tuple[str, int]:
    """(reply text, quality): helpful 3-5, half-way 1-2, curt 0."""
    fill = {"item": item, "problem": problem}
    if style == "helpful":
        parts = [rng.choice(APOLOGIES)]
        remedy = rng.random() < 0.8
        if remedy:
            parts.append(rng.choice(REMEDIES))
        closing = rng.choice(CLOSINGS)
        parts += [closing] if closing else []
        quality = 3 + remedy + bool(closing)
    elif style == "half-way":
        parts = [rng.choice(ASKS)] + ([rng.choice(CLOSINGS[:1])] if rng.random() < 0.5 else [])
        quality = 1 + (len(parts) == 2)
    else:
        parts = [rng.choice(DEFLECTIONS)]
        quality = 0
    return " " + " ".join(p.format(**fill) for p in parts), quality


def make(out: Path, n_demonstrations: int = 1500, n_pairs: int = 1500, n_eval_prompts: int = 16, seed: int = 0):
    rng = random.Random(seed)
    openings = [(item, problem) for item in ITEMS for problem in PROBLEMS]
    rng.shuffle(openings)
    eval_openings, train_openings = openings[:n_eval_prompts], openings[n_eval_prompts:]
    demonstrations = []
    for _ in range(n_demonstrations):
        item, problem = rng.choice(train_openings)
        text, _ = reply(rng.choice(STYLES), item, problem, rng)
        demonstrations.append({"prompt": prompt(item, problem), "response": text})
    pairs = []
    while len(pairs) < n_pairs:
        item, problem = rng.choice(train_openings)
        (a, qa), (b, qb) = (reply(rng.choice(STYLES), item, problem, rng) for _ in range(2))
        if qa != qb:
            chosen, rejected = (a, b) if qa > qb else (b, a)
            pairs.append({"prompt": prompt(item, problem), "chosen": chosen, "rejected": rejected})
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("demonstrations", demonstrations), ("preferences", pairs)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name, chosen in (("train", train_openings), ("eval", eval_openings)):
        (out / f"prompts_{name}.txt").write_text("".join(prompt(*o) + "\n" for o in chosen))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    make(parser.parse_args().out)
