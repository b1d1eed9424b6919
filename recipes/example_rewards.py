"""An example reward function file, named on the command line as ``recipes/example_rewards.py:brevity``:

    python recipes/ppo.py --config recipes/configs/grpo_arithmetic.yaml --reward_funcs accuracy recipes/example_rewards.py:brevity --reward_weights 1 0.2

A reward function takes TRL's signature: ``prompts`` and ``completions`` (strings, or message lists for
conversational data), ``completion_ids`` and every other column of the prompt data as keyword lists, and returns
one float per completion, or None where it does not apply.
"""


def brevity(completions, completion_ids, **kwargs) -> list[float]:
    """1 for a response of at most 24 tokens, falling linearly to 0 at 48: an answer, not an essay."""
    return [min(1.0, max(0.0, (48 - len(ids)) / 24)) for ids in completion_ids]
