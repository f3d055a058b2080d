"""The storage phase's own overhead: bytes/s through the harness's disk tier against raw
``dd`` with O_DIRECT, same block sizes, same disk.

    python benchmarks/bench_storage.py                 # a few seconds, in a temporary folder
    python benchmarks/bench_storage.py --dir /mnt/nvme --mib 256

For each block size: N blocks written then read back in order, through a one-tier
:class:`~pytest_kvcache.storage.Hierarchy` over a :class:`~pytest_kvcache.storage.DiskTier`
(lock, LRU bookkeeping, timing, aligned buffers, bytes objects: what a storage item
pays), and by ``dd oflag=direct`` / ``dd iflag=direct`` (dd's own reported time). The best
of ``--repeats`` runs of each; printed as MB/s and the harness/dd ratio (1.0: no
overhead). A disk tier that could not use O_DIRECT says so and the comparison is moot.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_kvcache.storage import DiskTier, Hierarchy, TierSpec  # noqa: E402

BLOCK_SIZES = (64 * 1024, 512 * 1024, 2 * 1024 * 1024)


def harness_seconds(folder: Path, block: int, count: int) -> tuple[float, float, str]:
    """(write seconds, read seconds, the tier's description) for ``count`` blocks."""
    tier = DiskTier(TierSpec("disk", block * count), block, folder)
    hierarchy = Hierarchy([tier])
    data = bytes(range(256)) * (block // 256)
    try:
        start = time.perf_counter()
        for i in range(count):
            hierarchy.write(f"b{i}", data)
        wrote = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(count):
            if hierarchy.read(f"b{i}") is None:
                raise SystemExit(f"block b{i} lost")
        return wrote, time.perf_counter() - start, tier.description
    finally:
        hierarchy.close()


def _dd(args: list[str]) -> float:
    done = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    match = re.search(r"copied, ([0-9.]+) s", done.stderr)
    if not match:
        raise SystemExit(f"dd said: {done.stderr.strip()}")
    return float(match.group(1))


def dd_seconds(folder: Path, block: int, count: int) -> tuple[float, float]:
    path = folder / "dd.bin"
    try:
        wrote = _dd(["if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", "oflag=direct"])
        read = _dd([f"if={path}", "of=/dev/null", f"bs={block}", f"count={count}", "iflag=direct"])
        return wrote, read
    finally:
        path.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="a folder on the disk to measure (default: a temporary one)")
    parser.add_argument("--mib", type=int, default=32, help="MiB moved per block size and direction")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("dd") is None:
        raise SystemExit("dd is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-storage-", dir=args.dir) as scratch:
        folder = Path(scratch)
        print(f"{'block':>8}  {'op':>5}  {'harness MB/s':>12}  {'dd MB/s':>8}  {'harness/dd':>10}")
        for block in BLOCK_SIZES:
            count = max(1, args.mib * 2**20 // block)
            ours = [harness_seconds(folder, block, count) for _ in range(args.repeats)]
            raw = [dd_seconds(folder, block, count) for _ in range(args.repeats)]
            for op, index in (("write", 0), ("read", 1)):
                mine = block * count / min(r[index] for r in ours) / 1e6
                theirs = block * count / min(r[index] for r in raw) / 1e6
                print(f"{block // 1024:>6}Ki  {op:>5}  {mine:>12.0f}  {theirs:>8.0f}  {mine / theirs:>10.2f}")
        print(f"harness tier: {ours[0][2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
