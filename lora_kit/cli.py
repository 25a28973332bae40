"""`lorakit <command>`: parse the command line and dispatch through the command table (`commands.py`); user errors
become one line on stderr, never a traceback. No logic of its own.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from typing import Optional, Sequence

from lora_kit.commands import BY_NAME, COMMANDS, Command
from lora_kit.errors import LorakitError
from lora_kit.recipe import describe, dump_yaml, load_config
from lora_kit.rundir import AlreadyComplete, closing_runs


def _recipe_parser(cmd: Command, config_cls) -> argparse.ArgumentParser:
    keys = "\n".join(f"  {k} ({t}, default {d!r}): {h}" for k, t, d, h in describe(config_cls))
    p = argparse.ArgumentParser(
        prog=f"lorakit {cmd.name}", description=cmd.help, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"recipe keys (override any as key=value, nested as section.key=value):\n{keys}")
    p.add_argument("--recipe", default=cmd.recipe, help=f"recipe name or YAML path (default: {cmd.recipe})")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--dry-run", action="store_true", help="load model and data, show the run, then stop")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (launched through torchrun)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    return p


def _run_recipe_stage(cmd: Command, module, argv: list[str]) -> int:
    args = _recipe_parser(cmd, module.Config).parse_args(argv)
    config = load_config(module.Config, args.recipe, args.overrides)
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    # lazy imports here: `lorakit --help` and --print-config must not pay for torch and transformers
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from lora_kit.training.launch import relaunch

        return relaunch(args.nproc, [cmd.name, *argv])
    from lora_kit.training.interrupt import handled

    try:  # a failed run's output_dir is put back as it was, its lock released; SIGINT/SIGTERM during training:
        with closing_runs(), handled():  # checkpoint at the step boundary, then Interrupted (training/interrupt.py)
            out = module.run(config, dry_run=args.dry_run) if args.dry_run else module.run(config)
    except AlreadyComplete as e:
        print(f"lorakit {cmd.name}: {e}")
        return 0
    if out is not None:
        print(f"lorakit: {cmd.name} finished: {out}")
    return 0


DISK_ERRORS = ("No space left on device", "File too large", "Disk quota exceeded")
WRITER_ERRORS = ("iostream error", "PytorchStreamWriter failed", "unexpected pos")  # torch.save's, which has no errno


def write_failure(e: Optional[BaseException], argv: Sequence[str] = ()) -> Optional[str]:
    """Why a library failed to write a file (torch.save raises RuntimeError, safetensors its own error, neither an
    OSError), from the exception and the ones it happened while handling; None for any other exception. Names the
    file when an exception in the chain carries it, else the command's output directory from `argv`."""
    chain, filename = [], None
    while e is not None and len(chain) < 10:
        chain.append(str(e))
        filename = filename or getattr(e, "filename", None)
        e = e.__cause__ or e.__context__
    what = f"could not write {filename}" if filename else "could not write a file"
    out = None if filename else output_of(argv)
    what += f" under {out}" if out else ""
    for phrase in DISK_ERRORS:
        if any(phrase in text for text in chain):
            return f"{what} ({phrase})"
    if any(w in text for w in WRITER_ERRORS for text in chain):
        return f"{what} (is the disk full?)"
    return None


def output_of(argv: Sequence[str]) -> Optional[str]:
    """The output directory a command line names (`output_dir=X`, `--output X`, `--output=X`, `-o X`), if any."""
    for i, a in enumerate(argv):
        if a.startswith(("output_dir=", "--output=")):
            return a.split("=", 1)[1] or None
        if a in ("--output", "-o") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def interrupted(e: KeyboardInterrupt, argv: list[str]) -> str:
    """The line for a run stopped by a signal: where its checkpoint is and the command that continues it."""
    name = str(e) or "SIGINT"
    checkpoint = getattr(e, "checkpoint", None)
    if checkpoint is None:
        return f"interrupted ({name})"
    again = shlex.join(["lorakit", *[a for a in argv if not a.startswith("resume=")], "resume=true"])
    return f"stopped by {name}; checkpoint saved: {checkpoint}; continue with: {again}"


def close_bars() -> None:
    """End the progress bars an exception left open, so the error starts its own line instead of the bar's."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def main(argv: Optional[list[str]] = None) -> int:
    """Parse `lorakit COMMAND ...` and run it; a LorakitError or OS error prints one line. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(len(c.name) for c in COMMANDS)
    listing = "\n".join(f"  {c.name:<{width}}  {c.help}" for c in COMMANDS)
    top = argparse.ArgumentParser(prog="lorakit", formatter_class=argparse.RawDescriptionHelpFormatter,
                                  description="Adapt open LLMs to Chinese with LoRA/QLoRA.",
                                  epilog=f"commands:\n{listing}\n\n"
                                         "`lorakit COMMAND --help` for each command's options.")
    top.add_argument("command", nargs="?", choices=[c.name for c in COMMANDS], metavar="COMMAND")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] not in BY_NAME:
        top.parse_args(argv[:1])  # prints the usage error with the valid choices
    cmd = BY_NAME[argv[0]]
    try:
        module = importlib.import_module(cmd.module)
        if cmd.recipe:
            return _run_recipe_stage(cmd, module, argv[1:])
        parser = argparse.ArgumentParser(prog=f"lorakit {cmd.name}", description=cmd.help)
        module.add_arguments(parser)
        return int(module.main(parser.parse_args(argv[1:])) or 0)
    except LorakitError as e:
        close_bars()
        print(f"lorakit {cmd.name}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except OSError as e:  # full disk, vanished or unwritable paths: one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        close_bars()
        print(f"lorakit {cmd.name}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:
        reason = write_failure(e, argv)
        if reason is None:
            raise  # a bug: keep the traceback
        close_bars()
        print(f"lorakit {cmd.name}: error: {reason}; free some space and run the command again "
              "(training: with resume=true)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or training.interrupt.Interrupted (not imported here: it loads torch)
        close_bars()
        print(f"lorakit {cmd.name}: {interrupted(e, argv)}", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
