"""Rewards used by the GRPO tests (imported by `reward_fn=grpo_rewards:...`)."""

FIXED = [0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 9.0]  # two groups of four completions
TARGET = "的"  # tests set it to a token of their model


def fixed(prompts, responses):
    """The same rewards whatever was generated: advantages can then be computed by hand."""
    assert len(responses) == len(FIXED), len(responses)
    return list(FIXED)


def starts_with_target(prompts, responses):
    """1 for a response that starts with TARGET: rewards one particular first token."""
    return [float(r.startswith(TARGET)) for r in responses]
