"""`lorakit extract-lora`: a rank-K LoRA adapter from a fully fine-tuned model (truncated SVD of each linear layer's
W_tuned − W_base; changed embedding rows kept as trainable-token rows, changed norms saved whole), read tensor by
tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from lora_kit.errors import LorakitError
from lora_kit.export.common import Checkpoint, Lora, write_adapter
from lora_kit.export.verify import model_logits, probe_batch, reference_logits
from lora_kit.models.load import resolve_model
from lora_kit.rundir import atomic_dir, check_writable, read_run, run_info, write_json

EXACT_SVD_MAX = 4096  # above this smaller dimension a randomised SVD (torch.svd_lowrank) is used


def add_arguments(p) -> None:
    """Options of `lorakit extract-lora`: base and tuned model, rank K, output."""
    p.add_argument("--base", required=True, help="the model the fine-tune started from")
    p.add_argument("--tuned", required=True, help="the fully fine-tuned model")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank K")
    p.add_argument("--output", required=True, help="output adapter directory")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def is_embedding(key: str) -> bool:
    """True for the embedding and LM head weights, whose changes are kept as token rows, not LoRA."""
    return key.endswith(("embed_tokens.weight", "lm_head.weight"))


def low_rank(d: torch.Tensor, rank: int) -> tuple[Lora, float, float]:
    """(factors with B@A ≈ d, energy kept, Frobenius error) by truncated SVD."""
    d64 = d.double()
    total = float((d64 ** 2).sum())
    if min(d.shape) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(d64, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(d64, q=min(rank + 10, min(d.shape)), niter=6)
        vh = v.T
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    B = torch.zeros(d.shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, d.shape[1], dtype=torch.float64)
    B[:, :k], A[:k] = u[:, :k] * root, root[:, None] * vh[:k]
    kept = float((s[:k] ** 2).sum())
    return Lora(A.float(), B.float(), 1.0), (kept / total if total else 1.0), max(0.0, total - kept) ** 0.5


def main(args) -> int:
    """`lorakit extract-lora`: a rank-K LoRA adapter approximating tuned − base, layer by layer by truncated SVD."""
    out = Path(args.output)
    check_writable(out, args.force)
    if args.rank < 1:
        raise LorakitError(f"--rank must be ≥ 1, got {args.rank}")
    base_dir, tuned_dir = Path(resolve_model(args.base)), Path(resolve_model(args.tuned))
    base, tuned = Checkpoint(base_dir), Checkpoint(tuned_dir)
    lora, rows, full, report = {}, {}, {}, {}
    total = kept = 0.0

    for key in tqdm(tuned.keys, desc="extract"):
        t = tuned.get(key).float()
        if key not in base:
            if is_embedding(key) or t.dim() != 1 and "score" not in key:
                raise LorakitError(f"{tuned_dir}: weight {key} is not in {base_dir}; not a fine-tune of that base")
            full[key] = t  # a new head (e.g. a reward model's score)
            continue
        b = base.get(key).float()
        if t.shape != b.shape:
            raise LorakitError(f"{key}: shape {tuple(t.shape)} in {tuned_dir} but {tuple(b.shape)} in {base_dir}; "
                               "extend the base's vocabulary first (`lorakit extend-vocab`) so the shapes match")
        d = t - b
        if not bool(d.any()):
            continue
        if is_embedding(key):
            idx = d.abs().amax(dim=1).nonzero().flatten()
            rows[key] = (idx, t[idx].clone())
            report[key] = {"changed_rows": int(idx.numel())}
        elif d.dim() == 2:
            lora[key], share, err = low_rank(d, args.rank)
            energy_all = float((d.double() ** 2).sum())
            total, kept = total + energy_all, kept + share * energy_all
            report[key] = {"energy": share, "frobenius_error": err}
        else:
            full[key] = t  # norms: a whole small module (modules_to_save)
            report[key] = {"saved_whole": True}
    base.close()
    tuned.close()
    clash = {k.rsplit(".", 1)[0] for k in full} & {k.rsplit(".", 1)[0] for k in lora}
    if clash:
        raise LorakitError(f"{sorted(clash)[0]}: both its weight (LoRA) and another parameter changed; "
                           "LoRA cannot hold such a module")
    if not (lora or rows or full):
        raise LorakitError(f"{tuned_dir}: identical to {base_dir}; nothing to extract")
    overall = kept / total if total else 1.0
    for key, r in report.items():
        if "energy" in r:
            print(f"  {key[:-7]:<48} energy {100 * r['energy']:7.3f}%  error {r['frobenius_error']:.3g}")
    print(f"lorakit extract-lora: {len(lora)} layers at rank {args.rank} keep {100 * overall:.3f}% of the change; "
          f"{sum(len(i) for i, _ in rows.values())} embedding rows, {len(full)} tensors saved whole")

    with atomic_dir(out, force=True) as tmp:
        write_adapter(tmp, lora, args.rank, rows=rows, full=full, base_model=str(base_dir))
        if any(tuned_dir.glob("tokenizer*")):
            AutoTokenizer.from_pretrained(tuned_dir).save_pretrained(tmp)
        diff = _check(base_dir, tuned_dir, tmp)
        write_json(tmp / "extract_report.json", {"rank": args.rank, "overall_energy": overall,
                                                  "max_logit_diff": diff, "layers": report})
        new_ids = read_run(tuned_dir).get("new_token_ids") or read_run(base_dir).get("new_token_ids") or []
        write_json(tmp / "run.json", run_info("extract", str(base_dir), new_token_ids=new_ids, tuned=str(tuned_dir),
                                              rank=args.rank, overall_energy=overall, max_logit_diff=diff))
    print(f"lorakit extract-lora: wrote {out}")
    return 0


def _check(base_dir: Path, tuned_dir: Path, adapter_dir: Path) -> float:
    """Max |logits(base + extracted adapter) − logits(tuned)| on the probe batch (reported; low rank is approximate)."""
    tok = None
    if any(tuned_dir.glob("tokenizer*")):
        tok = AutoTokenizer.from_pretrained(tuned_dir)
    rows = Checkpoint(tuned_dir).config.get("vocab_size") or (len(tok) if tok is not None else 2)
    ids = probe_batch(tok, rows, [])
    ref, _ = reference_logits(base_dir, [adapter_dir], "CAUSAL_LM", ids)
    diff = float((ref - model_logits(tuned_dir, "CAUSAL_LM", ids)).abs().max())
    print(f"lorakit extract-lora: max |logits(base + adapter) - logits(tuned)| = {diff:.3g} on the probe batch")
    return diff
