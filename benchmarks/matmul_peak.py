"""This machine's matmul peak: GFLOP/s of a 2048x576 @ 576x1536 matmul (a SmolLM2 MLP projection over 2048 tokens) in
fp32, bf16, and fp32 under bf16 autocast. The reference for achieved training FLOP/s; it also shows whether bf16 pays
off here (with AMX it does; with avx512_bf16 alone it was slower). Run: python benchmarks/matmul_peak.py [--repeats 20]
"""
import argparse
import time

import torch


def gflops(dtype, repeats: int, autocast: bool = False) -> float:
    a, w = torch.randn(2048, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        a @ w.T
        best = float("inf")
        for _ in range(3):  # best of 3 rounds: identical runs vary by ~25% on shared machines
            start = time.perf_counter()
            for _ in range(repeats):
                a @ w.T
            best = min(best, time.perf_counter() - start)
    return repeats * 2 * 2048 * 576 * 1536 / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    print(f"threads {torch.get_num_threads()}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    fp32 = gflops(torch.float32, args.repeats)
    bf16 = gflops(torch.bfloat16, args.repeats)
    auto = gflops(torch.float32, args.repeats, autocast=True)
    print(f"fp32 {fp32:.0f} GFLOP/s | bf16 {bf16:.0f} GFLOP/s | fp32 under bf16 autocast {auto:.0f} GFLOP/s | "
          f"bf16/fp32 {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
