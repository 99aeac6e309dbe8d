# %% [markdown]
# # RLHF-PPO, one concept at a time, in one process
#
# This notebook runs all fifteen examples of the walk (docs/concepts.md, in Chinese
# docs/concepts.zh.md), 01 to 15, one after the other in a single Python process, so
# torch and transformers are imported once instead of fifteen times, and shows each
# figure inline. It is a plain Python file in jupytext's "percent" format: run it as a
# script (`python examples/walkthrough.py [--out DIR] [--quick]`), open it in VS Code
# or JupyterLab with jupytext as a notebook, or convert it with
# `jupytext --to ipynb examples/walkthrough.py`.
#
# Each cell runs one example exactly as the command line would (its module-level
# code, with the arguments given here) and then displays the figures it wrote. The
# longest cell is 13 (seven short training runs, most of the walk's time); 12 and 15
# each train one run. `--quick` uses the smallest batches and runs, for tests: it
# checks the plumbing, and its numbers are not the ones the docs quote.

# %%
import runpy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd() / "examples"
sys.path.insert(0, str(HERE))  # the examples import their shared helpers as `common`
ARGS = sys.argv[1:] if "__file__" in globals() else []
OUT = Path(ARGS[ARGS.index("--out") + 1]) if "--out" in ARGS else HERE / "output"
QUICK = "--quick" in ARGS


def show(*names: str) -> None:
    """Display figures inline in a notebook; as a script, print where they are."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display

        inline = get_ipython() is not None
    except ImportError:
        inline = False
    for name in names:
        if inline:
            display(Image(filename=str(OUT / name)))
        else:
            print(f"  figure: {OUT / name}")


def example(script: str, *extra: str) -> None:
    """Run examples/<script> in this process, as `python examples/<script> --out OUT <extra>` would."""
    began = time.perf_counter()
    sys.argv = [str(HERE / script), "--out", str(OUT), *extra]
    runpy.run_path(str(HERE / script), run_name="__main__")
    print(f"[{script}: {time.perf_counter() - began:.1f} s]")


small = ["--episodes", "6"] if QUICK else []

# %% [markdown]
# ## 1. The agent/environment loop: one episode, one token per turn

# %%
example("01_agent_env_loop.py")
show("01_agent_env_loop.png")

# %% [markdown]
# ## 2. State, action, reward: the observation window slides one token per step

# %%
example("02_state_action_reward.py")
show("02_observation_window.png")

# %% [markdown]
# ## 3. The return G_t = r_t + gamma * G_{t+1}, for four gammas

# %%
example("03_returns_and_discount.py")
show("03_returns_and_discount.png")

# %% [markdown]
# ## 4. The four roles: which are trained, which are frozen

# %%
example("04_four_roles.py")
show("04_four_models.png", "04_four_roles.png")

# %% [markdown]
# ## 5. The KL penalty: a one-sample estimate, negative on some tokens and some responses

# %%
example("05_kl_penalty.py", *small)
show("05_kl_per_token.png", "05_kl_heatmap.png", "05_kl_per_response.png")

# %% [markdown]
# ## 6. The critic: a linear head on the middle block's hidden state

# %%
example("06_value_head.py", *(["--episodes", "6", "--fit-episodes", "32"] if QUICK else []))
show("06_value_head.png")

# %% [markdown]
# ## 7. The reward model's score, paid on the last token

# %%
example("07_reward_on_last_token.py", *small)
show("07_prefix_scores.png", "07_reward_heatmap.png")

# %% [markdown]
# ## 8. The actor loss: V_t (pushes every sampled token up), G_t (REINFORCE), A_t = G_t - V_t (the advantage)

# %%
example("08_actor_loss.py", *(["--episodes", "8", "--samples", "64"] if QUICK else []))
show("08_actor_loss.png")

# %% [markdown]
# ## 9. GAE: the advantage, token by token

# %%
example("09_advantages_gae.py", *small)
show("09_advantage_heatmap.png", "09_gae_episode.png")

# %% [markdown]
# ## 10. PPO's ratio and clipping: a typical update, and an atypical one

# %%
example("10_ppo_ratio_clipping.py", *(["--episodes", "16"] if QUICK else []))
show("10_ppo_ratio_clipping.png")

# %% [markdown]
# ## 11. The critic loss with value clipping

# %%
example("11_critic_loss.py", *(["--episodes", "16"] if QUICK else []))
show("11_critic_loss.png")

# %% [markdown]
# ## 12. Everything together: train, and watch the metrics (docs/metrics.md)

# %%
example(
    "12_train_end_to_end.py", *(["--iterations", "2", "--batch-size", "8", "--eval-episodes", "8"] if QUICK else [])
)
show("12_learning_curve.png", "12_scores_before_after.png")

# %% [markdown]
# ## 13. What goes wrong: seven short runs, one broken setting each, and the metric that warns you

# %%
example("13_what_goes_wrong.py", *(["--quick"] if QUICK else []))
show("13_what_goes_wrong.png")

# %% [markdown]
# ## 14. PPO, RLOO and GRPO on the same batch

# %%
example("14_ppo_grpo_rloo.py", *(["--prompts", "2", "--group-size", "3"] if QUICK else []))
show("14_ppo_grpo_rloo.png")

# %% [markdown]
# ## 15. An episode of several turns: the calculator's tokens are context, not actions

# %%
example("15_multi_turn.py", *(["--iterations", "2", "--episodes", "16"] if QUICK else []))
show("15_multi_turn.png")
