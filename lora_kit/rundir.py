"""Output directories: the contract every command writes (run.json, recipe.yaml) and atomic, refuse-to-overwrite
writing.

An output is built in a hidden temporary sibling and renamed into place, so an interrupted command never leaves a
directory that looks complete. `run.json` is what downstream commands read (base model, new token ids, stage).
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from lora_kit.errors import LorakitError

RUN_FILE = "run.json"


def version() -> str:
    """The installed lorakit version (recorded in run.json), or 0+unknown when it is not installed."""
    try:
        from importlib.metadata import version as v

        return v("lorakit")
    except Exception:
        return "0+unknown"


def is_finished(path: Path) -> bool:
    """True if `path` holds a finished run: run.json, which every command writes last."""
    return (Path(path) / RUN_FILE).is_file()


def check_writable(path: Path, force: bool, what: str = "output") -> None:
    """Refuse a directory holding another finished run or unrelated files, unless `force`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LorakitError(f"{path}: {what} path exists and is not a directory")
    if force or not path.exists() or not any(path.iterdir()):
        return
    if is_finished(path):
        raise LorakitError(f"{path}: holds a finished run; pass force=true (or --force) to overwrite, "
                           "or choose another output_dir")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a temporary file in the same directory, fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _owner() -> str:
    """Names this process in temporary directories: host (outputs may be on a shared filesystem) and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _dead(owner: str) -> bool:
    host, _, pid = owner.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's, or not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def clean_stale(path: Path) -> None:
    """Remove what a killed command (kill -9, power loss) left beside `path`: its half-built temporary directory,
    and, if it died between the two renames that replace an old output, put the old output back."""
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
        kind, _, rest = p.name[len(path.name) + 2:].partition("-")
        owner = rest.rsplit("-", 1)[0] if kind == "tmp" else rest  # tmp-OWNER-RANDOM, old-OWNER
        if kind not in ("tmp", "old") or not _dead(owner):
            continue
        if kind == "old" and not path.exists():
            os.replace(p, path)
        else:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` (old one removed only then)."""
    path = Path(path)
    clean_stale(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_owner()}-", dir=path.parent))
    except OSError as e:
        raise LorakitError(f"{path.parent}: cannot write here ({e.strerror})") from None
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{_owner()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LorakitError(f"{path}: could not write output ({e.strerror or e}); nothing was left behind") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_info(stage: str, base_model: str, *, seed: Optional[int] = None, new_token_ids: Optional[list[int]] = None,
             **extra) -> dict:
    """The `run.json` written in every output directory; `merge`, `pretrain` and `chat` read it back."""
    return {
        "lorakit_version": version(),
        "stage": stage,
        "base_model": str(base_model),
        "seed": seed,
        "new_token_ids": list(new_token_ids) if new_token_ids else [],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def read_run(path: Path) -> dict:
    """The run.json of a lorakit output directory, or {} when there is none."""
    p = Path(path) / RUN_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LorakitError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
