"""The training stages, one module each (`sft`, `pretrain`, `rm`, `dpo`, `ppo/`): each has a recipe `Config` and
`run(config) -> Path`, and none imports another."""
