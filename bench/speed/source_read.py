"""Reading source images: a local S3-compatible server against local disk, through the readers
stage 1 and stage 2 use (`images.fetch` for objects and tar members, `np.fromfile` as
`decode.ImageBatches` reads a local file), side by side in one run.

    python bench/speed/source_read.py OUT [--images 512] [--batch 64] [--rounds 5] [--json F]

Four arms over the same N JPEGs (real photos at about 500 x 375 px, re-encoded so each file
differs): local files, local tar shards (one ranged read per image), objects on a moto S3 server
started here on 127.0.0.1 (a batch fetched together, concurrently), and the shards on that
server (ranged reads, concurrently). Each round reads every image once in batches of --batch,
the arms in turn; the median round gives images/s and MB/s per arm, and every arm's bytes are
checked against the files. Count first: a local read is one open + read per file (page cache
warm after the first round); an object read is one HTTP GET per image, so the server's per-request
cost bounds it; moto is a Python server on the same cores, a lower bound for real object storage.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np


def photos(out: Path, n: int) -> list[Path]:
    from PIL import Image
    from skimage import data

    base = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    folder = out / "files"
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        image = Image.fromarray(base[i % len(base)]).convert("RGB").resize((500 + i % 7, 375))
        path = folder / f"img_{i:06d}.jpg"
        image.save(path, quality=85 + i % 10)
        paths.append(path)
    return paths


def shards(out: Path, paths: list[Path], per_shard: int) -> list[Path]:
    made = []
    for s in range(0, len(paths), per_shard):
        shard = out / f"shards-{s // per_shard:06d}.tar"
        with tarfile.open(shard, "w") as tar:
            for path in paths[s : s + per_shard]:
                data = path.read_bytes()
                info = tarfile.TarInfo(path.name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        made.append(shard)
    return made


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return process, endpoint
        except urllib.error.HTTPError:
            return process, endpoint
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"moto_server did not start: {log.read_text()[-1000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: name a new folder.")
    args.out.mkdir(parents=True)
    paths = photos(args.out, args.images)
    local_shards = shards(args.out, paths, 128)
    process, endpoint = start_server(args.out / "moto.log")
    os.environ.update(
        {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
         "AWS_DEFAULT_REGION": "us-east-1"}
    )  # fmt: skip
    try:
        import s3fs

        from beit.shared.images import fetch, read_source

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(str(args.out / "files"), "bench/", recursive=True)
        for shard in local_shards:
            fs.put(str(shard), f"bench/{shard.name}")
        expected = [p.read_bytes() for p in paths]
        last = len(local_shards) - 1
        items = {
            "local files": list(paths),
            "local tar shards": read_source(f"{args.out}/shards-{{000000..{last:06d}}}.tar").files,
            "S3 objects": [f"s3://bench/files/{p.name}" for p in paths],
            "S3 tar shards": read_source(f"s3://bench/shards-{{000000..{last:06d}}}.tar").files,
        }

        def read(arm: str, batch: list) -> list[bytes]:
            if arm == "local files":  # as ImageBatches reads a local file
                return [np.fromfile(p, dtype=np.uint8).tobytes() for p in batch]
            got = fetch(batch)
            return [got[item] for item in batch]

        for arm, arm_items in items.items():  # every arm reads the right bytes
            assert read(arm, arm_items) == expected, arm
        times: dict[str, list[float]] = {arm: [] for arm in items}
        for _ in range(args.rounds):
            for arm, arm_items in items.items():
                t0 = time.perf_counter()
                for b in range(0, len(arm_items), args.batch):
                    read(arm, arm_items[b : b + args.batch])
                times[arm].append(time.perf_counter() - t0)
    finally:
        process.terminate()
        process.wait(timeout=30)
    total = sum(len(e) for e in expected)
    rows = {}
    for arm, seconds in times.items():
        median = statistics.median(seconds)
        rows[arm] = {"median_s": median, "images_per_s": args.images / median, "mb_per_s": total / median / 1e6}
    base = rows["local files"]["images_per_s"]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "images": args.images,
        "mean_bytes": total / args.images,
        "batch": args.batch,
        "rounds": args.rounds,
        "arms": rows,
    }
    (args.json or args.out / "source_read.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nreading {args.images} JPEGs ({total / args.images / 1e3:.0f} kB each) in batches of {args.batch}, "
          f"median of {args.rounds} rounds ({result['machine']}, {result['date']})\n")  # fmt: skip
    print(f"{'arm':<18} {'images/s':>10} {'MB/s':>8} {'vs local files':>15}")
    for arm, row in rows.items():
        print(f"{arm:<18} {row['images_per_s']:>10.0f} {row['mb_per_s']:>8.1f} {row['images_per_s'] / base:>14.2f}x")


if __name__ == "__main__":
    main()
