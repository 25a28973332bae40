"""`lorakit svd`: the best rank-K approximation of an adapter's ΔW per layer, or of a weighted sum of adapters, with the
energy (share of squared singular values) kept per layer and overall. Written by hand rather than through peft's
`add_weighted_adapter(combination_type='svd')` because that reports no energy and computes a dense ΔW per layer.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from lora_kit.errors import LorakitError
from lora_kit.export.common import (
    Adapter,
    Checkpoint,
    Lora,
    adapter_tokenizer_dir,
    find_base,
    new_token_ids,
    read_adapter,
    write_adapter,
)
from lora_kit.rundir import atomic_dir, check_writable, read_run, run_info, write_json


def add_arguments(p) -> None:
    """Options of `lorakit svd`: adapters with weights, target rank, output."""
    p.add_argument("--adapter", action="append", required=True, help="adapter directory; repeat to combine")
    p.add_argument("--weights", help="comma-separated weight per adapter (default 1 each)")
    p.add_argument("--rank", type=int, required=True, help="rank K of the output adapter")
    p.add_argument("--output", required=True, help="output adapter directory")
    p.add_argument("--model", help="base model, needed only to combine trained token rows or heads")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def factor_svd(factors: list[tuple[float, Lora]], rank: int) -> tuple[Lora, torch.Tensor]:
    """Rank-`rank` factors of ΔM = Σ w·scale·B@A (in the weight's storage orientation) and all its singular values.

    QR of the stacked factors reduces the SVD to a (Σr × Σr) core, so no dense out×in matrix is ever formed.
    """
    B = torch.cat([w * f.scale * f.B.double() for w, f in factors], dim=1)  # out × Σr
    A = torch.cat([f.A.double() for _, f in factors], dim=0)  # Σr × in
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    new_b = torch.zeros(B.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, A.shape[1], dtype=torch.float64)
    new_b[:, :k] = (qb @ u[:, :k]) * root
    new_a[:k] = root[:, None] * (vh[:k] @ qa.T)
    first = factors[0][1]
    return Lora(new_a.float(), new_b.float(), 1.0, first.transpose, first.embedding), s


def energy(s: torch.Tensor, rank: int) -> tuple[float, float]:
    """(share of Σσ² kept by the first `rank` values, Frobenius error = sqrt of the discarded σ²)."""
    total = float((s ** 2).sum())
    kept = float((s[:rank] ** 2).sum())
    return (kept / total if total > 0 else 1.0), float((s[rank:] ** 2).sum()) ** 0.5


def combine_tensors(adapters: list[Adapter], weights: list[float], kind: str, base_dir=None):
    """Token rows / saved modules: copied from a single adapter at weight 1, else base + Σ w·(value − base)."""
    keys = sorted({k for a in adapters for k in getattr(a, kind)})
    out = {}
    ckpt = None
    for key in keys:
        have = [(w, a) for w, a in zip(weights, adapters) if key in getattr(a, kind)]
        if len(have) == 1 and have[0][0] == 1.0:
            out[key] = getattr(have[0][1], kind)[key]
            continue
        if base_dir is None:
            raise LorakitError(f"combining {key} from several adapters (or weighted) needs the base model's values; "
                               "pass --model or keep base_model in run.json")
        ckpt = ckpt or Checkpoint(base_dir)
        if key not in ckpt:
            raise LorakitError(f"{key}: saved whole in {have[0][1].path} and absent from {base_dir}; "
                               "such a module cannot be combined by weight")
        base = ckpt.get(key).float()
        if kind == "rows":
            idx = torch.tensor(sorted({int(i) for _, a in have for i in a.rows[key][0]}), dtype=torch.long)
            val = base[idx].clone()
            for w, a in have:
                i, v = a.rows[key]
                pos = torch.searchsorted(idx, i)
                val[pos] += w * (v.float() - base[i])
            out[key] = (idx, val)
        else:
            out[key] = base + sum(w * (a.full[key].float() - base) for w, a in have)
    return out


def main(args) -> int:
    """`lorakit svd`: a rank-K adapter of the weighted sum of the adapters' updates, with the energy kept per layer."""
    out = Path(args.output)
    check_writable(out, args.force)
    if args.rank < 1:
        raise LorakitError(f"--rank must be ≥ 1, got {args.rank}")
    paths = [Path(a) for a in args.adapter]
    adapters = [read_adapter(p) for p in paths]
    weights = [1.0] * len(adapters)
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise LorakitError(f"--weights: expected numbers like 0.7,0.3, got '{args.weights}'") from None
        if len(weights) != len(adapters):
            raise LorakitError(f"--weights has {len(weights)} values for {len(adapters)} adapters")
    tasks = {a.task_type for a in adapters}
    if len(tasks) > 1:
        raise LorakitError(f"adapters have different task types {sorted(tasks)}; combine adapters of one kind")
    bases = {read_run(p).get("base_model") for p in paths} - {None}
    if len(bases) > 1:
        print(f"lorakit svd: warning: adapters name different base models {sorted(bases)}")
    try:
        base_dir = find_base(paths, args.model)
    except LorakitError:
        base_dir = None

    report, lora, total, kept = {}, {}, 0.0, 0.0
    keys = sorted({k for a in adapters for k in a.lora})

    for key in tqdm(keys, desc="svd", disable=len(keys) < 8):
        factors = [(w, a.lora[key]) for w, a in zip(weights, adapters) if key in a.lora]
        shapes = {(tuple(f.A.shape[1:]), tuple(f.B.shape[:1])) for _, f in factors}
        if len(shapes) > 1:
            raise LorakitError(f"{key}: adapters disagree on the layer's shape {sorted(shapes)}; different base models")
        lora[key], s = factor_svd(factors, args.rank)
        share, err = energy(s, args.rank)
        total += float((s ** 2).sum())
        kept += share * float((s ** 2).sum())
        report[key] = {"input_rank": sum(f.A.shape[0] for _, f in factors), "energy": share, "frobenius_error": err,
                       "singular_values": [float(x) for x in s[: max(args.rank * 2, 8)]]}
    overall = kept / total if total > 0 else 1.0
    for key, r in report.items():
        print(f"  {key[:-7]:<48} rank {r['input_rank']:>3} -> {args.rank}: energy {100 * r['energy']:7.3f}%")
    print(f"lorakit svd: overall energy retained at rank {args.rank}: {100 * overall:.3f}% over {len(report)} layers")

    rows = combine_tensors(adapters, weights, "rows", base_dir)
    full = combine_tensors(adapters, weights, "full", base_dir)
    with atomic_dir(out, force=True) as tmp:
        write_adapter(tmp, lora, args.rank, rows=rows, full=full, task_type=tasks.pop(),
                      base_model=str(base_dir) if base_dir else None)
        tok_dir = adapter_tokenizer_dir(paths, paths[0])
        if tok_dir is not None and any(tok_dir.glob("tokenizer*")):
            AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp)
        write_json(tmp / "svd_report.json", {"rank": args.rank, "overall_energy": overall, "layers": report})
        write_json(tmp / "run.json", run_info("svd", str(base_dir or ""), new_token_ids=new_token_ids(paths),
                                              adapters=[str(p) for p in paths], weights=weights, rank=args.rank,
                                              overall_energy=overall))
    print(f"lorakit svd: wrote {out}")
    return 0
