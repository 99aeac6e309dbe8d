"""Chat models: conversations through the chat template, prompts from JSON lines, a reward model's own template."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from textenv.default_task import POLICY_DIR

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Review the film"}],
    [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "The plot was"}],
]


@pytest.fixture
def chat_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def real_tokens(observation) -> list[int]:
    return observation["input_ids"][observation["attention_mask"] == 1].tolist()


def make(tokenizer, **kwargs):
    return gym.make("TokenRLHF-v0", tokenizer=tokenizer, max_prompt_tokens=40, max_new_tokens=4, device="cpu", **kwargs)


@pytest.mark.parametrize("index", [0, 1])
def test_a_conversation_prompt_is_the_chat_template_with_the_generation_prompt(chat_tokenizer, index):
    env = make(chat_tokenizer, prompts=CONVERSATIONS)
    observation, info = env.reset(seed=0, options={"prompt_index": index})
    expected = chat_tokenizer.apply_chat_template(CONVERSATIONS[index], add_generation_prompt=True)["input_ids"]
    assert real_tokens(observation) == list(expected)
    assert info["prompt"] == chat_tokenizer.apply_chat_template(
        CONVERSATIONS[index], add_generation_prompt=True, tokenize=False
    )
    assert info["prompt"].endswith("assistant:")


def test_string_prompts_with_chat_template_become_user_messages(chat_tokenizer):
    env = make(chat_tokenizer, prompts=["The plot was"], chat_template=True)
    observation, _ = env.reset(seed=0)
    messages = [{"role": "user", "content": "The plot was"}]
    assert real_tokens(observation) == list(
        chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    )


def test_a_conversation_needs_a_tokenizer_with_a_template():
    with pytest.raises(ValueError, match="prompt 0 is a chat conversation .* the tokenizer has no chat template"):
        make(AutoTokenizer.from_pretrained(POLICY_DIR), prompts=CONVERSATIONS)


def test_special_token_text_in_a_message_is_refused(chat_tokenizer):
    smuggled = [[{"role": "user", "content": f"stop here {chat_tokenizer.eos_token} please"}]]
    with pytest.raises(ValueError, match="a user message contains the text of the special token '<eos>'"):
        make(chat_tokenizer, prompts=smuggled)


@pytest.mark.parametrize("bad", [[[{"role": "user"}]], [[]], [[{"role": "user", "content": 3}]]])
def test_malformed_conversations_are_refused(chat_tokenizer, bad):
    with pytest.raises(ValueError, match="prompts must be a non-empty list of strings"):
        make(chat_tokenizer, prompts=bad)


def test_prompts_from_a_jsonl_file_with_a_column_choice(chat_tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": 0, "messages": CONVERSATIONS[0]}, {"id": 1, "messages": CONVERSATIONS[1], "answer": "x"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = make(chat_tokenizer, prompts=str(path), prompt_column="messages")
    observation, _ = env.reset(seed=0, options={"prompt_index": 1})
    assert real_tokens(observation) == list(
        chat_tokenizer.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)["input_ids"]
    )
    with pytest.raises(ValueError, match=r"line 1, has no 'prompt' field; name the prompt's field"):
        make(chat_tokenizer, prompts=str(path))
    path.write_text('{"prompt": "The plot was"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2, is not JSON"):
        make(chat_tokenizer, prompts=str(path))


def test_a_reward_model_with_its_own_template_reads_the_conversation_in_it(chat_tokenizer, tmp_path):
    from tests.textenv.test_reward_tokenizer import character_tokenizer

    reward_tokenizer = character_tokenizer()
    reward_tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(reward_tokenizer), n_positions=256, n_embd=16, n_layer=1, n_head=2, num_labels=1)
    config.pad_token_id = reward_tokenizer.pad_token_id
    GPT2ForSequenceClassification(config).eval().save_pretrained(tmp_path / "rm")
    reward_tokenizer.save_pretrained(tmp_path / "rm")

    env = make(chat_tokenizer, prompts=CONVERSATIONS, reward_model=str(tmp_path / "rm"))
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
