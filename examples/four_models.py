"""The four models of RLHF-PPO and one training iteration between them, drawn (no model is loaded).

Which models are trained and which are frozen, what each step of one iteration takes
from which model, and each thing's name in textenv and in DeepSpeed-Chat. Example 04
draws it into its output directory as 04_four_models.png; run as a script, this file
writes the copy the docs show:

    python examples/four_models.py                 # -> docs/figures/04_four_models.png
    python examples/four_models.py --out DIR       # -> DIR/04_four_models.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

NAME = "04_four_models.png"
DOCS_FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"
TRAINED, FROZEN = "tab:green", "0.45"
STEP = "tab:blue"

# (x, y, width, height, title, colour, lines): the four models
MODELS = [
    (1, 42, 25, 18, "Actor (policy) — TRAINED", TRAINED,
     ["the language model being trained:", "writes the responses, gives log π(a_t|s_t)",
      "textenv: ActorCritic.policy", "DeepSpeed-Chat: actor_model"]),
    (75, 49, 24, 13, "Reference model — FROZEN", FROZEN,
     ["the SFT model, unchanged:", "only for the KL penalty", "textenv: TokenEnvConfig.reference_model",
      "DeepSpeed-Chat: ref_model"]),
    (75, 33, 24, 13, "Reward model — FROZEN", FROZEN,
     ["scores a finished response:", "one number", "textenv: TokenEnvConfig.reward_model",
      "DeepSpeed-Chat: reward_model"]),
    (75, 3, 24, 17, "Critic (value) — TRAINED", TRAINED,
     ["predicts the return V(s_t) from each state;", "in textenv a linear head on the actor's trunk",
      "textenv: ActorCritic.value_head", "DeepSpeed-Chat: critic_model (own model)"]),
]  # fmt: skip
# (y, title, what, textenv, DeepSpeed-Chat): the steps of one iteration, top to bottom, in the middle column
STEPS = [
    (54, "① sample", "prompts → the actor writes each response, token by token",
     "collect_rollout, env.step", "_generate_sequence"),
    (44, "② score", "log π_ref(a_t|s_t) (reference), the score (reward model), V(s_t) (critic)",
     "env.step, score_rollout", "generate_experience"),
    (34, "③ rewards", "r_t = −β (log π − log π_ref), + the score on the last token",
     "non_score_reward + score_terms", "compute_rewards"),
    (24, "④ GAE", "advantages A_t, and the critic's targets return_t = A_t + V(s_t)",
     "compute_gae", "get_advantages_and_returns"),
    (14, "⑤ losses", "actor: −min(ρ A, clip(ρ) A);  critic: ½ max((V − R)², (V_clip − R)²)",
     "policy_loss, value_loss", "actor_loss_fn, critic_loss_fn"),
    (4, "⑥ update", "gradient steps on the actor and the critic only (frozen: no .grad)",
     "ppo_update", "train_rlhf"),
]  # fmt: skip
STEP_X, STEP_W, STEP_H = 29, 38, 8


def arrow(ax, start, end, color, label="", at=None, connection="arc3", ha="center"):
    """An arrow from ``start`` to ``end``, its label (if any) at ``at``."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color=color, lw=1.6,
                                 connectionstyle=connection, shrinkA=2, shrinkB=2))  # fmt: skip
    if label:
        ax.text(*at, label, ha=ha, va="center", fontsize=9, color=color, style="italic", weight="bold")


def draw() -> Figure:
    fig = Figure(figsize=(14, 8.6))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 66)
    ax.axis("off")
    ax.text(50, 64.5, "RLHF-PPO: four models, one training iteration", ha="center", va="top", fontsize=15,
            weight="bold")  # fmt: skip
    for x, y, w, h, title, color, lines in MODELS:
        trained = color == TRAINED
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.4", lw=3.2 if trained else 1.2,
                                    edgecolor=color, facecolor="#eef8ee" if trained else "#f2f2f2"))  # fmt: skip
        ax.text(x + 0.8, y + h - 1.2, title, va="top", fontsize=10.5, weight="bold", color="black")
        for i, line in enumerate(lines):
            ax.text(x + 0.8, y + h - 4.2 - 2.4 * i, line, va="top", fontsize=8.8, family="monospace"
                    if line.startswith(("textenv", "DeepSpeed")) else None)  # fmt: skip
    for y, title, what, ours, theirs in STEPS:
        ax.add_patch(FancyBboxPatch((STEP_X, y), STEP_W, STEP_H, boxstyle="round,pad=0.3", lw=1.2,
                                    edgecolor=STEP, facecolor="#eef4fb"))  # fmt: skip
        ax.text(STEP_X + 0.8, y + STEP_H - 0.8, title, va="top", fontsize=10, weight="bold", color=STEP)
        ax.text(STEP_X + 8.6, y + STEP_H - 0.9, what, va="top", fontsize=8.6)
        ax.text(STEP_X + 0.8, y + 3.2, f"textenv: {ours}", va="top", fontsize=8.2, family="monospace")
        ax.text(STEP_X + 0.8, y + 1.2, f"DeepSpeed-Chat: {theirs}", va="bottom", fontsize=8.2, family="monospace",
                color="0.3")  # fmt: skip
    for (y, *_), (next_y, *_) in zip(STEPS, STEPS[1:]):
        arrow(ax, (STEP_X + STEP_W / 2, y - 0.4), (STEP_X + STEP_W / 2, next_y + STEP_H + 0.4), STEP)
    # the models feed the steps
    right, gap = STEP_X + STEP_W + 0.4, (STEP_X + STEP_W + 75) / 2
    arrow(ax, (26.4, 56), (STEP_X - 0.4, 56), TRAINED, "a_t, log π", at=(27.7, 53.6))
    arrow(ax, (74.6, 53), (right, 49), FROZEN, "log π_ref", at=(gap, 54))
    arrow(ax, (74.6, 40), (right, 45.5), FROZEN, "score", at=(gap, 40.5))
    arrow(ax, (74.6, 17), (right, 44.5), TRAINED, "V(s_t)", at=(gap + 1.6, 26))
    # the update goes back to the trained models only
    arrow(ax, (right, 8), (74.6, 8), TRAINED, "new\nweights", at=(gap, 12))
    arrow(ax, (STEP_X - 0.4, 8), (24, 41.6), TRAINED, connection="angle,angleA=180,angleB=90,rad=0")
    ax.text(24.6, 14, "new weights", fontsize=9, color=TRAINED, style="italic", weight="bold", rotation=90)
    ax.text(1.5, 38.5, "prompts come from the task\n(textenv: the env's reset;\nDeepSpeed-Chat: the prompt\ndata set)",
            va="top", fontsize=8.6, color="0.25")  # fmt: skip
    ax.text(1.5, 25, "thick green: trained (one\noptimizer in textenv, two in\nDeepSpeed-Chat)\n\n"
            "thin grey: frozen\n(requires_grad = False, eval\nmode; in textenv the env\nholds them)",
            va="top", fontsize=8.6)  # fmt: skip
    return fig


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else DOCS_FIGURES
    out.mkdir(parents=True, exist_ok=True)
    path = out / NAME
    draw().savefig(path, dpi=110, bbox_inches="tight")
    print(f"figure: {path}")
    return path


if __name__ == "__main__":
    main()
