"""textenv/adapters/textarena.py: a TextArena game as an interaction.

GuessTheNumber (one player) and TicTacToe (two, against a fixed opponent) run offline. The agent's turn is the
action, the game's new messages are the reply and enter the context exactly (checked against the raw game played
beside the env), the game's final reward pays on the agent's last token, and the episodes pass the multi-turn
uncached recomputation (``tests/textenv/test_turns.py``).
"""

import random

import gymnasium as gym
import numpy as np
import pytest

from tests.textenv.adapters.conftest import EOS, Scorer, context_of, play_vector, text_ids
from tests.textenv.test_turns import KL_COEF, check
from textenv.adapters import no_score
from textenv.adapters.textarena import TextArenaGame, listed_moves

textarena = pytest.importorskip("textarena")

GUESS = dict(max_prompt_tokens=700, max_new_tokens=6, max_turns=6, max_env_tokens=250, kl_coef=KL_COEF)
TICTACTOE = dict(max_prompt_tokens=700, max_new_tokens=6, max_turns=4, max_env_tokens=500, kl_coef=KL_COEF)


def make(tokenizer, lms, game, seeds, settings):
    reference, policy = lms
    return gym.make("TokenRLHF-v0", prompts=game.rows(seeds), interaction=game, reward_fns={"none": no_score},
                    reference_model=reference, policy=policy, tokenizer=tokenizer, device="cpu",
                    **settings)  # fmt: skip


def raw_messages(env, seat: int) -> str:
    """What the adapter must append: the seat's new messages as '[SENDER] message' lines, its own left out."""
    _, messages = env.get_observation()
    return "\n".join(f"[{'GAME' if s < 0 else f'Player {s}'}] {m}" for s, m, _ in messages if s != seat)


def play_turn(env, tokenizer, text: str):
    """Write ``text`` then EOS; the last step's results."""
    for token in text_ids(tokenizer, text) + [EOS]:
        result = env.step(token)
    return result


def test_guess_the_number_replies_enter_the_context_and_the_final_reward_pays(tokenizer, lms):
    game = TextArenaGame("GuessTheNumber-v0")
    env = make(tokenizer, lms, game, [7], GUESS)
    observation, info = env.reset(seed=0)
    raw = textarena.make("GuessTheNumber-v0-raw")
    raw.reset(num_players=1, seed=7)
    assert info["prompt"] == raw_messages(raw, 0)  # the opening observation is the prompt
    low, high, turns = 1, 20, 0
    while True:
        guess = (low + high) // 2
        context = context_of({k: v[None] for k, v in observation.items()}, 0)
        observation, reward, terminated, truncated, info = play_turn(env, tokenizer, f"[{guess}]")
        done, _ = raw.step(f"[{guess}]")
        turns += 1
        if terminated or truncated:
            break
        expected = "\n" + raw_messages(raw, 0)
        assert tokenizer.decode(info["env_tokens"]) == expected
        turn = text_ids(tokenizer, f"[{guess}]") + [EOS]
        assert context_of({k: v[None] for k, v in observation.items()}, 0) == context + turn + text_ids(
            tokenizer, expected
        )
        low, high = (guess + 1, high) if "higher" in expected else (low, guess - 1)
    assert done and terminated and not truncated and turns <= 5
    assert info["turn_reward"] == raw.close()[0][0] == 1.0  # guessed: the game's reward, on the last token


def test_tictactoe_against_the_scripted_opponent(tokenizer, lms):
    """'first' plays the first cell listed as available: after O takes 4, 8, 2, 6 (a diagonal), X holds 0, 1, 3."""
    env = make(tokenizer, lms, TextArenaGame("TicTacToe-v0", opponent="first"), [3], TICTACTOE)
    env.reset(seed=0)
    replies = []
    for cell in (4, 8, 2, 6):
        _, _, terminated, truncated, info = play_turn(env, tokenizer, f"[{cell}]")
        replies.append(tokenizer.decode(info["env_tokens"]))
    assert [f"[Player 1] [{cell}]" in reply for reply, cell in zip(replies, (0, 1, 3))] == [True] * 3
    assert terminated and not truncated and info["turn_reward"] == 1.0  # a win pays +1


def test_a_callable_opponent_reads_its_observation_and_moves():
    seen = []

    def opponent(observation: str) -> str:
        seen.append(observation)
        return listed_moves(observation)[-1]

    game = TextArenaGame("TicTacToe-v0", opponent=opponent)
    row = game.rows([0])[0]
    from textenv.turns import Turn

    reply = game.respond(Turn(row["prompt"], row, [5, 6], [6], "[4]", 0))
    assert "Player 1 placed their symbol (X) in cell 8." in reply.text and "Available Moves" in seen[0]


def test_the_process_random_state_is_left_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    TextArenaGame("GuessTheNumber-v0").rows(range(3))
    assert random.random() == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(game="TicTacToe-v0", num_players=2), "needs opponent="),
        (dict(game="TicTacToe-v0", opponent="best"), "opponent must be one of"),
        (dict(game="TicTacToe-v0", opponent="first", player_id=2), "player_id must be a seat in 0..1"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextArenaGame(**kwargs)


def test_an_unknown_game_and_a_foreign_prompt_are_refused():
    with pytest.raises(ValueError, match="TextArena has no game 'NoSuchGame-v0'"):
        TextArenaGame("NoSuchGame-v0").rows([0])
    game = TextArenaGame("GuessTheNumber-v0")
    from textenv.turns import Turn

    with pytest.raises(ValueError, match="not with the row's 'opening'; build the prompts with rows"):
        game.respond(Turn("guess", {"seed": 0, "opening": "guess"}, [5, 6], [6], "[4]", 0))


CASES = [("GuessTheNumber-v0", None, GUESS, 90), ("TicTacToe-v0", "random", TICTACTOE, 50)]


@pytest.mark.parametrize(("name", "opponent", "settings", "steps"), CASES)
def test_episodes_match_uncached_recomputation(tokenizer, lms, name, opponent, settings, steps):
    """Three slots writing moves '[k]' (some invalid): every agent step's reference and policy log-probs, KL and
    reward against plain forwards over the final context, the game's replies and rewards included. (TicTacToe's
    replies are about 450 tokens, which the env's caches take one column per forward: fewer steps.)"""
    reference, policy = lms
    game = TextArenaGame(name, opponent=opponent)
    env = gym.make_vec("TokenRLHF-v0", num_envs=3, vectorization_mode="vector_entry_point",
                       prompts=game.rows(range(4)), interaction=game, reward_fns={"none": no_score},
                       reference_model=reference, policy=policy, tokenizer=tokenizer, device="cpu",
                       **settings)  # fmt: skip
    records = play_vector(env, tokenizer, lambda rng: f"[{rng.integers(0, 9 if opponent else 21)}]", steps)
    assert len(records) >= 3
    check(records, reference, Scorer(), policy=policy)
    assert any(t != 0 for r in records for t in r.turn_rewards)  # some games ended with a reward
    assert np.isfinite([r.score for r in records]).all()


def test_listed_moves_are_read_after_the_word_available():
    assert listed_moves("[GAME] Your available actions are: '[check]', '[bet]'") == ["[check]", "[bet]"]
    assert listed_moves("Available Moves: '[0]', '[4]'\n[Player 1] [4]\n[GAME] Player 1 placed X") == ["[0]", "[4]"]
    assert listed_moves("[GAME] Remove objects with '[pile quantity]'") == []


def test_kuhn_poker_plays_to_its_end_against_the_random_opponent():
    """The opponent moves first on some seeds (the opening then holds its move); every hand ends with a reward."""
    from textenv.turns import Turn

    game = TextArenaGame("KuhnPoker-v0", opponent="random")
    rows = game.rows(range(4))
    assert any("[Player 1]" in row["prompt"] for row in rows)  # the opponent opened these games
    for row in rows:
        context, text = [1], row["prompt"]
        for index in range(12):
            context = context + [7, index]
            reply = game.respond(Turn(row["prompt"], row, context, [index], listed_moves(text)[0], index))
            if reply.done:
                break
            context, text = context + [9, index], reply.text
        assert reply.done and reply.reward in (-1.0, 1.0)
