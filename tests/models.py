"""Small models built in code for the tests: no downloads, a few thousand parameters each."""

from transformers import GPT2Config


def tiny_gpt2_config(vocab_size: int, **kwargs) -> GPT2Config:
    """A one-layer GPT-2 of width 8 over ``vocab_size`` tokens, with the default task's special ids."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=8,
        n_layer=1,
        n_head=1,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    )
