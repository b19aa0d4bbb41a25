"""Stage 1: tokenize V augmented views of every image into a token store.

    beit tokenize SOURCE STORE --tokenizer tok.safetensors [--views 10] [--seed 0] [--embed-images]
    torchrun --nproc_per_node 4 -m beit tokenize SOURCE STORE --tokenizer tok.safetensors

Per batch of images: DALI peeks each image's size (after EXIF orientation); the views'
parameters are drawn for (seed, image, view) (`beit.shared.views`); DALI decodes each image
once and renders its V tokenizer views (crop box, Lanczos to the tokenizer's size, colour
jitter, flip); the dVAE tokenizes them (`dvae.Precision`: fp16 with TF32 logits on a GPU, fp32
on the CPU). A data thread peeks, draws and renders the next batches while the encoder runs;
the token ids come back to the host without waiting, once per chunk. Work is done a store
chunk at a time, chunks dealt round-robin to torchrun ranks; a chunk is written whole, its
status last, so a killed run resumes where it stopped and gives the same store. Files that
cannot be decoded are marked failed with their error and skipped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import fsspec
import numpy as np
import torch

from beit.shared.decode import ImageBatches, as_tensor
from beit.shared.dist import DEFAULT_TIMEOUT_MINUTES, dali_device_id, init_dist
from beit.shared.dvae import Precision, check_grid, encoder_sha256, load_tokenizer
from beit.shared.images import (
    expand_shards,
    fetch,
    file_size,
    is_remote,
    is_shards,
    join,
    read_bytes,
    read_source,
    source_root,
)
from beit.shared.prefetch import ahead
from beit.shared.progress import progress_bar
from beit.shared.store import DONE, FAILED, TokenStore
from beit.shared.views import JITTER_PLACEMENT, PARAMS, ViewConfig, draw_views, render_builder, shape_builder


@dataclass
class TokenizeConfig:
    # the lowest value of each key listed (load_config checks them)
    MINIMUM: ClassVar[dict[str, int]] = {**dict.fromkeys(("views", "batch_size", "chunk_images"), 1), "threads": 0}

    views: int = 10
    seed: int = 0
    batch_size: int = 16  # images per DALI batch (each rendered V times)
    chunk_images: int = 256  # images per store chunk: the unit of work, resume and sharding
    patch_size: int = 16
    view: ViewConfig = field(default_factory=ViewConfig)
    embed_images: bool = False
    strict: bool = False
    threads: int = 0  # DALI's CPU threads per rank; 0: the machine's cores shared among its local ranks
    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # the encoder's body; auto: fp16 on a GPU
    # fp32 convolutions (the logits) on TF32 tensor cores, on a GPU: the logits conv is an eighth of the
    # released encoder's FLOPs, and strict fp32 runs it at a fraction of the speed; agreement with
    # strict fp32 is measured by bench/speed/dvae.py for exactly this policy
    tf32: bool = True
    dist_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES  # torchrun: how long ranks wait while rank 0 prepares


RENDERER = {
    "tokenizer": "DALI slice + resize(Lanczos3, antialias) + color_twist + flip, [0,1] then map_pixels",
    "patches": "DALI slice + resize(cubic, antialias) + color_twist + flip, ImageNet mean/std",
}


def stack_views(outputs: list, pin: bool) -> torch.Tensor:
    """The V rendered views of a batch, [m, V, 3, s, s]: on the GPU when DALI rendered them there,
    else in page-locked memory for a GPU encoder (`pin`)."""
    if isinstance(outputs[0], torch.Tensor):
        return torch.stack(outputs, dim=1)
    return as_tensor(np.stack(outputs, axis=1), pin)


def to_host(ids: torch.Tensor) -> torch.Tensor:
    """`ids` on the CPU: without waiting when they are on a GPU (into page-locked memory; the
    caller synchronises before reading them)."""
    if ids.device.type != "cuda":
        return ids
    host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    return host.copy_(ids, non_blocking=True)


def tokenize(
    source: Path | str,
    store_path: str,
    tokenizer_path: Path,
    cfg: TokenizeConfig,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Run stage 1; returns the summary (also written as JSON next to a local store)."""
    entered = time.perf_counter()
    dist = init_dist(timeout_minutes=cfg.dist_timeout_minutes)
    device = dist.device(cfg.device)
    device_id = dali_device_id(device)
    precision = Precision.resolve(cfg.precision, cfg.tf32, device)

    listing: list = []  # rank 0's listing of the source: the only one

    def list_source() -> list[str]:
        """On rank 0 alone: list the source; up to 64 of its files spread over it (for tar shards,
        the shards)."""
        src = read_source(source, every_entry=True)  # the store accounts for every entry named like an image
        listing.append(src)
        names = sorted({key.split("/", 1)[0] for key in src.keys}) if src.kind == "shards" else src.keys
        return [names[i] for i in sorted({round(x) for x in np.linspace(0, len(names) - 1, min(len(names), 64))})]

    # every rank reads rank 0's listing from the store, under its own mount of the source: it must
    # see the same files there (a sample of them, with their sizes), before anything is written
    sampled = dist.on_main(list_source)
    root = source_root(expand_shards(str(source))[0] if is_shards(source) else source)
    seen = [(key, file_size(join(root, key))) for key in sampled]
    digest = hashlib.sha256(repr(seen).encode()).hexdigest()
    dist.check_same_listing(f"the source {source} ({len(seen)} entries sampled)", digest, lambda: sorted(seen))
    tokenizer = load_tokenizer(tokenizer_path, device)
    view_cfg = ViewConfig(**{**asdict(cfg.view), "tokenizer_size": cfg.view.tokenizer_size or tokenizer.input_size})
    token_side = check_grid(view_cfg.tokenizer_size, tokenizer.cfg)
    if view_cfg.image_size % cfg.patch_size:
        raise ValueError(f"view.image_size {view_cfg.image_size} is not a multiple of patch_size {cfg.patch_size}.")
    patch_side = view_cfg.image_size // cfg.patch_size
    if token_side != patch_side:
        raise ValueError(
            f"the token grid ({view_cfg.tokenizer_size} px / {tokenizer.cfg.downsample} = {token_side}) does not match "
            f"the patch grid ({view_cfg.image_size} px / {cfg.patch_size} = {patch_side}): set view.tokenizer_size to "
            f"{patch_side * tokenizer.cfg.downsample} or view.image_size to {token_side * cfg.patch_size}."
        )
    identity = {
        "tokenizer": {
            "kind": "dall-e-dvae",
            "sha256": encoder_sha256(tokenizer),
            "vocab_size": tokenizer.cfg.vocab_size,
            "input_size": view_cfg.tokenizer_size,
            "grid": [token_side, token_side],
            "downsample": tokenizer.cfg.downsample,
            "arch": asdict(tokenizer.cfg),
        },
        "views": {
            "count": cfg.views,
            "seed": cfg.seed,
            "config": asdict(view_cfg),
            "params": list(PARAMS),
            "jitter": JITTER_PLACEMENT,
            "renderer": RENDERER,
            "patch_size": cfg.patch_size,
        },
        "grid": [token_side, token_side],
    }

    def start() -> tuple[bool, list[tuple[int, int]]]:
        """On rank 0 alone: make the store from its listing or reopen it to finish it (its `keys`
        are the listing every rank reads), and find its pending chunks in one read of `status`."""
        src = listing.pop()
        made = {**identity, "source": {k: v for k, v in src.describe().items() if k != "root"}}
        members = [(m.offset, m.size) for m in src.files] if src.kind == "shards" else None
        store = TokenStore.prepare(
            store_path, made, src.keys, src.labels, src.class_names, cfg.chunk_images, cfg.embed_images, overwrite,
            members,
        )  # fmt: skip
        store.record_run(src.root, tokenizer_path, {**asdict(precision), "device": device.type})
        return store.complete, store.pending_chunks()

    complete, pending = dist.on_main(start)
    store = TokenStore.open(store_path, mode="r+", require_complete=False)
    if complete:
        dist.close()
        summary = {"store": str(store_path), "already_complete": True, **store.counts}
        if dist.main:
            print(f"{store_path} is already complete ({summary.get('done', 0)} images tokenized): nothing to do.")
        return summary

    mine = pending[dist.rank :: dist.world]
    shapes = ImageBatches(shape_builder(cfg.threads), cfg.batch_size, None, cfg.seed)
    renders = ImageBatches(
        render_builder(cfg.views, view_cfg.tokenizer_size, "tokenizer", cfg.threads),
        cfg.batch_size,
        device_id,
        cfg.seed,
    )
    timing = {"peek": 0.0, "decode_render": 0.0, "wait": 0.0, "encoder": 0.0, "write": 0.0}
    cuda = device.type == "cuda"
    id_dtype = torch.int16 if tokenizer.cfg.vocab_size <= 2**15 else torch.int32  # fewer bytes to the host

    current: dict = {}  # the data thread's own: the chunk it is in, and that chunk's files

    def prepare(work: tuple[int, int, int]) -> tuple:
        """In the data thread: peek, draw and render one batch of a chunk (while the encoder runs
        on the batch before it). Objects and tar members are fetched once, for both pipelines
        (and for --embed-images). Returns the chunk's files with its first batch."""
        start, stop, b0 = work
        if current.get("start") != start:
            current.update(start=start, files=store.source_items(np.arange(start, stop), root))
        batch = current["files"][b0 : b0 + cfg.batch_size]
        files = current["files"] if b0 == 0 else None
        t0 = time.perf_counter()
        fetched = fetch([f for f in batch if is_remote(f)])
        peeked, kept = shapes.run(batch, fetched=fetched)
        t1 = time.perf_counter()
        timing["peek"] += t1 - t0
        if not kept:
            return work, files, fetched, kept, [], None, None, None
        drawn = draw_views(cfg.seed, np.asarray([start + b0 + k for k in kept]), peeked[0], cfg.views, view_cfg)
        feeds = {f"view{v}": [drawn[j, v] for j in range(len(kept))] for v in range(cfg.views)}
        outputs, rendered = renders.run([batch[k] for k in kept], feeds, fetched=fetched)
        pixels = stack_views(outputs, pin=cuda) if rendered else None  # [m, V, 3, s, s]
        timing["decode_render"] += time.perf_counter() - t1
        return work, files, fetched, kept, rendered, drawn, pixels, np.asarray(peeked[0])

    work = [(start, stop, b0) for start, stop in mine for b0 in range(0, stop - start, cfg.batch_size)]
    done_images = failed_images = 0
    first: tuple[float, int] | None = None  # when this rank's first chunk was written, and its images done
    start_time = time.perf_counter()
    bar = progress_bar(
        total=sum(stop - start for start, stop in mine),
        disable=not progress,
        unit="img",
        desc=f"tokenize[{dist.rank}]" if dist.world > 1 else "tokenize",
    )
    prepared = ahead(work, prepare, depth=2)
    while True:
        t0 = time.perf_counter()
        item = next(prepared, None)
        timing["wait"] += time.perf_counter() - t0
        if item is None:
            break
        (start, stop, b0), chunk, fetched, kept, rendered, drawn, pixels, sizes_seen = item
        n = stop - start
        if b0 == 0:  # a new chunk
            files, remote = chunk, {}
            tokens = np.zeros((n, cfg.views, token_side, token_side), dtype=np.uint16)
            params = np.zeros((n, cfg.views, len(PARAMS)), dtype=np.float32)
            status = np.full(n, FAILED, dtype=np.uint8)
            sizes = np.zeros((n, 2), dtype=np.int32)  # (height, width) after EXIF orientation, for stage 2
            copies: list[tuple[list[int], torch.Tensor]] = []  # token ids on their way to the host
        if cfg.embed_images:
            remote.update(fetched)  # what was fetched is what is embedded: no second read
        if rendered:
            t1 = time.perf_counter()
            ids = precision.tokenize(tokenizer, pixels.to(device, non_blocking=True).flatten(0, 1))
            ids = ids.view(len(rendered), cfg.views, token_side, token_side).to(id_dtype)
            rows = [b0 + kept[r] for r in rendered]
            copies.append((rows, to_host(ids)))
            params[rows] = drawn[rendered]
            sizes[rows] = sizes_seen[rendered]
            status[rows] = DONE
            timing["encoder"] += time.perf_counter() - t1
        if b0 + cfg.batch_size < n:
            continue
        t3 = time.perf_counter()  # the chunk's last batch: its tokens arrive, and it is written whole
        if cuda and copies:
            torch.cuda.current_stream(device).synchronize()
        for rows, host in copies:
            tokens[rows] = host.numpy().astype(np.uint16)
        errors = [
            "" if s == DONE else shapes.failed.get(f) or renders.failed.get(f) or "failed"
            for f, s in zip(files, status, strict=True)
        ]
        images = (
            [(remote.get(f) or read_bytes(f)) if s == DONE else b"" for f, s in zip(files, status, strict=True)]
            if cfg.embed_images
            else None
        )
        store.write_chunk(start, tokens, params, status, errors, images, sizes)
        timing["write"] += time.perf_counter() - t3
        done_images += int(np.sum(status == DONE))
        failed_images += int(np.sum(status == FAILED))
        elapsed = time.perf_counter() - start_time
        first = first or (elapsed, done_images)
        bar.update(n)
        bar.set_postfix(
            img_s=f"{(done_images + failed_images) / elapsed:.1f}",
            views_s=f"{done_images * cfg.views / elapsed:.0f}",
            failed=failed_images,
        )
    bar.close()
    elapsed = time.perf_counter() - start_time
    dist.barrier()
    summary = {
        "store": str(store_path),
        "rank_images": done_images + failed_images,
        "seconds": elapsed,
        "images_per_s": (done_images + failed_images) / max(elapsed, 1e-9),
        "views_per_s": done_images * cfg.views / max(elapsed, 1e-9),
        # set-up (tokenizer, store, pipelines) before the first batch, not in `seconds`; and the rate
        # after this rank's first chunk, once the pipelines run warm (none with a single chunk)
        "setup_seconds": start_time - entered,
        "steady_views_per_s": (done_images - first[1]) * cfg.views / (elapsed - first[0])
        if first and elapsed > first[0]
        else None,
        "time": timing,
        "device": str(device),
        "world_size": dist.world,
    }
    if dist.main:
        counts = store.mark_complete()
        summary.update(counts)
        summary["failures"] = store.failures()
        with fsspec.open(  # a local path or the store's own URL scheme: the metrics sit beside the store
            f"{str(store_path).rstrip('/')}.metrics.json", "w"
        ) as f:
            f.write(json.dumps(summary, indent=2) + "\n")
    dist.close()
    return summary
