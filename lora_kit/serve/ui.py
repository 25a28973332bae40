"""`lorakit ui`: a web page (FastAPI + one static page of plain JS) over a runs directory: runs, live curves, starting a
run from a recipe form, stopping/resuming it, eval and pipeline reports, and a chat pane relayed to a `lorakit serve`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

# httpx, uvicorn and fastapi are the optional `lorakit[serve]` extra: only `lorakit serve` and `lorakit ui` import them
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lora_kit.commands import stage_module
from lora_kit.errors import LorakitError
from lora_kit.recipe import describe, find_recipe, flatten, list_recipes, load_config, recipe_header, to_dict
from lora_kit.rundir import write_json
from lora_kit.serve.api import LOOPBACK, error_body
from lora_kit.serve.runs import UI_DIR, inside, list_runs, metrics, reports

PAGE = Path(__file__).parent / "static" / "ui.html"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


def recipe_form(root: Path, recipe: str) -> dict:
    """A recipe's stage and every key with its type, resolved value and help text (the form the page builds)."""
    path = _recipe_path(root, recipe)
    stage = recipe_header(path)[0]
    cls = stage_module(stage).Config
    values = flatten(to_dict(load_config(cls, str(path))))
    return {"recipe": recipe, "stage": stage, "keys": [
        {"key": k, "type": t, "value": values.get(k), "help": h} for k, t, _, h in describe(cls) if k != "output_dir"]}


def _recipe_path(root: Path, recipe: str) -> Path:
    """A shipped recipe by name, or a YAML file inside the runs directory (never a path outside it)."""
    if recipe in {r[0] for r in list_recipes()}:
        return find_recipe(recipe)
    path = inside(root, recipe)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise LorakitError(f"{recipe!r}: neither a shipped recipe nor a .yaml file inside the runs directory")
    return path


class Runs:
    """The processes this UI started, by run name, and their records under RUNS/.lorakit-ui/."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.procs: dict[str, subprocess.Popen] = {}

    def record_path(self, name: str) -> Path:
        return self.root / UI_DIR / f"{name}.json"

    def alive(self) -> set[str]:
        """Names of runs still running; records the exit code of those that ended."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                rec = json.loads(self.record_path(name).read_text(encoding="utf-8"))
                write_json(self.record_path(name), rec | {"returncode": proc.returncode})
                del self.procs[name]
        return set(self.procs)

    def start(self, recipe: str, name: str, values: dict, resume: bool = False) -> dict:
        """Launch `lorakit STAGE --recipe R output_dir=RUNS/NAME key=value ...` (checked first) in its own session."""
        if not RUN_NAME.match(name or ""):
            raise LorakitError(f"run name {name!r}: letters, digits, '.', '_' and '-' only")
        if name in self.alive():
            raise LorakitError(f"run {name} is already running")
        out = inside(self.root, name)
        form = {k["key"]: k["value"] for k in recipe_form(self.root, recipe)["keys"]}
        overrides = [f"{k}={v}" for k, v in values.items() if k != "output_dir" and str(form.get(k)) != str(v)]
        stage = recipe_header(_recipe_path(self.root, recipe))[0]
        unknown = [k for k in values if k not in form and k != "output_dir"]
        if unknown:
            raise LorakitError(f"{recipe}: unknown keys {', '.join(unknown)}")
        args = overrides + [f"output_dir={out}"] + (["resume=true"] if resume else [])
        load_config(stage_module(stage).Config, str(_recipe_path(self.root, recipe)), args)  # errors now, not later
        log = self.root / UI_DIR / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "lora_kit.cli", stage, "--recipe", str(_recipe_path(self.root, recipe)), *args]
        with open(log, "a", encoding="utf-8") as f:
            self.procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        record = {"recipe": recipe, "stage": stage, "values": values, "command": cmd, "log": str(log),
                  "started": time.time(), "max_steps": form.get("max_steps") if "max_steps" not in values
                  else values["max_steps"], "pid": self.procs[name].pid}
        write_json(self.record_path(name), record)
        return {"name": name, "stage": stage, "command": cmd}

    def stop(self, name: str) -> None:
        """SIGINT to the run's process group (the trainer stops; resume continues from its last checkpoint)."""
        if name not in self.alive():
            raise LorakitError(f"run {name} is not running (from this UI)")
        os.killpg(self.procs[name].pid, signal.SIGINT)
        rec = json.loads(self.record_path(name).read_text(encoding="utf-8"))
        write_json(self.record_path(name), rec | {"stopped": True})

    def resume(self, name: str) -> dict:
        """Start a stopped run again with resume=true (same recipe and values)."""
        if not self.record_path(name).is_file():
            raise LorakitError(f"run {name} was not started from this UI; resume it with `lorakit STAGE ... "
                               "resume=true`")
        rec = json.loads(self.record_path(name).read_text(encoding="utf-8"))
        return self.start(rec["recipe"], name, rec["values"], resume=True)

    def shutdown(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def create_ui(root: Path, serve_url: Optional[str] = None, serve_key: Optional[str] = None):
    """The UI application over `root`; chat requests are relayed to the `lorakit serve` at `serve_url`."""
    root = root.resolve()
    runs = Runs(root)

    @asynccontextmanager
    async def lifespan(app):
        yield
        runs.shutdown()  # runs started here are stopped (SIGINT: resumable) when the UI exits

    app = FastAPI(title="lorakit ui", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runs = runs

    @app.exception_handler(LorakitError)
    async def user_error(request, exc):
        return error_body(400, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error_body(exc.status_code, str(exc.detail))

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/api/runs")
    async def runs_list():
        return {"root": str(root), "runs": list_runs(root, runs.alive()), "serve": bool(serve_url)}

    @app.get("/api/metrics/{name:path}")
    async def run_metrics(name: str):
        return {"name": name, "rows": metrics(inside(root, name))}

    @app.get("/api/log/{name}")
    async def run_log(name: str):
        log = inside(root / UI_DIR, f"{name}.log")
        return {"name": name, "log": log.read_bytes()[-6000:].decode("utf-8", "replace") if log.is_file() else ""}

    @app.get("/api/recipes")
    async def recipes():
        shipped = [{"name": n, "stage": s, "description": d} for n, s, d, _ in list_recipes()]
        local = [{"name": str(p.relative_to(root)), "stage": recipe_header(p)[0], "description": "(runs directory)"}
                 for p in sorted(root.glob("*.yaml")) if recipe_header(p)[0]]
        return {"recipes": shipped + local}

    @app.get("/api/recipe/{recipe:path}")
    async def recipe(recipe: str):
        return recipe_form(root, recipe)

    @app.post("/api/start")
    async def start(request: Request):
        body = await request.json()
        return runs.start(str(body.get("recipe", "")), str(body.get("name", "")), dict(body.get("values") or {}))

    @app.post("/api/stop/{name}")
    async def stop(name: str):
        runs.stop(name)
        return {"name": name, "stopping": True}

    @app.post("/api/resume/{name}")
    async def resume(name: str):
        return runs.resume(name)

    @app.get("/api/reports")
    async def report_list():
        return {"reports": reports(root)}

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST"])
    async def relay(rest: str, request: Request):
        if not serve_url:
            return error_body(503, "no model server: start `lorakit serve` and pass --serve URL to `lorakit ui`")
        headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {serve_key}"} if serve_key else {})
        client = httpx.AsyncClient(timeout=None)
        upstream = await client.send(client.build_request(request.method, f"{serve_url.rstrip('/')}/v1/{rest}",
                                                          content=await request.body(), headers=headers), stream=True)

        async def body():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                await client.aclose()

        return StreamingResponse(body(), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type"))

    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Runs directory, the model server to chat with, bind address."""
    p.add_argument("--runs", default="runs", help="the directory of runs to show and start runs in (default: runs)")
    p.add_argument("--serve", metavar="URL",
                   help="a running `lorakit serve` for the chat pane, e.g. http://127.0.0.1:8000")
    p.add_argument("--serve-key", help="that server's --api-key")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback only: the UI starts processes)")


def main(args) -> int:
    """Serve the UI until SIGTERM/SIGINT."""
    if args.host not in LOOPBACK:
        raise LorakitError(f"--host {args.host}: the UI starts training processes, so it binds loopback only "
                           "(reach it from elsewhere through an SSH tunnel)")
    root = Path(args.runs)
    root.mkdir(parents=True, exist_ok=True)
    print(f"lorakit ui: {root.resolve()} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(create_ui(root, args.serve, args.serve_key), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0
