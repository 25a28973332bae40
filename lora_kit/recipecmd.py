"""`lorakit recipes`: list the shipped recipes with their stage and description, or show one resolved."""
from __future__ import annotations

import argparse
import importlib


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--show", metavar="NAME", help="print a recipe's resolved keys with their help text")


def main(args) -> int:
    from .cli import BY_NAME
    from .recipe import _header, describe, find_recipe, list_recipes, load_config, to_dict

    if not args.show:
        rows = list_recipes()
        width = max((len(r[0]) for r in rows), default=4)
        for name, stage, desc, _ in rows:
            print(f"{name:<{width}}  lorakit {stage:<8}  {desc}")
        return 0
    path = find_recipe(args.show)
    stage = _header(path)[0]
    config_cls = importlib.import_module(BY_NAME[stage].module).Config
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
