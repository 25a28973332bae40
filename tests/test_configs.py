"""The bundled launch configs (configs/) build the objects accelerate builds from them at launch: the launcher's own
argument validation and environment, then DeepSpeedPlugin / FullyShardedDataParallelPlugin in a worker; DeepSpeed JSON
"auto" values are all filled from a lorakit recipe by transformers' HfTrainerDeepSpeedConfig. The engines themselves
need GPUs (and the deepspeed package), so nothing here trains."""
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ACC = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
DS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def launch_env(config: Path) -> tuple[object, dict]:
    """(validated launcher args, worker environment) exactly as `accelerate launch --config_file config` makes them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "lora_kit.cli", "sft"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before deepspeed_launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config.keys())
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_every_config_is_documented_and_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    assert {p.stem for p in ACC} >= {"ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp",
                                     "fsdp_qlora", "multinode_ddp"}
    for p in ACC:
        first = p.read_text().splitlines()[0]
        assert first.startswith("#") and "accelerate launch --config_file" in first and "lora_kit.cli" in first, p
        assert f"configs/accelerate/{p.name}" in p.read_text(), p
        load_config_from_file(str(p))  # accelerate's ClusterConfig: unknown keys or bad values raise


@pytest.mark.parametrize("name", ["ddp", "multinode_ddp"])
def test_ddp_configs_go_through_torchrun(name):
    args, env = launch_env(ROOT / "configs" / "accelerate" / f"{name}.yaml")
    assert args.multi_gpu and not args.cpu and not args.use_deepspeed and not args.use_fsdp
    if name == "multinode_ddp":
        assert args.num_machines == 2 and args.main_process_ip and args.num_processes == 16


@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), (3, True)])
def test_deepspeed_configs_build_the_plugin(stage, offload):
    from accelerate.utils import DeepSpeedPlugin

    name = f"zero{stage}" + ("_offload" if offload else "")
    args, env = launch_env(ROOT / "configs" / "accelerate" / f"deepspeed_{name}.yaml")
    assert args.use_deepspeed
    assert Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]) == Path(f"configs/deepspeed/{name}.json")
    env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ROOT / env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])  # as from the root
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()  # what TrainingArguments builds in each worker (ACCELERATE_USE_DEEPSPEED)
    assert plugin.zero_stage == stage
    assert plugin.zero3_init_flag == (stage == 3)
    assert plugin.offload_optimizer_device == ("cpu" if offload else "none")
    assert plugin.offload_param_device == ("cpu" if offload else "none")
    if stage == 3:  # the adapter is saved from weights gathered on save (lora_kit.training.sharded_state_dict)
        assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def trainer_ds_config(path: str):
    """transformers' HfTrainerDeepSpeedConfig (the object the Trainer fills "auto" values with), on accelerate's config
    base class. transformers only derives it from that base when the deepspeed package is installed, which needs a
    CUDA toolchain; the filling itself is pure dictionary work. Not registered globally (no "ZeRO-3 enabled" leaks)."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    def init(self, config):
        HfDeepSpeedConfig.__init__(self, config)
        self._dtype, self.mismatches = None, []

    body = {k: v for k, v in vars(HfTrainerDeepSpeedConfig).items() if k not in ("__init__", "__dict__", "__weakref__")}
    return type("TrainerDeepSpeedConfig", (HfDeepSpeedConfig,), {**body, "__init__": init})(path)


def _autos(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _autos(v, f"{prefix}{k}.")
        elif v == "auto":
            yield prefix + k


@pytest.mark.parametrize("path", DS, ids=lambda p: p.stem)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deepspeed_autos_are_filled_from_a_recipe(path, dtype, tmp_path):
    """transformers fills every "auto" from TrainingArguments (recipe) and the model's hidden size; none may be left.
    """
    from lora_kit.recipe import load_config
    from lora_kit.stages import sft
    from lora_kit.training.run import training_arguments

    cfg = load_config(sft.Config, "alpaca_zh", [f"output_dir={tmp_path}", "batch_size=3", "grad_accum=5",
                                                 "max_grad_norm=0.5"])
    args = training_arguments(cfg, tmp_path, dtype)
    hf = trainer_ds_config(str(path))
    hf.trainer_config_process(args)
    model = mock.Mock(config=mock.Mock(hidden_size=4096, hidden_sizes=None, text_config=None))
    model.config.to_dict.return_value = {"hidden_size": 4096}
    hf.trainer_config_finalize(args, model, num_training_steps=100)
    c = hf.config
    assert list(_autos(c)) == []
    assert c["train_micro_batch_size_per_gpu"] == 3 and c["gradient_accumulation_steps"] == 5
    assert c["gradient_clipping"] == 0.5
    assert c["bf16"]["enabled"] == (dtype == torch.bfloat16) and c["fp16"]["enabled"] is False
    if "optimizer" in c:
        assert c["optimizer"]["params"]["lr"] == cfg.learning_rate


def fsdp_plugin(name: str):
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, env = launch_env(ROOT / "configs" / "accelerate" / f"{name}.yaml")
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"
    # sync_module_states asks for the current GPU; there is none here. accelerate 1.16 asks
    # get_torch_accelerator_backend, earlier releases is_cuda_available: pretend a CUDA device through either.
    import accelerate.utils.dataclasses as acc

    if hasattr(acc, "get_torch_accelerator_backend"):
        gpu = mock.patch.object(acc, "get_torch_accelerator_backend", return_value=("cuda", torch.cuda))
    else:
        gpu = mock.patch.object(acc, "is_cuda_available", return_value=True)
    with mock.patch.dict(os.environ, env), gpu, mock.patch("torch.cuda.current_device", return_value=0):
        return FullyShardedDataParallelPlugin(), env


def test_fsdp_config_builds_the_plugin():
    from torch.distributed.fsdp import StateDictType

    plugin, _ = fsdp_plugin("fsdp")
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT


def test_fsdp_qlora_config_and_quant_storage(tiny_model_dir):
    """FSDP + QLoRA: FSDP flattens a layer's parameters into one tensor of one dtype, so the 4-bit weights must be
    stored as the compute dtype (a float type: transformers then sets FSDP's mixed precision to it), and under FSDP
    attach_lora must leave the norms in that dtype instead of upcasting them to fp32."""
    import bitsandbytes as bnb

    from lora_kit.models.load import load_model, quantization_config
    from lora_kit.models.lora import attach_lora
    from lora_kit.recipe import LoraArgs

    plugin, env = fsdp_plugin("fsdp_qlora")
    assert plugin.fsdp_version == 1 and plugin.use_orig_params is True and plugin.sync_module_states is True
    assert plugin.cpu_ram_efficient_loading is True
    q = quantization_config("4bit", torch.bfloat16)
    assert q.bnb_4bit_quant_storage == torch.bfloat16 and q.bnb_4bit_quant_storage.is_floating_point
    with mock.patch.dict(os.environ, {"ACCELERATE_USE_FSDP": env["ACCELERATE_USE_FSDP"]}):
        model = attach_lora(load_model(str(tiny_model_dir), quantization="4bit", dtype="bf16"),
                            LoraArgs(r=4, alpha=8, dropout=0.0))
    layer = model.base_model.model.model.layers[0]
    base = {n: p.dtype for n, p in layer.named_parameters() if "lora_" not in n}
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in layer.modules())
    assert set(base.values()) == {torch.bfloat16}, base  # 4-bit storage and norms alike: one flat dtype per unit
    # peft's fsdp_auto_wrap_policy (installed by the Trainer for PEFT models) wraps the fp32 LoRA layers on their own
    from peft.utils.other import fsdp_auto_wrap_policy

    assert fsdp_auto_wrap_policy(model) is not None


def _logits(model, n_vocab):
    ids = torch.tensor([[1, 5, 9, n_vocab - 1]])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("shards", [1, 3])
def test_4bit_load_reads_tensors_one_at_a_time_and_equals_the_usual_load(tiny_untied_model_dir, tmp_path, shards):
    """A 4/8-bit load reads the checkpoint with pread (models._load_converting) instead of transformers' mmap, which
    keeps every page of the full-precision file resident until the load ends. The model must come out the same: same
    NF4 bytes, same logits, same generation config and name, sharded checkpoints and a reward (sequence
    classification) model with config kwargs alike."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    from lora_kit.models.load import UNQUANTIZED, _safetensors_files, load_model, quantization_config

    src = tiny_untied_model_dir
    if shards > 1:  # re-save as 3 shards + index
        src = tmp_path / "sharded"
        AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir).save_pretrained(src, max_shard_size="100KB")
        GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], max_new_tokens=17).save_pretrained(src)
    assert len(_safetensors_files(str(src))) == (1 if shards == 1 else len(list(src.glob("*.safetensors")))) >= shards
    mapped = lambda: {f for f in _safetensors_files(str(src)) if str(f) in Path("/proc/self/maps").read_text()}
    ours = load_model(str(src), quantization="4bit", dtype="fp32")
    assert not mapped()  # read, never mapped: nothing of the file is left in the address space
    usual = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=quantization_config("4bit", torch.float32,
                                                                                         UNQUANTIZED))
    assert mapped()  # (the usual load keeps its unquantized fp32 tensors as views of the mapped file)
    q_ours, q_usual = ours.model.layers[1].mlp.down_proj.weight, usual.model.layers[1].mlp.down_proj.weight
    assert type(q_ours).__name__ == "Params4bit" and torch.equal(q_ours.data, q_usual.data)
    assert torch.equal(_logits(ours, ours.config.vocab_size), _logits(usual, ours.config.vocab_size))
    assert ours.name_or_path == str(src) and ours.generation_config.to_dict() == usual.generation_config.to_dict()
    rm = load_model(str(src), quantization="4bit", dtype="fp32", model_class=AutoModelForSequenceClassification,
                    num_labels=1)
    assert rm.config.num_labels == 1 and rm.score.weight.shape[0] == 1 and type(rm.score) is torch.nn.Linear


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_qlora_keeps_unquantized_weights_in_bf16_and_upcasts_only_fp16(tiny_untied_model_dir, dtype):
    """QLoRA in bf16 leaves the embeddings, head and norms in bf16 as plain bf16 LoRA does (peft's fp32 upcast doubled
    them: +0.5 GB on a 1.1B model); fp16 still gets the upcast, since fp16 overflows. The trained parameters (LoRA,
    a saved score head) are fp32 master weights either way."""
    from transformers import AutoModelForSequenceClassification

    from lora_kit.models.load import load_model
    from lora_kit.models.lora import attach_lora
    from lora_kit.recipe import LoraArgs

    lora = LoraArgs(r=4, alpha=8, dropout=0.0)
    model = attach_lora(load_model(str(tiny_untied_model_dir), quantization="4bit", dtype=dtype), lora,
                        gradient_checkpointing=True)
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    base = model.get_base_model()
    assert {base.model.embed_tokens.weight.dtype, base.lm_head.weight.dtype, base.model.norm.weight.dtype} == {want}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert sum(p.requires_grad for p in model.parameters()) == sum("lora_" in n for n, _ in model.named_parameters())
    rm = attach_lora(load_model(str(tiny_untied_model_dir), quantization="none", dtype="bf16",
                                model_class=AutoModelForSequenceClassification, num_labels=1), lora,
                     modules_to_save=["score"], task_type="SEQ_CLS")
    score = [p for n, p in rm.named_parameters() if "modules_to_save" in n and "score" in n]
    assert score and all(p.dtype == torch.float32 and p.requires_grad for p in score)
