"""Rewards used by the GRPO tests (imported by `reward_fn=grpo_rewards:...`)."""

FIXED = [0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 9.0]  # two groups of four completions
TARGET = "的"


def fixed(prompts, responses):
    """The same rewards whatever was generated: advantages can then be computed by hand."""
    assert len(responses) == len(FIXED), len(responses)
    return list(FIXED)


def target_share(prompts, responses):
    """Share of response characters that are TARGET: rewards emitting one particular token."""
    return [r.count(TARGET) / max(len(r), 1) for r in responses]
