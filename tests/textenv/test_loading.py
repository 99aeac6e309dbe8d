"""textenv/loading.py: what the env loads and checks before its first step.

1. Prompt sources: lists, text files, JSON and JSON lines files, datasets and their columns, splits, missing files.
2. Chat conversations as prompts, through the tokenizer's chat template; malformed ones and special-token text in a
   message are refused.
3. Prompts longer than max_prompt_tokens are refused, or cut on the left; special-token text in a prompt stays text.
4. Vocabulary mismatches are refused at construction: the tokenizer and a model disagree, prompts the tokenizer
   writes mostly as <unk> (another task's tokenizer or model), special ids outside the model, a reward tokenizer
   larger than the reward model; a few unknown characters are warned about.
5. Models: paths that do not exist, a loaded reference model without a tokenizer, reward models of the wrong kind
   (a causal LM, two labels) and a reward model directory with the policy's tokenizer.
6. The frozen models: no gradients, eval mode, and dropout rates kept as numbers zeroed even in train mode.

Every tokenizer and model is the default task's or built in code.
"""

import functools
import json
import string

import gymnasium as gym
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from tests.models import (
    CONVERSATIONS,
    chat_env,
    check_layout,
    eos_character_tokenizer,
    real_tokens,
    tiny_causal_lm,
    tiny_gpt2_classifier,
    tiny_gpt2_config,
    tiny_gpt2_lm,
    zero,
)
from textenv.arithmetic import POLICY_DIR as ARITHMETIC_POLICY_DIR
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR, load_prompts
from textenv.loading import UnknownTokensWarning, read_prompt_rows

ENV_ID = "TokenRLHF-v0"


@pytest.fixture(scope="module")
def make_vec(make_vec):
    """The shared vector-env factory (tests/conftest.py) on the env's default device, as a user gets it."""
    return functools.partial(make_vec, device=None)


# --------------------------------------------------------------------------- 1. prompt sources
class FakeDataset:
    """The part of ``datasets.Dataset`` the env uses: ``column_names`` and ``dataset[column] -> list``."""

    def __init__(self, columns: dict[str, list]):
        self._columns = columns

    @property
    def column_names(self):
        return list(self._columns)

    def __getitem__(self, column):
        return list(self._columns[column])


PROMPTS = ["The movie was", "I thought the acting was", "Overall the cast is"]


def assert_prompts(env, expected):
    assert env.unwrapped.core.prompts == expected
    for index, prompt in enumerate(expected):
        _, info = env.reset(options={"prompt_index": index})
        assert info["prompt"] == prompt and info["prompt_index"] == index
    with pytest.raises(ValueError, match=f"0..{len(expected) - 1}"):
        env.reset(options={"prompt_index": len(expected)})


def test_prompts_from_list():
    assert_prompts(gym.make(ENV_ID, prompts=PROMPTS), PROMPTS)
    assert_prompts(gym.make(ENV_ID, prompts=tuple(PROMPTS)), PROMPTS)


def test_prompts_from_text_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    assert_prompts(gym.make(ENV_ID, prompts=path), PROMPTS)
    assert_prompts(gym.make(ENV_ID, prompts=str(path)), PROMPTS)


def test_prompts_from_dataset():
    dataset = FakeDataset({"prompt": PROMPTS, "label": [0, 1, 2]})
    assert_prompts(gym.make(ENV_ID, prompts=dataset), PROMPTS)
    other = FakeDataset({"query": PROMPTS[::-1]})
    assert_prompts(gym.make(ENV_ID, prompts=other, prompt_column="query"), PROMPTS[::-1])


def test_default_prompts_are_the_train_split(env):
    assert env.unwrapped.core.prompts == load_prompts("train")


def test_vector_env_prompts_from_list(make_vec):
    vec = make_vec(2, prompts=PROMPTS)
    _, info = vec.reset(options={"prompt_index": [2, 0]})
    assert info["prompt"].tolist() == [PROMPTS[2], PROMPTS[0]]


def test_prompts_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "prompts.txt"
    with pytest.raises(FileNotFoundError, match=f"prompts file '{missing}' does not exist"):
        gym.make(ENV_ID, prompts=missing)
    with pytest.raises(FileNotFoundError, match=f"prompts file '{missing}' does not exist"):
        gym.make(ENV_ID, prompts=str(missing))


def test_dataset_without_prompt_column():
    dataset = FakeDataset({"text": ["a b"], "label": [1]})
    with pytest.raises(ValueError, match=r"no column 'prompt' \(it has \['text', 'label'\]\); pass prompt_column="):
        gym.make(ENV_ID, prompts=dataset)
    with pytest.raises(ValueError, match="no column 'query'"):
        gym.make(ENV_ID, prompts=dataset, prompt_column="query")


ROWS = [{"prompt": "The movie was", "answer": "a"}, {"prompt": "I thought the film", "answer": "b"}]
EXPECTED = (["The movie was", "I thought the film"], [{"answer": "a"}, {"answer": "b"}])


@pytest.mark.parametrize("name", ["rows.json", "rows.JSONL", "rows.Jsonl", "rows.ndjson"])
def test_json_lines_are_rows_whatever_the_suffixs_case(tmp_path, name):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))  # what datasets' to_json writes
    assert read_prompt_rows(str(path)) == EXPECTED


def test_a_json_file_may_hold_one_json_list(tmp_path):
    path = tmp_path / "rows.JSON"
    path.write_text(json.dumps(ROWS, indent=2))
    assert read_prompt_rows(path) == EXPECTED
    path.write_text(json.dumps({"prompt": ["a", "b"], "answer": ["x", "y"]}, indent=2))
    with pytest.raises(ValueError, match=r"rows.JSON' holds a JSON dict; a .json prompt file holds a JSON list"):
        read_prompt_rows(path)


def test_json_lines_in_a_text_file_are_refused(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    with pytest.raises(ValueError, match=r"rows.txt' holds JSON lines .*rename it to .jsonl"):
        read_prompt_rows(str(path))
    path.write_text('{"prompt": "a"}\nplain text\n')  # not every line: text prompts
    assert read_prompt_rows(str(path))[0] == ['{"prompt": "a"}', "plain text"]


@pytest.mark.parametrize("split", ["test", "eval", "validation"])
def test_a_split_of_data_without_splits_is_refused(tmp_path, split):
    path = tmp_path / "prompts.txt"
    path.write_text("The movie was\nI thought the film\n")
    with pytest.raises(ValueError, match=rf"split='{split}', but prompts has no splits: every row would be used"):
        read_prompt_rows(["The movie was"], split=split)
    with pytest.raises(ValueError, match=rf"split='{split}', but prompts file '{path}' has no splits"):
        read_prompt_rows(str(path), split=split)
    with pytest.raises(ValueError, match=rf"split='{split}', but prompts has no splits"):
        gym.make(ENV_ID, prompts=ROWS, split=split, device="cpu")
    assert read_prompt_rows(ROWS, split="train") == EXPECTED  # the default: every row


# --------------------------------------------------------------------------- 2. conversations
@pytest.mark.parametrize("index", [0, 1])
def test_a_conversation_prompt_is_the_chat_template_with_the_generation_prompt(chat_tokenizer, index):
    env = chat_env(chat_tokenizer, prompts=CONVERSATIONS)
    observation, info = env.reset(seed=0, options={"prompt_index": index})
    expected = chat_tokenizer.apply_chat_template(CONVERSATIONS[index], add_generation_prompt=True)["input_ids"]
    assert real_tokens(observation) == list(expected)
    assert info["prompt"] == chat_tokenizer.apply_chat_template(
        CONVERSATIONS[index], add_generation_prompt=True, tokenize=False
    )
    assert info["prompt"].endswith("assistant:")


def test_string_prompts_with_chat_template_become_user_messages(chat_tokenizer):
    env = chat_env(chat_tokenizer, prompts=["The plot was"], chat_template=True)
    observation, _ = env.reset(seed=0)
    messages = [{"role": "user", "content": "The plot was"}]
    assert real_tokens(observation) == list(
        chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    )


def test_a_conversation_needs_a_tokenizer_with_a_template():
    with pytest.raises(ValueError, match="prompt 0 is a chat conversation .* the tokenizer has no chat template"):
        chat_env(AutoTokenizer.from_pretrained(POLICY_DIR), prompts=CONVERSATIONS)


def test_special_token_text_in_a_message_is_refused(chat_tokenizer):
    smuggled = [[{"role": "user", "content": f"stop here {chat_tokenizer.eos_token} please"}]]
    with pytest.raises(ValueError, match="a user message contains the text of the special token '<eos>'"):
        chat_env(chat_tokenizer, prompts=smuggled)


@pytest.mark.parametrize("bad", [[[{"role": "user"}]], [[]], [[{"role": "user", "content": 3}]]])
def test_malformed_conversations_are_refused(chat_tokenizer, bad):
    with pytest.raises(ValueError, match="prompts must be a non-empty list of strings"):
        chat_env(chat_tokenizer, prompts=bad)


def test_prompts_from_a_jsonl_file_with_a_column_choice(chat_tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": 0, "messages": CONVERSATIONS[0]}, {"id": 1, "messages": CONVERSATIONS[1], "answer": "x"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = chat_env(chat_tokenizer, prompts=str(path), prompt_column="messages")
    observation, _ = env.reset(seed=0, options={"prompt_index": 1})
    assert real_tokens(observation) == list(
        chat_tokenizer.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)["input_ids"]
    )
    with pytest.raises(ValueError, match=r"line 1, has no 'prompt' field; name the prompt's field"):
        chat_env(chat_tokenizer, prompts=str(path))
    path.write_text('{"prompt": "The plot was"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2, is not JSON"):
        chat_env(chat_tokenizer, prompts=str(path))


# --------------------------------------------------------------------------- 3. prompt length
LONG_PROMPT = (
    "I thought the acting was great and the plot was moving and the soundtrack was excellent and the cast was superb"
)


def test_prompt_longer_than_max_prompt_tokens_raises_by_default():
    with pytest.raises(
        ValueError, match=r"prompt 1 has 21 tokens, more than max_prompt_tokens=16.*prompt_truncation='left'"
    ):
        gym.make(ENV_ID, prompts=["short one", LONG_PROMPT])


def test_prompt_truncation_left_keeps_last_tokens(tokenizer):
    env = gym.make(ENV_ID, prompts=["short one", LONG_PROMPT], prompt_truncation="left", max_new_tokens=4)
    full = tokenizer(LONG_PROMPT)["input_ids"]
    assert len(full) == 21
    obs, info = env.reset(options={"prompt_index": 1})
    assert info["prompt"] == LONG_PROMPT
    check_layout(obs, full[-16:], [], env.unwrapped.core.pad_token_id, 20)
    obs, _ = env.reset(options={"prompt_index": 0})  # short prompts are untouched
    check_layout(obs, tokenizer("short one")["input_ids"], [], env.unwrapped.core.pad_token_id, 20)


@pytest.mark.parametrize("tokenizer_source", ["loaded", "directory"])
def test_special_token_text_in_a_prompt_stays_text(tokenizer_source, tokenizer, tmp_path, make_env):
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt = f"great movie {tokenizer.eos_token} {tokenizer.pad_token}"
    # the hazard: tokenized as plain input, the marker text becomes the special tokens themselves
    assert {eos_id, pad_id} <= set(tokenizer(prompt)["input_ids"])
    expected = tokenizer(prompt, split_special_tokens=True)["input_ids"]
    assert eos_id not in expected and pad_id not in expected

    source = tokenizer
    if tokenizer_source == "directory":
        tokenizer.save_pretrained(tmp_path / "tok")
        source = str(tmp_path / "tok")
    env = make_env(prompts=[prompt, "a plain one"], tokenizer=source, max_new_tokens=4)
    obs, info = env.reset(options={"prompt_index": 0})
    assert info["prompt"] == prompt
    real = obs["input_ids"][obs["attention_mask"] == 1].tolist()
    assert eos_id not in real and pad_id not in real
    assert real == expected
    # the episode is not over: the EOS text in the prompt ended nothing
    _, _, terminated, truncated, _ = env.step(5)
    assert not terminated and not truncated


# --------------------------------------------------------------------------- 4. vocabularies
def test_tokenizer_and_reference_vocabularies_disagree():
    small = GPT2LMHeadModel(tiny_gpt2_config(10))
    with pytest.raises(ValueError, match="the tokenizer has 446 tokens but the reference model predicts only 10"):
        gym.make(ENV_ID, reference_model=small, tokenizer=POLICY_DIR)


def test_tokenizer_and_reward_model_vocabularies_disagree():
    small = GPT2ForSequenceClassification(tiny_gpt2_config(10, num_labels=1))
    with pytest.raises(ValueError, match="the tokenizer has 446 tokens but the reward model embeds only 10"):
        gym.make(ENV_ID, reward_model=small)


UNFIT = r"100%\) are the tokenizer's unknown token '<unk>': it has no token for the characters .*does not fit"


def test_another_tasks_tokenizer_is_refused_at_construction():
    with pytest.raises(ValueError, match=UNFIT):
        gym.make(ENV_ID, tokenizer=ARITHMETIC_POLICY_DIR, device="cpu")


def test_another_tasks_model_is_refused_at_construction():
    with pytest.raises(ValueError, match=UNFIT):
        gym.make(ENV_ID, task="reviews", reference_model=ARITHMETIC_POLICY_DIR, device="cpu")


def test_a_few_unknown_characters_are_warned_about_with_the_share():
    with pytest.warns(UnknownTokensWarning, match=r"1 of the \d+ prompt tokens \(\d+%\) .*characters '~'"):
        gym.make(ENV_ID, prompts=["The plot was ~ fine", "I liked it"], device="cpu")


def test_a_special_id_outside_the_model_is_refused():
    vocab = {"[PAD]": 0, "[UNK]": 1} | {ch: i + 2 for i, ch in enumerate(string.ascii_lowercase + " ")} | {"[EOS]": 90}
    core = Tokenizer(models.WordLevel(vocab, "[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    assert len(tokenizer) <= 40 < tokenizer.eos_token_id
    with pytest.raises(
        ValueError, match=r"EOS token '\[EOS\]' has the id 90, but the reference model predicts only 40"
    ):
        gym.make(
            ENV_ID,
            reference_model=tiny_gpt2_lm(40),
            tokenizer=tokenizer,
            prompts=["a b"],
            reward_fns=[zero],
            device="cpu",
        )


def test_a_reward_tokenizer_larger_than_the_reward_model_is_refused_at_construction():
    reward_tokenizer = eos_character_tokenizer()
    small = tiny_gpt2_classifier(50, reward_tokenizer.pad_token_id)
    with pytest.raises(
        ValueError,
        match=rf"reward model's tokenizer has {len(reward_tokenizer)} tokens but the reward model embeds only 50: .*"
        "IndexError.*reward_tokenizer=",
    ):
        gym.make(ENV_ID, reward_model=small, reward_tokenizer=reward_tokenizer, device="cpu")


# --------------------------------------------------------------------------- 5. models
def test_loaded_reference_model_needs_tokenizer():
    model = GPT2LMHeadModel(tiny_gpt2_config(446))
    with pytest.raises(ValueError, match="pass tokenizer= when reference_model is a loaded module"):
        gym.make(ENV_ID, reference_model=model)


@pytest.mark.parametrize("argument", ["reference_model", "reward_model", "tokenizer"])
def test_model_path_that_does_not_exist(tmp_path, argument):
    missing = tmp_path / "no_such_model"
    extra = {"tokenizer": POLICY_DIR} if argument == "reference_model" else {}
    what = argument.replace("_model", " model")
    with pytest.raises(FileNotFoundError, match=rf"{what} path '{missing}' does not exist"):
        gym.make(ENV_ID, **{argument: str(missing)}, **extra)
    with pytest.raises(FileNotFoundError, match=rf"{what} path '{missing}' does not exist"):
        gym.make(ENV_ID, **{argument: missing}, **extra)  # a pathlib.Path too


def test_reference_model_path_missing_without_tokenizer_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"reference model .*'{missing}' does not exist"):
        gym.make(ENV_ID, reference_model=missing)


@pytest.mark.parametrize("reward_mode", ["sparse", "dense"])
def test_reward_model_with_two_outputs_is_rejected_at_construction(vocab_size, reward_mode):
    torch.manual_seed(0)
    two_labels = GPT2ForSequenceClassification(tiny_gpt2_config(vocab_size, num_labels=2))
    with pytest.raises(
        ValueError, match=r"one scalar per sequence, shape \(batch, 1\), but gave \(1, 2\).*num_labels=1"
    ):
        gym.make(ENV_ID, reward_model=two_labels, reward_mode=reward_mode, max_new_tokens=3)


def test_causal_lm_directory_as_reward_model_is_refused(make_env):
    with pytest.raises(ValueError, match=r"reward model .* is a GPT2LMHeadModel, not a sequence classifier"):
        make_env(reward_model=str(POLICY_DIR))


def test_two_label_classifier_directory_as_reward_model_is_refused(tmp_path, make_env):
    torch.manual_seed(0)
    GPT2ForSequenceClassification(tiny_gpt2_config(446, num_labels=2)).save_pretrained(tmp_path / "rm2")
    with pytest.raises(ValueError, match=r"reward model .*rm2.* has a classifier head with 2 labels.*num_labels=1"):
        make_env(reward_model=str(tmp_path / "rm2"))


def save_reward_model_with(tokenizer, directory):
    AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_reward_model_directory_with_the_policy_tokenizer_is_accepted(tokenizer, tmp_path, make_env):
    directory = save_reward_model_with(tokenizer, tmp_path / "rm")
    env = make_env(reward_model=directory, max_new_tokens=2)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(tokenizer.eos_token_id)
    assert terminated and np.isfinite(reward) and info["score"] is not None


# --------------------------------------------------------------------------- 6. frozen models
def assert_frozen(model):
    assert not model.training
    assert all(not module.training for module in model.modules())
    assert all(not parameter.requires_grad for parameter in model.parameters())


def test_default_models_are_frozen(env):
    core = env.unwrapped.core
    assert_frozen(core.reference.model)
    assert_frozen(core.reward_model)


def test_passed_models_are_frozen(vocab_size, make_vec):
    reference = GPT2LMHeadModel(tiny_gpt2_config(vocab_size)).train()
    reward_model = GPT2ForSequenceClassification(tiny_gpt2_config(vocab_size, num_labels=1)).train()
    assert reference.training and all(p.requires_grad for p in reference.parameters())
    env = gym.make(ENV_ID, reference_model=reference, reward_model=reward_model, tokenizer=POLICY_DIR)
    core = env.unwrapped.core
    assert core.reference.model is reference and core.reward_model is reward_model
    assert_frozen(core.reference.model)
    assert_frozen(core.reward_model)
    vec = make_vec(2)
    assert_frozen(vec.core.reference.model)
    assert_frozen(vec.core.reward_model)


def tiny_llama(dropout):
    return tiny_causal_lm("llama", attention_dropout=dropout).train()


def tiny_opt(dropout):
    return tiny_causal_lm("opt", dropout=dropout, attention_dropout=dropout).train()


def train_mode_logits(model):
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        return [model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits for _ in range(2)]


@pytest.mark.parametrize(
    ("build", "fields"), [(tiny_llama, ["attention_dropout"]), (tiny_opt, ["dropout", "attention_dropout"])]
)
def test_frozen_reference_model_has_no_dropout_even_in_train_mode(build, fields, tokenizer, make_env):
    torch.manual_seed(0)
    control = build(0.5)  # the premise: with these rates, two train-mode forwards differ
    first, second = train_mode_logits(control)
    assert not torch.equal(first, second)

    torch.manual_seed(0)
    env = make_env(reference_model=build(0.5), tokenizer=tokenizer, max_new_tokens=4)
    reference = env.unwrapped.reference_model
    for field in fields:
        assert getattr(reference.config, field) == 0.0, field
    first, second = train_mode_logits(reference)
    assert torch.equal(first, second)
