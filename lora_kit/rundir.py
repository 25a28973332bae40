"""Output directories: the contract every command writes (run.json, recipe.yaml) and atomic, refuse-to-overwrite
writing, and RunDir: what a training run may do to its output_dir.

An output is built in a hidden temporary sibling and renamed into place, so an interrupted command never leaves a
directory that looks complete. `run.json` is what downstream commands read (base model, new token ids, stage).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import fnmatch
import glob
import json
import os
import shutil
import socket
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from lora_kit.errors import LorakitError

RUN_FILE = "run.json"


def version() -> str:
    """The installed lorakit version (recorded in run.json), or 0+unknown when it is not installed."""
    try:
        return metadata.version("lorakit")
    except Exception:
        return "0+unknown"


def is_finished(path: Path) -> bool:
    """True if `path` holds a finished run: run.json, which every command writes last."""
    return (Path(path) / RUN_FILE).is_file()


def check_writable(path: Path, force: bool, what: str = "output") -> None:
    """The rule for an output replaced as a whole (merge, svd, extract-lora, extend-vocab, eval suites): an absent or
    empty directory is written; a lorakit output only with `force`; anything else never, whatever `force` says."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LorakitError(f"{path}: {what} path exists and is not a directory")
    if not path.exists() or not any(path.iterdir()):
        return
    if not is_lorakit_output(path):
        raise _foreign(path)
    if not force:
        raise LorakitError(f"{path}: holds a finished run; pass force=true (or --force) to overwrite, "
                           "or choose another output_dir")


# ---------------------------------------------------------------------------------------------------- training runs
# What a training run writes at the top of its output_dir (fnmatch patterns); `force` moves only these aside, and
# inside checkpoints/ only checkpoint-N. Anything else (the user's, the pipeline's stage.json and eval.json) stays.
CHECKPOINTS = "checkpoints"
LOCK = ".lorakit.lock"
PREVIOUS = ".lorakit-previous"
SUBRUNS = ("phase1", "phase2")  # pretrain's phases: runs of their own inside the run
OWNED = ("run.json", "recipe.yaml", "metrics.jsonl", "loss.png", "samples.jsonl", "README.md", "adapter_config.json",
         "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
         "special_tokens_map.json", "added_tokens.json",
         "chat_template.jinja", "vocab.json", "merges.txt", "value", "logs", CHECKPOINTS,
         *SUBRUNS)
OWNED_TEMPS = (".*.tmp", ".*.tmp.*", ".value-tmp", ".write-test-*", *(f".{p}.*" for p in OWNED))  # half-written
IN_CHECKPOINTS = ("checkpoint-*", ".tmp-checkpoint-*")
# recipe keys that cannot change a finished run's result: a rerun differing only in these is the same run
NOT_RESULT_KEYS = ("resume", "force", "report_to", "logging_steps", "save_steps", "output_dir",
                   "block_cache")  # cached blocks are the blocks tokenizing gives
DONE = ".complete"  # in PREVIOUS once everything is moved there


class AlreadyComplete(LorakitError):
    """resume=true on a finished run with the same recipe: nothing to do (the command line exits 0)."""


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _owned(name: str) -> bool:
    return _matches(name, OWNED) or _matches(name, OWNED_TEMPS)


def newest_checkpoint(out: Path) -> Optional[str]:
    """The newest complete checkpoint. The trainer writes trainer_state.json after the weights, optimizer and RNG
    states, so a checkpoint whose state file is missing or unparsable was cut off (e.g. by kill -9) and is skipped."""
    d = Path(out) / CHECKPOINTS
    if not d.is_dir():
        return None
    done = []
    for p in d.glob("checkpoint-*"):
        try:
            step = json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if str(step) == p.name[len("checkpoint-"):]:
            done.append((step, p))
    return str(max(done)[1]) if done else None


def _has_result(path: Path, subruns=SUBRUNS) -> bool:
    """A finished run or a complete checkpoint in `path` or one of the sub-runs named."""
    return is_finished(path) or newest_checkpoint(path) is not None or any(
        _has_result(path / n, ()) for n in subruns)


def is_lorakit_output(path: Path, lock: bool = True) -> bool:
    """True if lorakit wrote `path`: a run.json, a complete checkpoint, a run's lock (unless `lock` is false) or
    set-aside previous run, a pipeline stage's stage.json, or a pretrain phase that is one of these."""
    path = Path(path)
    marks = (RUN_FILE, PREVIOUS, "stage.json", *([LOCK] if lock else []))
    return any((path / m).exists() for m in marks) or newest_checkpoint(path) is not None or any(
        is_lorakit_output(path / n) for n in SUBRUNS if (path / n).is_dir())


def _foreign(path: Path) -> LorakitError:
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return LorakitError(f"{path}: not empty ({shown}) and not a lorakit output (no run.json, no checkpoints); "
                        "lorakit writes only into an empty directory or one of its own runs, force=true or not; "
                        "choose another output_dir")


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(path: Path, recipe: Optional[dict]) -> list[str]:
    """`key (old -> new)` for every recipe key that differs from the finished run's recipe.yaml, except the keys that
    cannot change its result (NOT_RESULT_KEYS); [] when either recipe is unknown."""
    saved = Path(path) / "recipe.yaml"
    if recipe is None or not saved.is_file():
        return []
    try:
        old = _flat(yaml.safe_load(saved.read_text(encoding="utf-8")))
    except yaml.YAMLError:
        return ["recipe.yaml (unreadable)"]
    new = _flat(recipe)
    keys = [k for k in dict.fromkeys([*old, *new]) if k.split(".")[-1] not in NOT_RESULT_KEYS]
    return [f"{k} ({old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r})" for k in keys if old.get(k) != new.get(k)]


_HELD: dict[str, "RunDir"] = {}  # output directories this process holds the lock of


class RunDir:
    """One training run's claim on its output_dir: the rules for what may happen to it, in one place.

    - An absent or empty directory, or a lorakit run, may be written; anything else (no run.json, no checkpoints, no
      lock) is refused whatever `force` says, and nothing lorakit did not write is ever moved or deleted.
    - One writer: an exclusive flock on OUT/.lorakit.lock, held for the run's life, names host and pid to a second
      run (which fails at once). The kernel drops it when the process dies, so a dead run's lock is no obstacle.
    - `force` (or a fresh start over a lorakit run's leftovers) moves the old run's files into OUT/.lorakit-previous;
      they are deleted once the new run has a result (a complete checkpoint or run.json) and moved back if it ends
      without one, including at the next start after a kill -9.
    - resume=true on a finished run: AlreadyComplete if the recipe is the same, else refused naming the keys
      (`continues`: the stage continues finished work instead, as pretrain keeps its finished phases).
    Only the writer (rank 0) locks and moves; other ranks get the same decisions without touching anything."""

    def __init__(self, path: Path, writer: bool):
        self.path, self.writer = Path(path), writer
        self.checkpoint: Optional[str] = None
        self.fd: Optional[int] = None
        self.created: list[Path] = []

    # ------------------------------------------------------------------------------------------------ claiming
    @classmethod
    def claim(cls, path: Path, *, force: bool, resume: bool, recipe: Optional[dict] = None, writer: bool = True,
              keep=(), continues: bool = False) -> "RunDir":
        """Check `path` against the rules, lock it (writer) and set aside what a fresh start replaces. `keep`: top-level
        names (sub-runs) left in place for the stage to handle."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LorakitError(f"{path}: output path exists and is not a directory")
        if path.is_dir() and any(path.iterdir()) and not is_lorakit_output(path):
            raise _foreign(path)
        run = cls(path, writer)
        if writer:
            held = _HELD.pop(str(path.resolve()), None)
            if held is not None:  # an earlier run in this process that ended without closing (called outside the CLI)
                held.close()
            run._lock()
        try:
            if writer:
                run._settle()
            run._decide(force, resume, recipe, tuple(keep), continues)
        except BaseException:
            run.close()
            raise
        return run

    def _lock(self) -> None:
        path = self.path
        self.created = [p for p in [path, *path.parents] if not p.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    self._remove_created()
                    raise LorakitError(f"{path}: another lorakit run is writing here ({holder}); wait for it to end "
                                       "or choose another output_dir") from None
                try:  # its last holder may have deleted the file between our open and flock: lock the new one
                    same = os.stat(path / LOCK).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n".encode())
        except OSError as e:
            self._remove_created()
            raise LorakitError(f"{path}: output_dir is not writable ({e.strerror})") from None
        self.fd = fd
        _HELD[str(path.resolve())] = self

    def _decide(self, force: bool, resume: bool, recipe: Optional[dict], keep: tuple, continues: bool) -> None:
        out = self.path
        if is_finished(out) and not force:
            if not resume:
                raise LorakitError(f"{out}: holds a finished run; pass force=true (or --force) to overwrite, "
                                   "or choose another output_dir")
            changes = recipe_changes(out, recipe)
            if not changes:
                raise AlreadyComplete(f"{out}: already complete (a finished run with the same recipe); nothing to do")
            if not continues:
                raise LorakitError(f"{out}: holds a finished run whose recipe differs in {', '.join(changes)}; "
                                   "force=true trains it again with the new recipe, or choose another output_dir")
            return
        if resume and not force:
            self.checkpoint = newest_checkpoint(out)
            if self.checkpoint is not None or (continues and _has_result(out)):
                return
        elif not force and _has_result(out):
            raise LorakitError(f"{out}: holds checkpoints of an unfinished run; pass resume=true to continue it "
                               "or force=true to start over")
        if self.writer:
            self._set_aside(keep)

    # ------------------------------------------------------------------------------------------------ previous run
    def _entries(self, keep=()) -> list[Path]:
        """The lorakit-written entries at the top of the run (checkpoints/ by its checkpoint-N inside)."""
        out = []
        for p in sorted(self.path.iterdir()) if self.path.is_dir() else []:
            if p.name in keep or p.name in (LOCK, PREVIOUS) or not _owned(p.name):
                continue
            if p.name == CHECKPOINTS and p.is_dir():
                out += [c for c in sorted(p.iterdir()) if _matches(c.name, IN_CHECKPOINTS)]
            else:
                out.append(p)
        return out

    def _set_aside(self, keep: tuple) -> None:
        """Move the old run's files into PREVIOUS (run.json first, so an interrupted move never looks finished)."""
        entries = sorted(self._entries(keep), key=lambda p: p.name != RUN_FILE)
        if not entries:
            return
        prev = self.path / PREVIOUS
        prev.mkdir()
        for p in entries:
            rel = p.relative_to(self.path)
            (prev / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, prev / rel)
        ckpts = self.path / CHECKPOINTS
        if ckpts.is_dir() and not any(ckpts.iterdir()):
            ckpts.rmdir()
        (prev / DONE).write_bytes(b"")

    def _settle(self) -> None:
        """Delete the previous run once the new one has a result; otherwise delete what the new one wrote (lorakit's
        files only) and move the previous run back. Also what a killed run left: an interrupted move is undone."""
        prev = self.path / PREVIOUS
        if not prev.is_dir():
            return
        moved = (prev / DONE).is_file()
        if moved and _has_result(self.path, [n for n in SUBRUNS if (prev / n).exists()]):
            shutil.rmtree(prev, ignore_errors=True)
            return
        if moved:  # the new run's own files (the old ones are all in prev)
            for p in self._entries([n for n in SUBRUNS if not (prev / n).exists()]):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        (prev / DONE).unlink(missing_ok=True)
        for p in sorted(prev.iterdir()):
            inner = sorted(p.iterdir()) if p.name == CHECKPOINTS and p.is_dir() else [p]
            for q in inner:
                dst = self.path / q.relative_to(prev)
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():  # never over something: what cannot go back stays in PREVIOUS
                    os.replace(q, dst)
        with contextlib.suppress(OSError):
            (prev / CHECKPOINTS).rmdir()
        with contextlib.suppress(OSError):
            prev.rmdir()

    # ------------------------------------------------------------------------------------------------ ending
    def close(self) -> None:
        """End the claim: settle the previous run (kept or restored) and drop the lock. A run that ended with nothing
        leaves nothing: its empty checkpoints/, the lock, and the directory if it created it. Idempotent."""
        if self.fd is None:
            return
        marker = True
        try:
            self._settle()
            ckpts = self.path / CHECKPOINTS
            if ckpts.is_dir() and not any(ckpts.iterdir()):
                ckpts.rmdir()
            # files of a run that ended without a result keep the (unlocked) lock file: it marks them as lorakit's
            marker = bool(self._entries()) and not is_lorakit_output(self.path, lock=False)
        finally:
            self._unlock(delete=not marker)
            self._remove_created()

    def _unlock(self, delete: bool = True) -> None:
        if self.fd is None:
            return
        if delete:
            with contextlib.suppress(OSError):
                os.unlink(self.path / LOCK)  # while still holding it: a process that opened it meanwhile retries
        os.close(self.fd)
        self.fd = None
        if _HELD.get(str(self.path.resolve())) is self:
            del _HELD[str(self.path.resolve())]

    def _remove_created(self) -> None:
        for p in self.created:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()  # only if empty
        self.created = []


def finish(path: Path) -> None:
    """Called after a run's final save: the new run is safe, so its previous run goes and its lock is released."""
    held = _HELD.get(str(Path(path).resolve()))
    if held is not None:
        held.close()


@contextlib.contextmanager
def closing_runs() -> Iterator[None]:
    """Around a command: every RunDir claimed inside is closed at the end, whether the command succeeded or failed
    (a failed run's previous output is put back)."""
    before = set(_HELD)
    try:
        yield
    finally:
        for key in reversed([k for k in _HELD if k not in before]):  # sub-runs (claimed later) first
            _HELD[key].close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun): the process that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def log_metrics(path: Path, row: dict) -> None:
    """Append one row to `path` (a run's metrics.jsonl; the one writer of it), from rank 0 only."""
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] when there is none), skipping a last line cut off by a kill."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if Path(path).is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


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
