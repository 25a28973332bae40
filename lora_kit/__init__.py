"""lorakit: adapt open LLaMA-family models to Chinese with LoRA/QLoRA.

The pipeline: vocabulary extension, continued pretraining, SFT, alignment (RM, PPO, DPO), merge and export.
"""
import importlib.abc
import importlib.machinery
import logging
import sys

# bitsandbytes 0.50 warns at import that an optional CPU kernel package is missing; its CPU NF4 path works without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _NoHubKernelAtImport(importlib.abc.MetaPathFinder):
    """bitsandbytes (>= 0.50) on a CPU with avx512_bf16 asks the Hugging Face Hub for a 4-bit kernel while its CPU
    ops module imports (`kernels.get_kernel("kernels-community/...")`, installed beside transformers 5.25): a network
    call at every start, even for a local model, and when online code from the hub that nobody asked for. That one
    module is executed with the hub client in offline mode, so the lookup fails at once and bitsandbytes keeps its
    own kernel; the hub is back as the user set it as soon as the module is loaded."""

    MODULE = "bitsandbytes.backends.cpu.ops"

    def find_spec(self, name, path=None, target=None):
        if name != self.MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _OfflineLoader(spec.loader)
        return spec


class _OfflineLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, is_package, ...: the file's own loader answers
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        from huggingface_hub import constants
        quiet = logging.getLogger("kernels")  # its "skipping publisher trust check ... offline mode" warning
        before, level = constants.HF_HUB_OFFLINE, quiet.level
        constants.HF_HUB_OFFLINE = True
        quiet.setLevel(logging.ERROR)
        try:
            self.loader.exec_module(module)
        finally:
            constants.HF_HUB_OFFLINE = before
            quiet.setLevel(level)


if not any(isinstance(f, _NoHubKernelAtImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _NoHubKernelAtImport())
