"""`lorakit recipes`: list the shipped recipes with their stage and description, or show one resolved."""
from __future__ import annotations

import argparse

from lora_kit.commands import stage_module
from lora_kit.recipe import describe, find_recipe, list_recipes, load_config, recipe_header, to_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--show NAME."""
    p.add_argument("--show", metavar="NAME", help="print a recipe's resolved keys with their help text")


def main(args) -> int:
    """List the recipes, or print one's resolved keys."""
    if not args.show:
        rows = list_recipes()
        width = max((len(r[0]) for r in rows), default=4)
        for name, stage, desc, _ in rows:
            print(f"{name:<{width}}  lorakit {stage:<8}  {desc}")
        return 0
    path = find_recipe(args.show)
    stage = recipe_header(path)[0]
    config_cls = stage_module(stage).Config
    config = load_config(config_cls, str(path))
    print(f"# {path}  (lorakit {stage})")
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            walk(v, prefix + k + ".") if isinstance(v, dict) else flat.__setitem__(prefix + k, v)

    walk(to_dict(config))
    for key, _, _, help_text in describe(config_cls):
        print(f"{key} = {flat[key]!r}    # {help_text}")
    return 0
