"""Rule-based rewards used by the PPO tests (imported by `reward_fn=ppo_rewards:...`)."""


def ascii_share(prompts, responses):
    """Share of response characters that are ASCII letters: rewards emitting Latin-letter tokens."""
    return [sum(c.isascii() and c.isalpha() for c in r) / max(len(r), 1) for r in responses]


def de_share(prompts, responses):
    """Share of response characters that are 的: rewards emitting one particular token."""
    return [r.count("的") / max(len(r), 1) for r in responses]


COMMON = set("的是一也不这我了有为人在个好很")


def common_share(prompts, responses):
    """Share of response characters among 15 very common Chinese characters: a dense rule-based reward."""
    return [sum(c in COMMON for c in r) / max(len(r), 1) for r in responses]
