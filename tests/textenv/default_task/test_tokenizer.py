import pytest
from transformers import AutoTokenizer

from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.default_task.corpus import generate_corpus, openings
from textenv.default_task.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


def test_pad_and_eos_are_distinct_tokens(tokenizer):
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens([tokenizer.pad_token_id, tokenizer.eos_token_id]) == ["<pad>", "<eos>"]


def test_round_trip_on_unseen_reviews(tokenizer):
    for review in generate_corpus(500, seed=123):
        ids = tokenizer(review.text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.eos_token_id not in ids  # encode adds no special tokens
        assert tokenizer.decode(ids) == review.text


def test_prompt_tokens_are_a_prefix_of_the_review_tokens(tokenizer):
    # The env appends response tokens to prompt tokens: that must spell the same text.
    for review in generate_corpus(200, seed=5):
        assert (
            tokenizer(review.text)["input_ids"][: len(tokenizer(review.opening)["input_ids"])]
            == tokenizer(review.opening)["input_ids"]
        )


def test_prompts_pad_on_the_left(tokenizer):
    batch = tokenizer(["The film was", "I thought the camera work was"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


def test_policy_and_reward_model_share_the_tokenizer():
    assert (
        AutoTokenizer.from_pretrained(REWARD_MODEL_DIR).get_vocab()
        == AutoTokenizer.from_pretrained(POLICY_DIR).get_vocab()
    )


def test_build_tokenizer_covers_every_word():
    tokenizer = build_tokenizer([r.text for r in generate_corpus(900, seed=0)] + openings())
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
    text = "Honestly, the soundtrack was truly unbearable. Avoid it at all costs."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
