#!/usr/bin/env bash
# Install the peers that benchmarks/compare_peers.py measures lorakit against, each in its own virtualenv outside the
# repo: LLaMA-Factory (PyPI llamafactory) and TRL+PEFT (the script a user writes by hand, benchmarks/peers/trl_sft.py).
# Idempotent: a venv whose stamp matches the pinned specs below is left alone. Prints the resolved versions.
#
#   bash benchmarks/setup_peers.sh            # venvs under ${LORAKIT_BENCH_HOME:-~/.cache/lorakit-bench}
#   TORCH="torch --index-url .../cu124" bash benchmarks/setup_peers.sh   # on a GPU box: the CUDA build you want
set -euo pipefail

HOME_DIR="${LORAKIT_BENCH_HOME:-$HOME/.cache/lorakit-bench}"
PYTHON="${PYTHON:-python3}"
# torch==2.13.0 is a CPU build on local disk on these machines; plain `torch` drags in a multi-GB CUDA build (FACTS).
TORCH="${TORCH:-torch==2.13.0}"
# Pins resolved on 2026-11-24 (FACTS "Installing the peers"): the newest releases that install beside torch 2.13.
LLAMAFACTORY_PKGS="llamafactory==0.9.5 transformers==5.6.0 peft==0.18.1 trl==0.24.0 datasets==4.0.0 accelerate==1.11.0 bitsandbytes==0.50.2"
TRL_PKGS="trl==1.16.0 peft==0.21.2 transformers==5.23.0 datasets==5.2.0 accelerate==1.15.0 bitsandbytes==0.50.2"

mkdir -p "$HOME_DIR"

make_venv() {  # make_venv NAME "PKGS" -> installs torch first, then PKGS under a constraint that keeps that torch
    local name=$1 pkgs=$2 venv="$HOME_DIR/$1"
    local stamp="$venv/.lorakit-bench-installed" want="$TORCH | $pkgs"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "setup_peers: $name: already installed ($venv)"
        return
    fi
    echo "setup_peers: $name: installing into $venv"
    test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q $TORCH
    # Packages that want a newer torch (torchvision 0.29 wants >= 2.14) must not replace it with a CUDA build.
    local torch_version
    torch_version=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
    echo "torch==$torch_version" > "$venv/constraints.txt"
    "$venv/bin/python" -m pip install -q -c "$venv/constraints.txt" $pkgs
    # PyPI's torchvision is a CUDA build: beside CPU torch it breaks `import transformers` (torchvision::nms missing).
    # Nothing measured here imports it.
    "$venv/bin/python" -m pip uninstall -q -y torchvision 2>/dev/null || true
    # LLaMA-Factory imports torchaudio at start-up (data/mm_plugin.py); its CUDA-linked extension libraries fail to
    # load beside CPU torch. Moved aside, the import succeeds (only audio inputs would need them).
    local ta
    ta=$("$venv/bin/python" - <<'PY' 2>/dev/null || true
import importlib.util, os
s = importlib.util.find_spec("torchaudio")
print(os.path.join(os.path.dirname(s.origin), "lib") if s else "")
PY
)
    if [[ -n "$ta" && -d "$ta" ]] && compgen -G "$ta/*.so" >/dev/null; then
        mkdir -p "$ta.disabled"
        mv "$ta"/*.so "$ta.disabled/"
    fi
    echo "$want" > "$stamp"
}

make_venv llamafactory "$LLAMAFACTORY_PKGS"
make_venv trl "$TRL_PKGS"

# Smoke: each venv imports what the benchmark runs.
"$HOME_DIR/llamafactory/bin/python" -c "import llamafactory.train.tuner" 2>/dev/null \
    || { echo "setup_peers: llamafactory does not import" >&2; exit 1; }
"$HOME_DIR/trl/bin/python" -c "import trl, peft" || { echo "setup_peers: trl does not import" >&2; exit 1; }
for name in llamafactory trl; do
    printf 'setup_peers: %-12s ' "$name"
    "$HOME_DIR/$name/bin/python" -m pip list --format=freeze 2>/dev/null \
        | grep -iE '^(torch|transformers|peft|trl|datasets|accelerate|bitsandbytes|llamafactory)==' | tr '\n' ' '
    echo
done
