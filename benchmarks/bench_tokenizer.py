"""The emulator's word tokenizer: encode time of long prompts, fast path against plain path.

    python benchmarks/bench_tokenizer.py            # a few seconds

The emulator encodes every prompt it serves (100k-token prompts in the seed matrix), so its
tokenizer must stay a small share of a request's modeled time. Printed per prompt length:
the best of 5 encodes with the fast path (the default) and with the plain path, and their
ratio, measured in one run.
"""

from __future__ import annotations

import random
import time

from pytest_kvcache.emulator.tokenizer import WordTokenizer


def best_encode_seconds(tok: WordTokenizer, text: str, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tok.encode(text)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    fast, plain = WordTokenizer(), WordTokenizer()
    if not fast.enable_fast():
        raise SystemExit("the fast path is unavailable here")
    rng = random.Random(2)
    print(f"{'words':>8}  {'fast ms':>8}  {'plain ms':>9}  {'plain/fast':>10}")
    for n in (1_000, 10_000, 100_000):
        ids = [rng.randrange(fast.vocab_size) for _ in range(n)]
        text = fast.decode(ids)
        assert fast.encode(text) == plain.encode(text) == ids
        f, p = best_encode_seconds(fast, text), best_encode_seconds(plain, text)
        print(f"{n:>8}  {f * 1e3:>8.2f}  {p * 1e3:>9.2f}  {p / f:>10.1f}")


if __name__ == "__main__":
    main()
