"""Issue 15's scale figures: stage 2's start-up and memory per rank with the store's arrays mapped
once per node, and stage 1's start-up from a list file, at ImageNet-1k's size, extrapolated to
ImageNet-22k's by each figure's counted growth.

    python bench/speed/scale.py OUT                      # 1,281,167 images x 10 views, 14x14 tokens, 2 ranks
    python bench/speed/scale.py OUT --images 20000 --small 5000      # a quick rehearsal

1. A synthetic store of N images x V views (random tokens below 8192, views drawn as stage 1
   draws them for 500 x 375 images, every image done), made through `TokenStore.prepare` and
   `write_chunk` like stage 1's; its keys are ImageNet-like paths in a list file. Only the images
   the first batches of each rank read exist on disk (hard links to a few real photos): the
   measurement is start-up, not training.
2. Stage 2: R processes started at once as ranks 0..R-1 (RANK / WORLD_SIZE / LOCAL_RANK as torchrun
   sets them), each building `train.data.PretrainData` (`TokenStore.node_copy` into OUT's cache
   folder, the first to ask writes it) and taking its first batches; twice: cold (the node's copy
   is written) and warm (a later run maps it). Per rank: seconds to the first batch, and from
   /proc/self/smaps_rollup its anonymous (private) memory and the file pages it maps, both less
   what the process held before (after its imports); and the node copy's size on disk.
3. Stage 1: what `beit tokenize` does before its first batch on rank 0, timed step by step in a
   fresh process: `read_source` of the list file, its fingerprint (`describe`), `TokenStore.prepare`
   (writing the keys and labels), `pending_chunks`; peak resident memory.
Each step runs at N and at a small N (--small); a figure's growth per image is the difference of the
two over the difference of their N, and 14.2M is extrapolated along it. The counted figures (bytes
per image of each array) stand beside the measured ones. Writes OUT/scale.json; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

IMAGENET_22K = 14_197_122
START = time.perf_counter()


def memory() -> dict[str, int]:
    """This process's memory (bytes) from /proc/self/smaps_rollup: rss, anonymous, file (mapped file pages)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return {"rss": fields["Rss"], "anonymous": fields["Anonymous"], "file": fields["Rss"] - fields["Anonymous"]}


def mapped_under(folder: str) -> int:
    """Resident bytes of this process's mappings of files under `folder` (the node copy), from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
            inside = len(head) >= 6 and head[5].startswith(folder)
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def keys_of(n: int) -> list[str]:
    return [f"train/n{i % 1000:05d}/n{i % 1000:05d}_{i:08d}.JPEG" for i in range(n)]


def build(out: Path, n: int, views: int, grid: int, batch: int, ranks: int, steps: int) -> Path:
    """The synthetic store at out/store and its list file at out/source/list.txt."""
    from beit.shared.store import DONE, TokenStore
    from beit.shared.views import JITTER_PLACEMENT, PARAMS, ViewConfig, draw_views
    from beit.train.pretrain.data import SamplePlan, Sampling

    source = out / "source"
    source.mkdir(parents=True, exist_ok=True)
    keys = keys_of(n)
    labels = [i % 1000 for i in range(n)]
    (source / "list.txt").write_text("".join(f"{k} {label}\n" for k, label in zip(keys, labels, strict=True)))
    view_cfg = ViewConfig(image_size=grid * 16, tokenizer_size=grid * 8)
    identity = {
        "tokenizer": {"kind": "synthetic", "sha256": "0" * 64, "vocab_size": 8192, "input_size": grid * 8,
                      "grid": [grid, grid], "downsample": 8, "arch": {}},
        "views": {"count": views, "seed": 0, "config": asdict(view_cfg), "params": list(PARAMS),
                  "jitter": JITTER_PLACEMENT, "renderer": {}, "patch_size": 16},
        "source": {"kind": "list", "images": n, "fingerprint": "synthetic", "classes": 1000},
        "grid": [grid, grid],
    }  # fmt: skip
    store = TokenStore.prepare(
        out / "store", identity, keys, labels, [f"n{c:05d}" for c in range(1000)], 4096, False, True
    )
    store.record_run(source, out / "no-tokenizer", {"body": "fp32", "tf32": False, "device": "cpu"})
    rng = np.random.default_rng(0)
    for start, stop in store.chunks():
        m = stop - start
        sizes = np.tile(np.array([[375, 500]], dtype=np.int32), (m, 1))
        params = draw_views(0, np.arange(start, stop), sizes, views, view_cfg)
        tokens = rng.integers(0, 8192, (m, views, grid, grid), dtype=np.uint16)
        store.write_chunk(start, tokens, params, np.full(m, DONE, np.uint8), [""] * m, None, sizes)
    store.mark_complete()
    # the images the first batches (and the prefetched ones, and the start-up check) read: real photos
    done = np.arange(n)
    needed = set(range(16))
    for rank in range(ranks):
        plan = SamplePlan(done, views, (grid, grid), Sampling(batch, 0, rank, ranks))
        for step in range(steps + 4):
            needed.update(int(i) for i in plan.at(step)[0])
    photos = real_photos(out / "photos")
    for j, i in enumerate(sorted(needed)):
        path = source / keys[i]
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.link(photos[j % len(photos)], path)
    return out / "store"


def real_photos(folder: Path) -> list[Path]:
    """A few real photos as 500 x 375 JPEGs (scikit-image's sample data; a drawn one without it)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    try:
        from skimage import data

        arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    except ImportError:
        y, x = np.mgrid[0:375, 0:500]
        arrays = [np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)]
    paths = []
    for i, array in enumerate(arrays):
        path = folder / f"photo{i}.jpg"
        Image.fromarray(array).convert("RGB").resize((500, 375)).save(path, quality=90)
        paths.append(path)
    return paths


def stage2_worker(store: str, batch: int, steps: int, cache: str, out: str) -> None:
    """One rank of stage 2's start-up (RANK and WORLD_SIZE from the environment)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from beit.train.pretrain.data import PretrainData, Sampling

    imported = time.perf_counter()
    before = memory()
    data = PretrainData(store, Sampling(batch, 0, rank, world), threads=1, data_cache=cache)
    built = time.perf_counter()
    stream = data.stream(0)
    for _ in range(steps):
        next(stream)
    first = time.perf_counter()
    after = memory()
    store_pages = mapped_under(str(Path(cache).resolve()))
    stream.close()
    result = {
        "rank": rank,
        "imports_s": imported - START,
        "build_s": built - imported,
        "first_batches_s": first - built,
        "startup_s": first - imported,
        "before": before,
        "after": after,
        "private_bytes": after["anonymous"] - before["anonymous"],
        "mapped_file_bytes": after["file"] - before["file"],  # libraries loaded since, and the node copy
        "mapped_store_bytes": store_pages,  # the node copy's pages this rank has resident
    }
    Path(out).write_text(json.dumps(result) + "\n")


def stage2(out: Path, store: Path, batch: int, ranks: int, steps: int) -> dict:
    """Cold (the node copy is written) and warm (it is mapped) start-ups of `ranks` ranks at once."""
    cache = out / "cache"
    runs = {}
    for phase in ("cold", "warm"):
        processes = []
        for rank in range(ranks):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank)}
            env["OMP_NUM_THREADS"] = "1"
            report = out / f"stage2-{phase}-{rank}.json"
            command = [sys.executable, __file__, "--stage2-worker", str(store), str(batch), str(steps), str(cache)]
            processes.append((subprocess.Popen([*command, str(report)], env=env), report))
        rows = []
        for process, report in processes:
            if process.wait() != 0:
                raise SystemExit(f"the stage 2 worker failed (exit {process.returncode})")
            rows.append(json.loads(report.read_text()))
        runs[phase] = rows
    copy = next(p for p in cache.glob("beit-store-*") if p.is_dir())
    runs["node_copy_bytes"] = sum(p.stat().st_size for p in copy.iterdir())
    return runs


STAGE1 = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from beit.shared.images import read_source
from beit.shared.store import TokenStore
t1 = time.perf_counter()
src = read_source(Path(sys.argv[1]), every_entry=True)
t2 = time.perf_counter()
described = src.describe()
t3 = time.perf_counter()
identity = {"tokenizer": {}, "views": {"count": 10}, "source": described, "grid": [14, 14]}
store = TokenStore.prepare(sys.argv[2], identity, src.keys, src.labels, src.class_names, 256, False, True)
t4 = time.perf_counter()
pending = store.pending_chunks()
t5 = time.perf_counter()
print(json.dumps({"list_s": t2 - t1, "fingerprint_s": t3 - t2, "prepare_s": t4 - t3, "pending_s": t5 - t4,
                  "startup_s": t5 - t1, "chunks": len(pending),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def stage1(out: Path) -> dict:
    """Stage 1's start-up on rank 0 from the list file, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", STAGE1, str(out / "source" / "list.txt"), str(out / "stage1-store")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(out: Path, n: int, args) -> dict:
    t0 = time.perf_counter()
    store = build(out, n, args.views, args.grid, args.batch, args.ranks, args.steps)
    built = time.perf_counter() - t0
    return {"images": n, "build_s": built, "stage2": stage2(out, store, args.batch, args.ranks, args.steps),
            "stage1": stage1(out)}  # fmt: skip


def extrapolate(small: float, large: float, n_small: int, n_large: int, n: int) -> float:
    """The value at `n` on the line through (n_small, small) and (n_large, large)."""
    return large + (large - small) / (n_large - n_small) * (n - n_large)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--stage2-worker":
        store, batch, steps, cache, out = sys.argv[2:7]
        return stage2_worker(store, int(batch), int(steps), cache, out)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=1_281_167)
    parser.add_argument("--small", type=int, default=128_000, help="the second size, for each figure's growth")
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="batches each rank takes at start-up")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: name a new folder (the bench writes several GB there).")
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "settings": vars(args) | {"out": str(args.out)},
    }
    for name, n in (("small", args.small), ("full", args.images)):
        print(f"measuring at {n:,} images ...", flush=True)
        results[name] = measure(args.out / name, n, args)
    v, g = args.views, args.grid
    counted = {  # bytes per image of what the node holds (mapped) and what the old code held per rank
        "tokens": v * g * g * 2,
        "views": v * 8 * 4,
        "status + sizes + key offsets": 1 + 8 + 8,
        "keys (UTF-8, these paths)": len(keys_of(1)[0]),
    }
    results["counted_bytes_per_image"] = counted
    table = summarise(results, args)
    results["table"] = table
    (args.out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nscale ({results['machine']}, {results['date']}): {args.ranks} ranks, V={v}, {g}x{g} tokens\n")
    print(f"{'figure':<52} {args.small:>12,} {args.images:>12,} {IMAGENET_22K:>14,}")
    for row in table:
        print(f"{row[0]:<52} {row[1]:>12} {row[2]:>12} {row[3]:>14}")
    print(f"\ncounted bytes per image: {counted} -> node copy for 14.2M: "
          f"{sum(counted.values()) * IMAGENET_22K / 2**30:.1f} GiB; results in {args.out}/scale.json")  # fmt: skip


def summarise(results: dict, args) -> list[tuple[str, str, str, str]]:
    small, full = results["small"], results["full"]
    n0, n1 = small["images"], full["images"]

    def row(name: str, get, unit: str) -> tuple[str, str, str, str]:
        a, b = get(small), get(full)
        c = extrapolate(a, b, n0, n1, IMAGENET_22K)
        if unit == "GiB":
            return name, f"{a / 2**30:.2f}", f"{b / 2**30:.2f}", f"{c / 2**30:.2f}"
        return name, f"{a:.2f}", f"{b:.2f}", f"{c:.2f}"

    def worst(phase: str, key: str):
        return lambda r: max(rank[key] for rank in r["stage2"][phase])

    return [
        row("stage 2 cold start, slowest rank (s)", worst("cold", "startup_s"), "s"),
        row("stage 2 warm start, slowest rank (s)", worst("warm", "startup_s"), "s"),
        row("stage 2 private memory per rank, warm, max (GiB)", worst("warm", "private_bytes"), "GiB"),
        row("stage 2 private memory per rank, cold, max (GiB)", worst("cold", "private_bytes"), "GiB"),
        row("stage 2 node-copy pages resident per rank, warm, max (GiB)", worst("warm", "mapped_store_bytes"), "GiB"),
        row("stage 2 other file pages mapped (libraries), max (GiB)", worst("warm", "mapped_file_bytes"), "GiB"),
        row("node copy on disk / in page cache, per node (GiB)", lambda r: r["stage2"]["node_copy_bytes"], "GiB"),
        row("stage 1 start-up on rank 0 (s)", lambda r: r["stage1"]["startup_s"], "s"),
        row("  listing the list file (s)", lambda r: r["stage1"]["list_s"], "s"),
        row("  fingerprint (s)", lambda r: r["stage1"]["fingerprint_s"], "s"),
        row("  making the store, keys and labels (s)", lambda r: r["stage1"]["prepare_s"], "s"),
        row("  pending chunks, one read of status (s)", lambda r: r["stage1"]["pending_s"], "s"),
        row("stage 1 peak resident memory, rank 0 (GiB)", lambda r: r["stage1"]["peak_rss_bytes"], "GiB"),
    ]


if __name__ == "__main__":
    main()
