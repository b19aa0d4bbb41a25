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

from beit.shared.decode import ImageBatches, as_tensor, require_dali
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
from beit.shared.object_storage import retrying
from beit.shared.preempt import Preempted, StopSignals
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
    stop_signal: str = "SIGUSR1"  # stops the run cleanly, as SIGTERM does (SLURM --signal); none: SIGTERM only


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
    """Run stage 1; returns the summary (also written as JSON next to a local store). The steps:
    agree on the source's listing, load the tokenizer and check the grids, make or reopen the store,
    tokenize this rank's pending chunks, then (rank 0) mark the store complete."""
    require_dali()  # before any work: every image goes through DALI
    # a bad stop_signal is refused here, before any work; the handlers hold from here to the end (a
    # signal while the ranks set up stops the command after its first chunk, never by the default action)
    stops = StopSignals(cfg.stop_signal).install()
    try:
        entered = time.perf_counter()
        dist = init_dist(timeout_minutes=cfg.dist_timeout_minutes)
        device = dist.device(cfg.device)
        precision = Precision.resolve(cfg.precision, cfg.tf32, device)
        listing: list = []  # rank 0's listing of the source: the only one
        root = agree_on_listing(dist, source, listing)
        tokenizer = load_tokenizer(tokenizer_path, device)
        view_cfg, token_side = check_grids(cfg, tokenizer)
        identity = store_identity(cfg, tokenizer, view_cfg, token_side)

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
            # a complete store run again: every chunk read back, a damaged one done again (or its listing
            # rewritten); a store being finished is not read back (a resume stays quick at any size)
            damage = store.repair(src.keys, src.labels, members) if store.reopened and store.complete else []
            for entry in damage:
                print(
                    f"{store_path}: the chunk of {entry['array']} holding images {entry['start']}-{entry['stop'] - 1} "
                    f"was damaged ({entry['why']}): doing it again",
                    flush=True,
                )
            return store.complete, store.pending_chunks()

        complete, pending = dist.on_main(start)
        store = TokenStore.open(store_path, mode="r+", require_complete=False)
        if complete:
            dist.close()
            summary = {"store": str(store_path), "already_complete": True, **store.counts}
            if dist.main:
                print(f"{store_path} is already complete ({summary.get('done', 0)} images tokenized): nothing to do.")
            return summary
        chunks = ChunkTokenizer(store, root, cfg, view_cfg, token_side, tokenizer, precision, device)
        label = f"tokenize[{dist.rank}]" if dist.world > 1 else "tokenize"
        setup = time.perf_counter() - entered  # listing, tokenizer, store, pipelines: before the first batch
        # SIGTERM or the stop_signal, from the start on: the chunk in flight is finished, then the command stops
        summary = {"store": str(store_path), **chunks.run(pending[dist.rank :: dist.world], progress, label, stops)}
        dist.barrier()
        stopped = dist.any(stops.received is not None)
        if stopped:
            dist.close()
            raise Preempted(
                f"stopped by {stops.received or 'a stop signal on another rank'}; every chunk written is recorded in "
                f"{store_path}, which is not complete: run the same command again to finish it."
            )
        summary["setup_seconds"] = setup
        summary |= {"time": chunks.timing, "device": str(device), "world_size": dist.world}
        if dist.main:
            counts = store.mark_complete()
            summary.update(counts)
            summary["failures"] = store.failures()
            metrics = f"{str(store_path).rstrip('/')}.metrics.json"  # beside the store, on its filesystem

            def write_metrics(_seconds_left: float) -> None:
                with fsspec.open(metrics, "w") as f:
                    f.write(json.dumps(summary, indent=2) + "\n")

            retrying(metrics, "writing it", write_metrics)
        dist.close()
        return summary
    finally:
        stops.uninstall()


def agree_on_listing(dist, source: Path | str, listing: list) -> Path | str:
    """Rank 0 lists the source (into `listing`); every rank reads a sample of that listing, up to 64
    files spread over it (for tar shards, the shards), under its own mount of the source, and the
    ranks agree they see the same files with the same sizes before anything is written. Returns
    the folder the source's keys are relative to."""

    def list_source() -> list[str]:
        src = read_source(source, every_entry=True)  # the store accounts for every entry named like an image
        listing.append(src)
        names = sorted({key.split("/", 1)[0] for key in src.keys}) if src.kind == "shards" else src.keys
        return [names[i] for i in sorted({round(x) for x in np.linspace(0, len(names) - 1, min(len(names), 64))})]

    sampled = dist.on_main(list_source)
    root = source_root(expand_shards(str(source))[0] if is_shards(source) else source)
    seen = [(key, file_size(join(root, key))) for key in sampled]
    digest = hashlib.sha256(repr(seen).encode()).hexdigest()
    dist.check_same_listing(f"the source {source} ({len(seen)} entries sampled)", digest, lambda: sorted(seen))
    return root


def check_grids(cfg: TokenizeConfig, tokenizer) -> tuple[ViewConfig, int]:
    """The views' configuration with the tokenizer's input size filled in, and the token grid's
    side, which must equal the patch grid's."""
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
    return view_cfg, token_side


def store_identity(cfg: TokenizeConfig, tokenizer, view_cfg: ViewConfig, token_side: int) -> dict:
    """What a store records of how it was made: the tokenizer and the views (a store made
    otherwise is refused, not finished)."""
    return {
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


@dataclass
class Prepared:
    """One batch of a chunk, peeked, drawn and rendered in the data thread. `kept`: the batch's
    positions that peeked; `rendered`: the positions in `kept` that rendered; `drawn` and `sizes`
    are per kept image; `files`: the chunk's files, with its first batch only."""

    start: int
    stop: int
    b0: int
    files: list | None
    fetched: dict
    kept: list[int]
    rendered: list[int] = field(default_factory=list)
    drawn: np.ndarray | None = None
    pixels: torch.Tensor | None = None  # [len(rendered), V, 3, s, s]
    sizes: np.ndarray | None = None


@dataclass
class Chunk:
    """A chunk being tokenized: its arrays, filled batch by batch, written whole at its end."""

    start: int
    files: list
    tokens: np.ndarray
    params: np.ndarray
    status: np.ndarray
    sizes: np.ndarray
    remote: dict = field(default_factory=dict)  # the bytes fetched, for --embed-images
    copies: list = field(default_factory=list)  # (rows, token ids on their way to the host)

    @classmethod
    def empty(cls, start: int, files: list, views: int, side: int) -> Chunk:
        n = len(files)
        return cls(
            start,
            files,
            tokens=np.zeros((n, views, side, side), dtype=np.uint16),
            params=np.zeros((n, views, len(PARAMS)), dtype=np.float32),
            status=np.full(n, FAILED, dtype=np.uint8),
            sizes=np.zeros((n, 2), dtype=np.int32),  # (height, width) after EXIF orientation, for stage 2
        )


class ChunkTokenizer:
    """Tokenizes chunks: a data thread peeks, draws and renders the next batches (`prepare`) while
    the encoder runs on the batch before (`encode`); a chunk is written whole after its last batch
    (`write`). `timing` splits the time into peek, decode+render, waiting for data, encoder, write."""

    def __init__(self, store, root, cfg: TokenizeConfig, view_cfg, token_side, tokenizer, precision, device):
        self.store, self.root, self.cfg, self.view_cfg, self.side = store, root, cfg, view_cfg, token_side
        self.tokenizer, self.precision, self.device = tokenizer, precision, device
        self.cuda = device.type == "cuda"
        self.shapes = ImageBatches(shape_builder(cfg.threads), cfg.batch_size, None, cfg.seed)
        renderer = render_builder(cfg.views, view_cfg.tokenizer_size, "tokenizer", cfg.threads)
        self.renders = ImageBatches(renderer, cfg.batch_size, dali_device_id(device), cfg.seed)
        self.timing = {"peek": 0.0, "decode_render": 0.0, "wait": 0.0, "encoder": 0.0, "write": 0.0}
        self.id_dtype = torch.int16 if tokenizer.cfg.vocab_size <= 2**15 else torch.int32  # fewer bytes to the host
        self.current: dict = {}  # the data thread's own: the chunk it is in, and that chunk's files

    def prepare(self, work: tuple[int, int, int]) -> Prepared:
        """In the data thread: peek, draw and render one batch of a chunk. Objects and tar members
        are fetched once, for both pipelines (and for --embed-images)."""
        start, stop, b0 = work
        cfg = self.cfg
        if self.current.get("start") != start:
            self.current.update(start=start, files=self.store.source_items(np.arange(start, stop), self.root))
        batch = self.current["files"][b0 : b0 + cfg.batch_size]
        t0 = time.perf_counter()
        fetched = fetch([f for f in batch if is_remote(f)])
        peeked, kept = self.shapes.run(batch, fetched=fetched)
        t1 = time.perf_counter()
        self.timing["peek"] += t1 - t0
        out = Prepared(start, stop, b0, self.current["files"] if b0 == 0 else None, fetched, kept)
        if not kept:
            return out
        out.drawn = draw_views(
            cfg.seed, np.asarray([start + b0 + k for k in kept]), peeked[0], cfg.views, self.view_cfg
        )
        feeds = {f"view{v}": [out.drawn[j, v] for j in range(len(kept))] for v in range(cfg.views)}
        outputs, out.rendered = self.renders.run([batch[k] for k in kept], feeds, fetched=fetched)
        out.pixels = stack_views(outputs, pin=self.cuda) if out.rendered else None
        out.sizes = np.asarray(peeked[0])
        self.timing["decode_render"] += time.perf_counter() - t1
        return out

    def encode(self, batch: Prepared, chunk: Chunk) -> None:
        """The tokenizer on a batch's rendered views; the ids start on their way to the host."""
        t1 = time.perf_counter()
        ids = self.precision.tokenize(self.tokenizer, batch.pixels.to(self.device, non_blocking=True).flatten(0, 1))
        ids = ids.view(len(batch.rendered), self.cfg.views, self.side, self.side).to(self.id_dtype)
        rows = [batch.b0 + batch.kept[r] for r in batch.rendered]
        chunk.copies.append((rows, to_host(ids)))
        chunk.params[rows] = batch.drawn[batch.rendered]
        chunk.sizes[rows] = batch.sizes[batch.rendered]
        chunk.status[rows] = DONE
        self.timing["encoder"] += time.perf_counter() - t1

    def write(self, chunk: Chunk) -> None:
        """After a chunk's last batch: its tokens arrive, and it is written whole, its status last."""
        t3 = time.perf_counter()
        if self.cuda and chunk.copies:
            torch.cuda.current_stream(self.device).synchronize()
        for rows, host in chunk.copies:
            chunk.tokens[rows] = host.numpy().astype(np.uint16)
        pairs = list(zip(chunk.files, chunk.status, strict=True))
        errors = [
            "" if s == DONE else self.shapes.failed.get(f) or self.renders.failed.get(f) or "failed" for f, s in pairs
        ]
        images = None
        if self.cfg.embed_images:
            images = [(chunk.remote.get(f) or read_bytes(f)) if s == DONE else b"" for f, s in pairs]
        self.store.write_chunk(chunk.start, chunk.tokens, chunk.params, chunk.status, errors, images, chunk.sizes)
        self.timing["write"] += time.perf_counter() - t3

    def run(self, mine: list[tuple[int, int]], progress: bool, label: str, stops: StopSignals | None = None) -> dict:
        """Tokenize these chunks; returns this rank's counts and rates. The rate after the first
        chunk, once the pipelines run warm, is the steady state (none with a single chunk). Once
        `stops` received a signal, the chunk in flight is the last."""
        cfg = self.cfg
        work = [(start, stop, b0) for start, stop in mine for b0 in range(0, stop - start, cfg.batch_size)]
        done_images = failed_images = 0
        first: tuple[float, int] | None = None  # when the first chunk was written, and its images done
        started = time.perf_counter()
        bar = progress_bar(
            total=sum(stop - start for start, stop in mine), disable=not progress, unit="img", desc=label
        )
        prepared = ahead(work, self.prepare, depth=2)
        chunk = None
        while True:
            t0 = time.perf_counter()
            batch = next(prepared, None)
            self.timing["wait"] += time.perf_counter() - t0
            if batch is None:
                break
            if batch.b0 == 0:  # a new chunk
                chunk = Chunk.empty(batch.start, batch.files, cfg.views, self.side)
            if cfg.embed_images:
                chunk.remote.update(batch.fetched)  # what was fetched is what is embedded: no second read
            if batch.rendered:
                self.encode(batch, chunk)
            if batch.b0 + cfg.batch_size < batch.stop - batch.start:
                continue
            self.write(chunk)
            done_images += int(np.sum(chunk.status == DONE))
            failed_images += int(np.sum(chunk.status == FAILED))
            elapsed = time.perf_counter() - started
            first = first or (elapsed, done_images)
            bar.update(batch.stop - batch.start)
            bar.set_postfix(
                img_s=f"{(done_images + failed_images) / elapsed:.1f}",
                views_s=f"{done_images * cfg.views / elapsed:.0f}",
                failed=failed_images,
            )
            if stops is not None and stops.received is not None:
                prepared.close()  # the batches made ahead are dropped; their chunks stay pending
                break
        bar.close()
        elapsed = time.perf_counter() - started
        return {
            "rank_images": done_images + failed_images,
            "seconds": elapsed,
            "images_per_s": (done_images + failed_images) / max(elapsed, 1e-9),
            "views_per_s": done_images * cfg.views / max(elapsed, 1e-9),
            "steady_views_per_s": (done_images - first[1]) * cfg.views / (elapsed - first[0])
            if first and elapsed > first[0]
            else None,
        }
