"""textenv/adapters/reasoning_gym.py: reasoning-gym datasets as ``task="reasoning_gym:NAME"``.

The task's name carries the generator's config and seed; train and eval never share a question; the question
is the prompt (through the chat template when asked), the entry the row, ``score_answer`` the reward with its
partial credit; a task without a model says what to pass; and its episodes pass the embedded tasks' uncached
recomputation (``tests/textenv/test_core.py``).
"""

import json

import gymnasium as gym
import numpy as np
import pytest

from tests.models import Episode
from tests.textenv.adapters.conftest import EOS, Scorer, text_ids, tiny_lm
from tests.textenv.test_core import KL_COEF, MAX_NEW, Script, check_episode, run_vector
from textenv import TokenEnvConfig
from textenv.adapters.reasoning_gym import MissingModel, parse, sft_rows, task, task_name
from textenv.config import resolve_config

reasoning_gym = pytest.importorskip("reasoning_gym")

CHAIN = "reasoning_gym:chain_sum?size=40&eval_size=20&seed=5&max_terms=3&max_digits=2"
MIX = task_name({"leg_counting": {"weight": 2, "max_animals": 3}, "chain_sum": {"max_digits": 1}}, size=60,
                eval_size=30)


def make(tokenizer, lms, name=CHAIN, **kwargs):
    reference, policy = lms
    settings = dict(max_prompt_tokens=200, max_new_tokens=MAX_NEW, kl_coef=KL_COEF, device="cpu")
    return gym.make("TokenRLHF-v0", task=name, reference_model=reference, policy=policy, tokenizer=tokenizer,
                    **(settings | kwargs))  # fmt: skip


def test_task_name_carries_config_seed_and_sizes():
    spec = parse(task_name("chain_sum", size=40, eval_size=20, seed=5, max_terms=3, allow_negation=True))
    assert (spec.datasets, spec.size, spec.eval_size, spec.seed) == (("chain_sum",), 40, 20, 5)
    assert dict(spec.options) == {"max_terms": 3, "allow_negation": True}
    mix = parse(MIX)
    assert mix.datasets == ("leg_counting", "chain_sum")
    assert dict(mix.options) == {"leg_counting.weight": 2, "leg_counting.max_animals": 3, "chain_sum.max_digits": 1}
    rows = task(CHAIN).prompt_rows("train")
    assert len(rows) == 40
    assert all(len(row["metadata"]["expression"].split()) <= 5 for row in rows)  # max_terms=3: a - b + c
    assert rows != task(CHAIN.replace("seed=5", "seed=6")).prompt_rows("train")  # the seed is the generator's


SMALL = "reasoning_gym:leg_counting?size=100&eval_size=10&min_animals=1&max_animals=1&max_instances=3"


@pytest.mark.parametrize("name", [CHAIN, MIX, SMALL])
def test_train_and_eval_never_share_a_question(name):
    rows = task(name)
    train, evaluation = rows.prompt_rows("train"), rows.prompt_rows("eval")
    assert len(train) == parse(name).size and len(evaluation) == parse(name).eval_size
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    assert task(name).prompt_rows("eval") == evaluation  # the same every time


@pytest.mark.parametrize("name", [CHAIN, SMALL])
def test_sft_rows_share_no_question_with_train_or_eval(name):
    rows = sft_rows(name, 10)
    assert len(rows) == 10 and all(row["answer"] is not None for row in rows)
    splits = {row["prompt"] for split in ("train", "eval") for row in task(name).prompt_rows(split)}
    assert not {row["prompt"] for row in rows} & splits
    spec = parse(name)
    assert spec.split_seed("sft") >= spec.split_seed("eval") + spec.eval_size  # past the eval draws' streams


def test_eval_skips_the_questions_a_small_generator_repeats_from_train():
    """One animal kind, 1 to 3 of it: 111 distinct questions, so the eval seed's own draws repeat train ones."""
    spec = parse(SMALL)
    train = {r["prompt"] for r in task(SMALL).prompt_rows("train")}
    drawn = reasoning_gym.create_dataset("leg_counting", seed=spec.split_seed("eval"), size=spec.eval_size,
                                         min_animals=1, max_animals=1, max_instances=3)  # fmt: skip
    assert {entry["question"] for entry in drawn} & train  # what the skip removes
    assert spec.split_seed("eval") >= spec.seed + spec.size  # the eval draws' random streams lie beyond train's


def test_a_generator_too_small_for_the_eval_split_is_refused():
    with pytest.raises(ValueError, match="fewer than eval_size=200; ask for fewer"):
        task("reasoning_gym:leg_counting?size=2000&min_animals=1&max_animals=1&max_instances=2").prompt_rows("eval")


def test_composite_mixes_its_datasets_and_scores_each_with_its_own():
    rows = task(MIX).prompt_rows("train")
    sources = [row["metadata"]["source_dataset"] for row in rows]
    assert set(sources) == {"leg_counting", "chain_sum"} and sources.count("leg_counting") > sources.count("chain_sum")
    score = task(MIX).reward_fns["score_answer"]
    for row in rows[:10]:
        assert score(response=row["answer"], row=row) == 1.0


def test_row_is_the_entry_and_score_answer_pays_with_partial_credit(tokenizer, lms):
    env = make(tokenizer, lms)
    _, info = env.reset(seed=0)
    row = info["row"]
    assert set(row) == {"question", "answer", "metadata"} and info["prompt"] == row["question"]
    dataset = reasoning_gym.create_dataset("chain_sum", max_terms=3, max_digits=2)
    for written in (row["answer"], "9" + row["answer"]):  # exact, then a longer answer that contains it
        env.reset(seed=0)
        for token in text_ids(tokenizer, written) + [EOS]:
            _, _, terminated, _, info = env.step(token)
        expected = dataset.score_answer(written, {"question": row["question"], "answer": row["answer"],
                                                  "metadata": row["metadata"]})  # fmt: skip
        assert terminated and info["reward/score_answer"] == pytest.approx(expected)
    assert 0 < expected < 1  # partial credit, kept as given


def test_answer_tag_scores_the_tagged_answer():
    row = task(CHAIN).prompt_rows("train")[0]
    score = task(CHAIN + "&answer_tag=answer").reward_fns["score_answer"]
    assert score(response=f"so <answer>{row['answer']}</answer>", row=row) == 1.0
    assert score(response=row["answer"], row=row) == 0.0  # no tag: no answer


def test_question_goes_through_the_chat_template(tokenizer, lms):
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>",
                                    unk_token="<unk>", eos_token="<eos>")  # fmt: skip
    tokenizer.chat_template = "{% for m in messages %}U: {{ m['content'] }}\n{% endfor %}A:"
    env = make(tokenizer, lms, chat_template=True)
    observation, info = env.reset(seed=0)
    shown = tokenizer.decode(observation["input_ids"][observation["attention_mask"] == 1])
    assert shown == f"U: {info['row']['question']}\nA:"


def test_without_a_model_the_error_says_what_to_pass():
    with pytest.raises(ValueError, match="ships no model: pass reference_model= .* --policy DIR"):
        gym.make("TokenRLHF-v0", task=CHAIN, device="cpu")
    assert isinstance(resolve_config(TokenEnvConfig(task=CHAIN)).reference_model, MissingModel)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("reasoning_gym:chain_summ", "no dataset 'chain_summ' \\(did you mean chain_sum"),
        ("reasoning_gym:chain_sum?colour=red", "\\['colour'\\] are not fields of chain_sum's config"),
        ("reasoning_gym:chain_sum?min_terms=0", "reasoning-gym refused the config: min_terms must be positive"),
        ("reasoning_gym:chain_sum+leg_counting?max_digits=2", "names no dataset of the mix"),
    ],
)
def test_bad_names_are_refused_naming_the_fix(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(TokenEnvConfig(task=name))


@pytest.mark.parametrize("name", ["reasoning_gym:", "reasoning_gym:a+a", "reasoning_gym:x?size=0", "reasoning_gym:x?s"])
def test_malformed_names_are_refused_when_the_config_is_built(name):
    with pytest.raises(ValueError, match="reasoning_gym:|size must be|key=value"):
        TokenEnvConfig(task=name)


def test_episodes_match_uncached_recomputation(tokenizer, lms):
    """The vector env with its own policy over the task's prompts: every reward, reference and policy log-prob
    and the score against plain forwards over the final context, the score recomputed by reasoning-gym itself."""
    reference, policy = lms
    env = gym.make_vec("TokenRLHF-v0", num_envs=3, vectorization_mode="vector_entry_point", task=CHAIN,
                       reference_model=reference, policy=policy, tokenizer=tokenizer, max_prompt_tokens=200,
                       max_new_tokens=MAX_NEW, kl_coef=KL_COEF, device="cpu")  # fmt: skip
    rows = {tuple(text_ids(tokenizer, r["prompt"])): r for r in task(CHAIN).prompt_rows("train")}
    dataset = reasoning_gym.create_dataset("chain_sum", max_terms=3, max_digits=2)

    def score(tokens):
        prompt = next(p for p in rows if tuple(tokens[: len(p)]) == p)
        row = rows[prompt]
        return dataset.score_answer(tokenizer.decode(tokens[len(prompt) :], skip_special_tokens=True), row)

    episodes = run_vector(env, Script(tokenizer, 3, seed=0), steps=40)
    assert len(episodes) >= 6 and all(isinstance(e, Episode) for e in episodes)
    for episode in episodes:
        check_episode(episode, reference, Scorer(score), source="policy")
    assert np.isfinite([e.score for e in episodes]).all()


def test_python_m_agents_trains_on_the_task_with_a_given_policy(tmp_path, tokenizer):
    """The trainer reads the same config: --task reasoning_gym:NAME with --policy, one iteration, evaluated."""
    from agents.__main__ import main

    tiny_lm(len(tokenizer), 256).save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    name = "reasoning_gym:chain_sum?size=40&eval_size=8&max_terms=2"
    main(["--run-dir", str(tmp_path / "run"), "--policy", str(tmp_path / "sft"), "--task", name, "--iterations", "1",
          "--batch-size", "4", "--minibatch-size", "4", "--micro-batch-size", "4", "--epochs", "1", "--eval-every", "1",
          "--eval-episodes", "4", "--max-new-tokens", "4", "--max-prompt-tokens", "100", "--no-progress",
          "--threads", "1", "--device", "cpu"])  # fmt: skip
    assert json.loads((tmp_path / "run" / "config.json").read_text())["env"]["task"] == name
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"eval/reward/score_answer", "eval/accuracy", "eval/pass@1"} <= set(last)


def test_python_m_agents_without_a_policy_says_what_to_pass(tmp_path, capsys):
    from agents.__main__ import main

    with pytest.raises(SystemExit):
        main(["--run-dir", str(tmp_path / "run"), "--task", CHAIN, "--iterations", "1", "--device", "cpu"])
    assert "ships no model: pass reference_model=" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unknown_task_lists_the_embedded_ones_and_the_prefix():
    with pytest.raises(ValueError, match=r"task must be one of \['arithmetic', 'calculator', 'reviews'\] or "
                                         r"'reasoning_gym:NAME', got 'reasoning-gym:chain_sum'"):  # fmt: skip
        TokenEnvConfig(task="reasoning-gym:chain_sum")
