"""What hashing a dataset's images for a teacher cache's identity costs, per file.

    python experiments/hash_cost.py                      # 2,000 files of 200 kB in a temp folder
    python experiments/hash_cost.py --files 200 --kb 1000 --dir /data/scratch

A teacher cache's data identity (`data_identity` in drivekd/distill/cache.py) hashes every image
file whole with SHA-256, read in 1 MiB chunks, so that a file changed anywhere invalidates the
cache. This times that, in one thread, on files of random bytes read back from the page cache, and
for comparison the earlier rule (the first 64 KiB only).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def hash_whole(path: Path) -> str:
    """The cache's rule: SHA-256 of the whole file (`drivekd.digest`, what `data_identity` calls)."""
    from drivekd.digest import sha256_of

    return sha256_of(path)


def hash_head(path: Path, size: int = 64 << 10) -> str:
    """The earlier rule: SHA-256 of the first 64 KiB."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def timed(fn: Callable[[Path], str], paths: list[Path]) -> float:
    start = time.perf_counter()
    for p in paths:
        fn(p)
    return time.perf_counter() - start


def measure(folder: Path, files: int, kb: int, seed: int = 0) -> dict[str, float]:
    """Write `files` files of `kb` kB of random bytes into `folder`; seconds each rule takes over all."""
    rng = random.Random(seed)
    paths = []
    for i in range(files):
        p = folder / f"blob-{i}.bin"
        p.write_bytes(rng.randbytes(kb * 1000))
        paths.append(p)
    for p in paths:  # into the page cache, where a second pass over a dataset finds them
        p.read_bytes()
    return {"whole file": timed(hash_whole, paths), "first 64 KiB": timed(hash_head, paths)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="how many files")
    parser.add_argument("--kb", type=int, default=200, help="size of each file, kB")
    parser.add_argument("--dir", type=Path, default=None, help="where to write them (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        seconds = measure(Path(tmp), args.files, args.kb)
    for name, s in seconds.items():
        print(f"SHA-256 of the {name}: {s:.2f} s for {args.files} files ({s / args.files * 1000:.3f} ms a file)")
    mb_per_s = args.files * args.kb / 1000 / seconds["whole file"]
    print(f"whole files at {mb_per_s:.0f} MB/s, one thread ({os.cpu_count()} CPUs here)")
    return seconds


if __name__ == "__main__":
    main()
