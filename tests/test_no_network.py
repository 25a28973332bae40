"""lorakit fetches nothing when it is given a local path: importing it and the libraries it trains with asks no host.
bitsandbytes (>= 0.50, with `kernels` installed, as transformers 5.25 installs it) looks a CPU kernel up on the
Hugging Face Hub while it imports on CPUs with avx512_bf16; lorakit/__init__.py keeps that lookup offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, socket, sys
asked = []
def refuse(host, *args, **kwargs):
    asked.append(host)
    raise OSError("no network in this test")
socket.getaddrinfo = refuse
if sys.argv[1] == "lorakit":
    import lora_kit  # noqa: F401
import peft  # noqa: F401  (imports bitsandbytes where it is installed)
import bitsandbytes.backends.cpu.ops  # noqa: F401
from huggingface_hub import constants
print(json.dumps({"asked": asked, "offline": constants.HF_HUB_OFFLINE}))
"""


def _probe(first: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", PROBE, first], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"stderr": out.stderr}


def test_importing_lorakit_and_its_libraries_asks_no_host():
    without = _probe("plain")
    if not without["asked"]:
        pytest.skip("bitsandbytes asks the hub nothing here (no avx512_bf16 CPU, or `kernels` not installed): "
                    "nothing for lorakit to keep offline")
    assert "huggingface.co" in without["asked"]
    got = _probe("lorakit")
    assert got["asked"] == []
    assert got["offline"] is False  # the user's hub setting is back once bitsandbytes has loaded
    assert "kernels-community" not in got["stderr"] and "publisher trust" not in got["stderr"]  # and says nothing
