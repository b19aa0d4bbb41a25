"""`beit store info` and `beit store verify`: what a token store holds, and whether its tokens
are what its recorded views give when rendered and tokenized again."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from beit.shared.config import to_dict
from beit.shared.decode import ImageBatches, as_tensor
from beit.shared.dist import choose_device, dali_device_id
from beit.shared.dvae import Precision, encoder_sha256, load_tokenizer
from beit.shared.store import DONE, FAILED, PENDING, StoreError, TokenStore
from beit.shared.views import render_builder


def _size_on_disk(location: str) -> int | None:
    path = Path(location.removeprefix("file://"))
    if not path.exists():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_info(location: str, failures: int | None = 20) -> dict:
    """Images, views, grid, vocab, tokenizer identity, failures (the first `failures`, or all
    with None), token usage, size on disk."""
    store = TokenStore.open(location, require_complete=False)
    status = store.status()
    tokenizer = store.tokenizer_record
    vocab = store.vocab_size
    counts = np.zeros(vocab, dtype=np.int64)
    for start, stop in store.chunks():
        done = status[start:stop] == DONE
        if done.any():
            chunk = store.tokens(np.arange(start, stop)[done])
            counts += np.bincount(chunk.ravel(), minlength=vocab)[:vocab]
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    top = np.argsort(counts)[::-1][:5]
    view_cfg = store.view_config
    return {
        "store": location,
        "complete": store.complete,
        "images": len(store),
        "done": int(np.sum(status == DONE)),
        "failed": int(np.sum(status == FAILED)),
        "pending": int(np.sum(status == PENDING)),
        "views_per_image": store.views_per_image,
        "grid": list(store.grid),
        "vocab_size": vocab,
        "tokenizer": {k: tokenizer[k] for k in ("kind", "sha256", "input_size", "downsample")},
        "views": {"seed": store.view_seed, **to_dict(view_cfg)},
        "source": store.source_record,
        "classes": len(store.class_names),
        "embedded_images": store.has_embedded_images,
        "token_usage": {
            "tokens": int(total),
            "codes_used": int(np.sum(counts > 0)),
            "perplexity": float(math.exp(-(p * np.log(p)).sum())) if total else 0.0,
            "top_codes": [[int(c), float(counts[c] / max(total, 1))] for c in top],
        },
        "failures": store.failures(limit=failures),
        "bytes_on_disk": _size_on_disk(location),
        "writer": store.writer,
        "created": store.created,
    }


def info_text(info: dict) -> str:
    """`store_info`'s result as the lines `beit store info` prints."""
    usage = info["token_usage"]
    size = info["bytes_on_disk"]
    lines = [
        f"store      {info['store']} ({'complete' if info['complete'] else 'INCOMPLETE'}; {info['writer']}, "
        f"{info['created']})",
        f"images     {info['images']}: {info['done']} done, {info['failed']} failed, {info['pending']} pending; "
        f"{info['classes']} classes; source {info['source']['kind']} "
        f"(fingerprint {info['source']['fingerprint'][:12]})",
        f"views      {info['views_per_image']} per image, seed {info['views']['seed']}, "
        f"{info['views']['image_size']} px patches / {info['views']['tokenizer_size']} px tokenizer",
        f"tokens     grid {info['grid'][0]}x{info['grid'][1]}, vocab {info['vocab_size']}: "
        f"{usage['codes_used']} codes used, perplexity {usage['perplexity']:.0f}, "
        f"top code {usage['top_codes'][0][0] if usage['top_codes'] else '-'} "
        f"({usage['top_codes'][0][1] * 100 if usage['top_codes'] else 0:.1f}%)",
        f"tokenizer  {info['tokenizer']['kind']}, sha256 {info['tokenizer']['sha256'][:16]}",
        f"size       {size / 2**20:.1f} MiB on disk" if size is not None else "size       (remote)",
    ]
    lines += [f"failed     {key}: {error}" for key, error in info["failures"]]
    if info["failed"] > len(info["failures"]):
        more = info["failed"] - len(info["failures"])
        lines.append(f"failed     ... and {more} more: add --failures to list them all")
    return "\n".join(lines)


def verify_store(
    location: str,
    tokenizer_path: Path | None = None,
    sample: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
) -> dict:
    """Render `sample` done images' recorded views again, tokenize them (with `tokenizer_path`,
    by default the one the store records), compare with the store."""
    store = TokenStore.open(location)
    if tokenizer_path is None:
        tokenizer_path = store.tokenizer_path
        if tokenizer_path is None or not tokenizer_path.exists():
            raise StoreError(f"{location} does not record a tokenizer file that exists here: pass --tokenizer.")
    torch_device = choose_device(device)
    tokenizer = load_tokenizer(tokenizer_path, torch_device)
    if encoder_sha256(tokenizer) != store.tokenizer_sha256:
        raise StoreError(
            f"{tokenizer_path} is not the tokenizer {location} was made with (encoder sha256 "
            f"{store.tokenizer_sha256[:16]}...): pass that tokenizer to --tokenizer."
        )
    done = np.flatnonzero(store.status() == DONE)
    chosen = np.sort(np.random.default_rng(seed).choice(done, size=min(sample, len(done)), replace=False))
    views = store.views_per_image
    renders = ImageBatches(
        render_builder(views, store.tokenizer_size, "tokenizer"), batch_size, dali_device_id(torch_device), 0
    )
    precision = Precision.recorded(store.tokenizer_precision, torch_device)

    agree = compared = views_equal = views_compared = 0
    missing: list[str] = []
    for b0 in range(0, len(chosen), batch_size):
        batch = chosen[b0 : b0 + batch_size]
        params = store.view_params(batch)
        feeds = {f"view{v}": [params[j, v] for j in range(len(batch))] for v in range(views)}
        outputs, kept = renders.run(store.items(batch), feeds)
        keys = store.keys(batch)
        missing += [keys[j] for j in range(len(batch)) if j not in kept]
        if not kept:
            continue
        pixels = torch.stack([as_tensor(o) for o in outputs], dim=1).to(torch_device)
        ids = precision.tokenize(tokenizer, pixels.flatten(0, 1)).view(len(kept), views, *store.grid).cpu().numpy()
        cached = store.tokens(batch[kept])
        agree += int(np.sum(ids == cached))
        compared += ids.size
        views_equal += int(np.sum(np.all(ids == cached, axis=(2, 3))))
        views_compared += len(kept) * views
    return {
        "store": location,
        "images_checked": len(chosen) - len(missing),
        "views_checked": views_compared,
        "token_agreement": agree / compared if compared else float("nan"),
        "views_identical": views_equal / views_compared if views_compared else float("nan"),
        "unreadable_sources": missing,
        "device": str(torch_device),
        "source": "embedded images" if store.has_embedded_images else str(store.source_root),
        "precision": asdict(precision),
    }
