"""The package's house plan, checked: the README's architecture map lists exactly the modules that exist, imports point
down the layers it states, no stage imports another, and nothing imports the command line."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lora_kit"
# Each top-level room and its layer: a module may import its own layer or a lower one, never a higher one.
LAYERS = {
    "errors": 0, "recipe": 0, "templates": 0, "rundir": 0, "commands": 0,
    "models": 1, "data": 1, "vocab": 1,
    "training": 2, "evaluate": 2,
    "stages": 3, "export": 3,
    "pipeline": 4, "serve": 4, "recipe_cmd": 4,
    "cli": 5,
}


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module in lora_kit (packages by their __init__)."""
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(path: Path) -> set[str]:
    """Every lora_kit module a file imports (`from pkg import mod` counts as pkg.mod when mod is a module)."""
    found, known = set(), modules()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lora_kit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_kit"):
            assert node.level == 0, f"{path}: relative import"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found


def room(dotted: str) -> str:
    """The top-level room of a module: lora_kit.models.load -> models."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "lora_kit"


def test_every_room_has_a_layer():
    rooms = {room(m) for m in modules()} - {"lora_kit"}
    assert rooms <= set(LAYERS), f"rooms without a layer: {sorted(rooms - set(LAYERS))}"


def test_imports_point_down_and_nothing_imports_cli():
    wrong = []
    for name, f in modules().items():
        if name == "lora_kit":
            continue
        for dep in imports(f):
            here, there = room(name), room(dep)
            if there == "cli" or (there != "lora_kit" and LAYERS[there] > LAYERS[here]):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "\n".join(wrong)


def test_no_stage_imports_another():
    wrong = []
    for name, f in modules().items():
        if name.startswith("lora_kit.stages."):
            mine = name.split(".")[2]
            wrong += [f"{name} imports {d}" for d in imports(f)
                      if d.startswith("lora_kit.stages.") and d.split(".")[2] != mine]
    assert not wrong, "\n".join(wrong)


def architecture_map() -> set[str]:
    """Module paths drawn in the README's Architecture code block: folders end in '/', files are listed under them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        first = line.split()[0]
        stack = stack[:indent]
        if first.endswith("/"):
            stack.append(first.rstrip("/"))
        elif first.endswith(".py"):
            paths.add("/".join(stack + [first]))
    return paths


def test_readme_architecture_lists_every_module():
    drawn = architecture_map()
    # package __init__ files are drawn as their folder, except a package that is itself a module (stages/ppo)
    real = {str(f.relative_to(ROOT)) for f in PKG.rglob("*.py") if f.name != "__init__.py" or f.parent.name == "ppo"}
    assert not (real - drawn), f"modules missing from README's architecture map: {sorted(real - drawn)}"
    assert not (drawn - real), f"README's architecture map names modules that do not exist: {sorted(drawn - real)}"


def test_every_package_is_installed():
    """A wheel holds only the packages pyproject lists: a new folder missing there works from a checkout only."""
    listed = set(re.search(r"packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
                 .replace('"', "").replace(",", " ").split())
    real = {".".join(f.parent.relative_to(ROOT).parts) for f in PKG.rglob("__init__.py")}
    assert not (real - listed), f"packages missing from pyproject.toml: {sorted(real - listed)}"


def test_only_the_builder_loads_a_model_and_builds_a_lora_config():
    """One model builder: load_model is called only by models.builder (so allow_pickle, trust_remote_code, dtype and
    quantization mean the same everywhere); a LoraConfig is built from a recipe only by models.lora.lora_config, and
    written for computed factors only by export.common (svd, extract-lora)."""
    homes = {"load_model": {"lora_kit.models.builder"},
             "LoraConfig": {"lora_kit.models.lora", "lora_kit.export.common"}}
    wrong = []
    for name, f in modules().items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if called in homes and name not in homes[called]:
                    wrong.append(f"{name}:{node.lineno} calls {called}")
    assert not wrong, "\n".join(wrong)
