"""The four PPO roles on one base model held once in memory, as peft adapters: actor = adapter `default` (saved at the
root of output_dir), critic = adapter `value` + a value head, reference = adapters disabled (or the frozen SFT adapter
`ref`), reward = adapter `reward` + its score head from `lorakit rm`, or a rule-based `reward_fn`.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from lora_kit.errors import LorakitError
from lora_kit.models.load import check_adapter_files
from lora_kit.models.lora import allow_partial_token_rows, lora_config
from lora_kit.stages.ppo.core import all_sum, world


def _adapter_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise LorakitError(f"{p}: {what} must be an adapter directory (with adapter_config.json), "
                           f"e.g. the output_dir of `lorakit {'rm' if what == 'reward_adapter' else 'sft'}`")
    check_adapter_files(p)
    return p


def score_head_state(adapter_dir: Path) -> dict:
    """The reward model's score head (saved through modules_to_save by `lorakit rm`)."""
    heads = {k.rsplit(".", 1)[1]: v for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
             if ".score." in f".{k}"}
    if "weight" not in heads:
        raise LorakitError(f"{adapter_dir}: adapter has no score head; reward_adapter must come from `lorakit rm`")
    return heads


class Roles:
    """Forward passes for each role; `trainable` lists the parameters PPO optimises (actor + critic)."""

    def __init__(self, base_model, lora, *, sft_adapter: str = "", reward_adapter: str = "", value_from_reward=True,
                 token_rows: Optional[dict[str, list[int]]] = None):
        """`token_rows`: new token rows a fresh actor trains ({module: rows}); an SFT adapter brings its own."""
        hidden = base_model.config.hidden_size
        if sft_adapter:
            sft = _adapter_dir(sft_adapter, "sft_adapter")
            self.model = PeftModel.from_pretrained(base_model, str(sft), adapter_name="default", is_trainable=True)
            allow_partial_token_rows(self.model).load_adapter(str(sft), adapter_name="ref", is_trainable=False)
        else:
            self.model = get_peft_model(base_model, lora_config(lora, dropout=0.0, trainable_token_indices=token_rows),
                                        adapter_name="default")
        self.has_ref_adapter = bool(sft_adapter)
        self.value_head = nn.Linear(hidden, 1)
        self.score_head: Optional[nn.Linear] = None
        if reward_adapter:
            rm = _adapter_dir(reward_adapter, "reward_adapter")
            allow_partial_token_rows(self.model).load_adapter(str(rm), adapter_name="reward", is_trainable=False)
            state = score_head_state(rm)
            self.score_head = nn.Linear(hidden, 1, bias="bias" in state)
            self.score_head.load_state_dict({k: v.float() for k, v in state.items()})
            self.score_head.requires_grad_(False)
        if reward_adapter and value_from_reward:  # InstructGPT initialises the value function from the RM
            allow_partial_token_rows(self.model).load_adapter(str(rm), adapter_name="value", is_trainable=True)
            with torch.no_grad():
                self.value_head.weight.copy_(self.score_head.weight)
                self.value_head.bias.copy_(self.score_head.bias if self.score_head.bias is not None else 0)
        else:
            actor_rows = self.model.peft_config["default"].trainable_token_indices  # the critic reads tokens alike
            allow_partial_token_rows(self.model).add_adapter("value", lora_config(lora, dropout=0.0,
                                                                                  trainable_token_indices=actor_rows))
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.model.eval()  # no dropout: the ratio π/π_old must be exactly 1 on the first PPO epoch
        self.backbone = self.model.get_base_model().model
        self.lm_head = self.model.get_base_model().get_output_embeddings()
        self.value_head.to(self.device)  # the heads live beside the model (load_model put it on the GPU, if any)
        if self.score_head is not None:
            self.score_head.to(self.device)
        self.named_trainable = {n: p for n, p in self.model.named_parameters()
                                if {"default", "value"} & set(n.split(".")) and ("lora_" in n or "modules_to_save" in n
                                                                                or "trainable_tokens" in n)}
        self.named_trainable.update({f"value_head.{k}": p for k, p in self.value_head.named_parameters()})
        self._use("default")

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def trainable(self) -> list[nn.Parameter]:
        return list(self.named_trainable.values())

    def _use(self, adapter: str) -> None:
        """Activate one adapter; actor and critic stay trainable whichever is active (peft freezes inactive ones)."""
        self.model.set_adapter(adapter)
        keep = {id(p) for p in self.named_trainable.values()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)

    def _hidden(self, adapter: Optional[str], ids, mask, positions, head=None) -> torch.Tensor:
        """The backbone's last hidden states under `adapter` (None = all disabled), then `head` under the same one: a
        head with trainable token rows (new rows of an extended vocabulary) follows the active adapter too."""
        ctx = self.model.disable_adapter() if adapter is None else contextlib.nullcontext()
        if adapter is not None:
            self._use(adapter)
        with ctx:
            h = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            return head(h) if head is not None else h

    # ------------------------------------------------------------------------------------------------ roles
    def policy_logits(self, ids, mask, positions, start: int) -> torch.Tensor:
        """Logits predicting tokens ids[:, start:] (the response), from the actor."""
        return self._hidden("default", ids, mask, positions, lambda h: self.lm_head(h[:, start - 1:-1]))

    def ref_logits(self, ids, mask, positions, start: int) -> torch.Tensor:
        return self._hidden("ref" if self.has_ref_adapter else None, ids, mask, positions,
                            lambda h: self.lm_head(h[:, start - 1:-1]))

    def values(self, ids, mask, positions, start: int) -> torch.Tensor:
        h = self._hidden("value", ids, mask, positions)
        return self.value_head(h[:, start - 1:-1].float()).squeeze(-1)

    @torch.no_grad()
    def scores(self, ids, pad_id: int) -> torch.Tensor:
        """Reward-model scores, pooled like AutoModelForSequenceClassification: the last token that is not pad."""
        ids = ids.to(self.device)
        mask = (ids != pad_id).long()
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        h = self._hidden("reward", ids, torch.ones_like(ids), positions)
        last = (positions * mask).argmax(-1)
        return self.score_head(h[torch.arange(len(ids), device=ids.device), last].float()).squeeze(-1)

    def lm_loss(self, batch: dict) -> torch.Tensor:
        """PPO-ptx: the actor's language-modelling loss on an SFT batch (labels -100 outside answers)."""
        self._use("default")
        return self.model(**{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss

    def generate(self, **kw):
        self._use("default")
        return self.model.generate(**kw)

    # ------------------------------------------------------------------------------------------------ processes
    # Not DDP: DDP wraps one module whose forward runs once per backward, while a PPO update runs the shared base twice
    # (actor adapter, then critic adapter + value head outside the PeftModel) and leaves two more adapters frozen.
    # What DDP would do for these few tensors is two collectives, done here directly.
    def broadcast_trainable(self, src: int = 0) -> None:
        """Start every rank from rank `src`'s actor and critic (they are equal already when seeded alike)."""
        if dist.is_available() and dist.is_initialized():
            for p in self.trainable:
                dist.broadcast(p.data, src)

    def all_reduce_grads(self) -> None:
        """Sum the trainable parameters' gradients over the ranks, in one flat all_reduce. Each rank's loss is
        already divided by the token count of the whole global batch, so the sum is the global batch's gradient and
        every rank then takes the identical clipping and AdamW step."""
        if world()[1] == 1:
            return
        params = self.trainable
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = all_sum(torch.cat([g.reshape(-1).float() for g in grads]))
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    # ------------------------------------------------------------------------------------------------ saving
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().contiguous() for n, p in self.named_trainable.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.named_trainable) - set(state)
        if missing:
            raise LorakitError(f"checkpoint does not match this model (missing {sorted(missing)[:2]})")
        with torch.no_grad():
            for n, p in self.named_trainable.items():
                p.copy_(state[n])

    def _save_adapter(self, out: Path, name: str) -> None:
        allow_partial_token_rows(self.model)
        self.model.save_pretrained(out, selected_adapters=[name], safe_serialization=True)

    def save(self, out: Path) -> None:
        """Actor adapter at the root of `out`; critic as out/value/ (adapter + value_head.safetensors)."""

        self._save_adapter(out, "default")
        tmp = out / ".value-tmp"
        self._save_adapter(tmp, "value")
        shutil.rmtree(out / "value", ignore_errors=True)
        (tmp / "value").rename(out / "value")
        shutil.rmtree(tmp, ignore_errors=True)
        save_file({k: v.detach().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(out / "value" / "value_head.safetensors"))
        (out / "value" / "README.md").unlink(missing_ok=True)
        (out / "value" / "lorakit_value.json").write_text(json.dumps({"role": "PPO critic: adapter + value head"}))
