"""textenv/scorers.py: a reward model with its own tokenizer reads text: it scores exactly what it scores when
called on that text.

1. Its scores equal the reward model called on the decoded text, sparse and dense; the argument
   reward_tokenizer names a loaded reward model's tokenizer; a reward model with the policy's tokenizer keeps
   the token path.
2. A prompt that spells the reward tokenizer's EOS reaches the reward model as text.
3. A reward model with its own chat template reads the conversation in it.
"""

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from tests.models import CONVERSATIONS, character_tokenizer, chat_env, eos_character_tokenizer, tiny_gpt2_classifier
from textenv.default_task import POLICY_DIR
from textenv.loading import UnknownTokensWarning
from textenv.scorers import SparseScorer, TextScorer

ENV_ID = "TokenRLHF-v0"
PROMPTS = ["I thought the plot was", "The acting felt", "Honestly this film"]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A tiny random sequence classifier over characters, saved with its character tokenizer."""
    tokenizer = character_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=16, n_layer=1, n_head=2, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    model = GPT2ForSequenceClassification(config).eval()
    directory = tmp_path_factory.mktemp("char_rm")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def direct_score(reward_dir, text: str) -> float:
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    model = GPT2ForSequenceClassification.from_pretrained(reward_dir).eval()
    with torch.no_grad():
        return float(model(**tokenizer(text, return_tensors="pt")).logits[0, 0])


# --------------------------------------------------------------------------- 1. scores of the text
def test_the_two_tokenizers_really_differ(reward_dir):
    policy, reward = AutoTokenizer.from_pretrained(POLICY_DIR), AutoTokenizer.from_pretrained(reward_dir)
    text = PROMPTS[0] + " great"
    assert policy(text)["input_ids"] != reward(text)["input_ids"]
    assert len(reward(text)["input_ids"]) == len(text) + 1  # a character each, and [CLS]


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_scores_equal_the_reward_model_called_on_the_same_text(reward_dir, mode):
    policy_tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    env = gym.make_vec(
        "TokenRLHF-v0",
        num_envs=3,
        vectorization_mode="vector_entry_point",
        autoreset_mode="Disabled",
        reward_model=str(reward_dir),
        prompts=PROMPTS,
        max_new_tokens=5,
        reward_mode=mode,
        kl_coef=0.0,
        device="cpu",
    )
    assert isinstance(env.unwrapped.core.scorer, TextScorer)
    env.reset(seed=0, options={"prompt_index": [0, 1, 2]})
    rng = np.random.default_rng(0)
    words = [policy_tokenizer.convert_tokens_to_ids(w) for w in ("▁great", "▁dull", "▁plot", ".", "▁the")]
    responses, rewards = [[], [], []], np.zeros(3)
    ended = np.zeros(3, dtype=bool)
    for step in range(5):
        actions = rng.choice(words, size=3)
        if step == 2:
            actions[1] = policy_tokenizer.eos_token_id  # one episode ends with EOS, the others are truncated
        _, reward, terminated, truncated, info = env.step(actions)
        for row in np.flatnonzero(~ended):
            responses[row].append(int(actions[row]))
            rewards[row] += reward[row]
        for row in np.flatnonzero(terminated | truncated):
            prompt_ids = policy_tokenizer(PROMPTS[row])["input_ids"]
            head = policy_tokenizer.decode(prompt_ids, skip_special_tokens=True)
            whole = policy_tokenizer.decode(prompt_ids + responses[row], skip_special_tokens=True)
            text = PROMPTS[row] + whole[len(head) :]
            if policy_tokenizer.convert_ids_to_tokens(responses[row][0]).startswith("▁"):
                assert text.startswith(PROMPTS[row] + " ")  # the space before a first word is kept
            expected = direct_score(reward_dir, text)
            assert info["score"][row] == pytest.approx(expected, abs=1e-5)
            if mode == "sparse":
                assert rewards[row] == pytest.approx(expected, abs=1e-5)
            else:  # the dense terms add up to the final score minus the prompt's
                assert rewards[row] == pytest.approx(expected - direct_score(reward_dir, PROMPTS[row]), abs=1e-5)
        ended |= terminated | truncated
    assert ended.all()


def test_a_reward_model_with_the_policys_tokenizer_keeps_the_token_path(tmp_path):
    from textenv.default_task import REWARD_MODEL_DIR

    env = gym.make("TokenRLHF-v0", reward_model=str(REWARD_MODEL_DIR), device="cpu")  # its directory has a copy
    assert isinstance(env.unwrapped.core.scorer, SparseScorer)


def test_reward_tokenizer_argument_names_a_loaded_reward_models_tokenizer(reward_dir):
    model = GPT2ForSequenceClassification.from_pretrained(reward_dir)
    env = gym.make("TokenRLHF-v0", reward_model=model, reward_tokenizer=str(reward_dir), device="cpu")
    assert isinstance(env.unwrapped.core.scorer, TextScorer)
    with pytest.raises(ValueError, match="reward model embeds only .*pass it as reward_tokenizer="):
        gym.make("TokenRLHF-v0", reward_model=model, device="cpu")  # ids of another vocabulary: refused


# --------------------------------------------------------------------------- 2. special-token text
def test_a_prompt_that_spells_the_reward_tokenizers_eos_reaches_the_reward_model_as_text(tmp_path):
    reward_tokenizer = eos_character_tokenizer()
    model = tiny_gpt2_classifier(len(reward_tokenizer), reward_tokenizer.pad_token_id)
    model.save_pretrained(tmp_path)
    reward_tokenizer.save_pretrained(tmp_path)
    prompt = "I liked <eos> it"
    with pytest.warns(UnknownTokensWarning, match="no token for the characters '<>'"):  # the policy's tokenizer
        env = gym.make(ENV_ID, prompts=[prompt], reward_model=str(tmp_path), max_new_tokens=2, device="cpu")
    env.reset(seed=0)
    *_, terminated, _, info = env.step(AutoTokenizer.from_pretrained(POLICY_DIR).eos_token_id)
    assert terminated
    ids = env.unwrapped.core.scorer.token_ids(0)
    assert ids == reward_tokenizer.convert_tokens_to_ids(list(prompt)) + [reward_tokenizer.cls_token_id]
    assert reward_tokenizer.eos_token_id not in ids
    assert reward_tokenizer.eos_token_id in reward_tokenizer(prompt)["input_ids"]  # what a plain call does
    with torch.no_grad():
        expected = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    assert info["score"] == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- 3. chat templates
def test_a_reward_model_with_its_own_template_reads_the_conversation_in_it(chat_tokenizer, tmp_path):
    reward_tokenizer = character_tokenizer()
    reward_tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(reward_tokenizer), n_positions=256, n_embd=16, n_layer=1, n_head=2, num_labels=1)
    config.pad_token_id = reward_tokenizer.pad_token_id
    GPT2ForSequenceClassification(config).eval().save_pretrained(tmp_path / "rm")
    reward_tokenizer.save_pretrained(tmp_path / "rm")

    env = chat_env(chat_tokenizer, prompts=CONVERSATIONS, reward_model=str(tmp_path / "rm"))
    env.reset(seed=0, options={"prompt_index": 1})
    great = chat_tokenizer.convert_tokens_to_ids("▁great")
    env.step(great)
    _, _, terminated, _, info = env.step(chat_tokenizer.eos_token_id)
    assert terminated
    text = reward_tokenizer.apply_chat_template(
        [*CONVERSATIONS[1], {"role": "assistant", "content": "great"}], tokenize=False
    )
    assert text == "[system]Be brief[user]The plot was[assistant]great"
    model = GPT2ForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        expected = float(model(**reward_tokenizer(text, return_tensors="pt")).logits[0, 0])
    assert np.isclose(info["score"], expected, atol=1e-5)


class OneReply:
    """Replies " and" to the first turn; the second ends the episode."""

    def respond(self, turn):
        from textenv.turns import Reply

        return Reply(text=" and") if turn.index == 0 else Reply(done=True)


def test_dense_text_scores_are_paid_per_turn(reward_dir):
    # a reward model with its own tokenizer, dense, in episodes of two turns: a turn's last token is paid the change
    # of the score of the text so far since the previous turn's end; no other step is paid (no KL here)
    policy_tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    limits = {"max_new_tokens": 4, "max_turns": 2, "max_env_tokens": 4}
    env = gym.make(ENV_ID, reward_model=str(reward_dir), prompts=PROMPTS[:1], interaction=OneReply(),
                   reward_mode="dense", kl_coef=0.0, device="cpu", **limits)  # fmt: skip
    env.reset(seed=0)
    great, dull, eos = (policy_tokenizer.convert_tokens_to_ids(w) for w in ("▁great", "▁dull", "<eos>"))
    prompt_ids = policy_tokenizer(PROMPTS[0])["input_ids"]
    head = policy_tokenizer.decode(prompt_ids, skip_special_tokens=True)

    def text(ids):
        return PROMPTS[0] + policy_tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)[len(head) :]

    rewards, context = [], []
    for action in (great, eos, dull, eos):
        observation, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        context = observation["input_ids"][observation["attention_mask"] == 1].tolist()[len(prompt_ids) :]
    assert terminated
    first_turn = direct_score(reward_dir, text([great, eos]))
    final = direct_score(reward_dir, text(context))
    assert rewards[0] == 0 and rewards[2] == 0  # tokens that end no turn
    assert rewards[1] == pytest.approx(first_turn - direct_score(reward_dir, PROMPTS[0]), abs=1e-5)
    assert rewards[3] == pytest.approx(final - first_turn, abs=1e-5)
    assert final != first_turn  # the reply and the second turn changed the text's score
