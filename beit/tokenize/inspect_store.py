"""`beit store info` and `beit store verify`: what a token store holds, and whether its tokens
are what its recorded views give when rendered and tokenized again."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from beit.shared.decode import ImageBatches
from beit.shared.dist import choose_device
from beit.shared.dvae import encoder_sha256, load_tokenizer
from beit.shared.store import DONE, StoreError, TokenStore
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
    attrs = store.attrs
    status = store.status()
    vocab = attrs["tokenizer"]["vocab_size"]
    counts = np.zeros(vocab, dtype=np.int64)
    tokens = store.group["tokens"]
    for start, stop in store.chunks():
        done = status[start:stop] == DONE
        if done.any():
            counts += np.bincount(tokens[start:stop][done].ravel(), minlength=vocab)[:vocab]
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    top = np.argsort(counts)[::-1][:5]
    return {
        "store": location,
        "complete": bool(attrs.get("complete")),
        "images": len(store),
        "done": int(np.sum(status == DONE)),
        "failed": int(np.sum(status == 2)),
        "pending": int(np.sum(status == 0)),
        "views_per_image": store.views_per_image,
        "grid": list(store.grid),
        "vocab_size": vocab,
        "tokenizer": {k: attrs["tokenizer"][k] for k in ("kind", "sha256", "input_size", "downsample")},
        "views": {"seed": attrs["views"]["seed"], **attrs["views"]["config"]},
        "source": attrs["source"],
        "classes": len(attrs.get("class_names", [])),
        "embedded_images": bool(attrs.get("embedded_images")),
        "token_usage": {
            "tokens": int(total),
            "codes_used": int(np.sum(counts > 0)),
            "perplexity": float(math.exp(-(p * np.log(p)).sum())) if total else 0.0,
            "top_codes": [[int(c), float(counts[c] / max(total, 1))] for c in top],
        },
        "failures": store.failures(limit=failures),
        "bytes_on_disk": _size_on_disk(location),
        "writer": attrs.get("writer"),
        "created": attrs.get("created"),
    }


def verify_store(
    location: str, tokenizer_path: Path, sample: int = 64, seed: int = 0, batch_size: int = 16, device: str = "auto"
) -> dict:
    """Render `sample` done images' recorded views again, tokenize them, compare with the store."""
    store = TokenStore.open(location)
    attrs = store.attrs
    torch_device = choose_device(device)
    tokenizer = load_tokenizer(tokenizer_path, torch_device)
    if encoder_sha256(tokenizer) != attrs["tokenizer"]["sha256"]:
        raise StoreError(
            f"{tokenizer_path} is not the tokenizer {location} was made with (encoder sha256 "
            f"{attrs['tokenizer']['sha256'][:16]}...): pass that tokenizer to --tokenizer."
        )
    status = store.status()
    done = np.flatnonzero(status == DONE)
    chosen = np.sort(np.random.default_rng(seed).choice(done, size=min(sample, len(done)), replace=False))
    views = store.views_per_image
    size = attrs["tokenizer"]["input_size"]
    embedded = "images" in store.group
    root = Path(attrs.get("source_root", "."))
    keys = store.group["keys"]
    device_id = (torch_device.index or 0) if torch_device.type == "cuda" else None
    renders = ImageBatches(render_builder(views, size, "tokenizer"), batch_size, device_id, 0)
    dtype = torch.float16 if torch_device.type == "cuda" else None

    agree = compared = views_equal = views_compared = 0
    missing: list[str] = []
    for b0 in range(0, len(chosen), batch_size):
        batch = chosen[b0 : b0 + batch_size]
        items = [bytes(store.group["images"][i]) if embedded else root / str(keys[i]) for i in batch]
        params = store.group["views"].get_orthogonal_selection((batch,))
        feeds = {f"view{v}": [params[j, v] for j in range(len(batch))] for v in range(views)}
        outputs, kept = renders.run(items, feeds)
        missing += [str(keys[batch[j]]) for j in range(len(batch)) if j not in kept]
        if not kept:
            continue
        pixels = torch.from_numpy(np.stack(outputs, axis=1)).to(torch_device)
        ids = tokenizer.tokenize(pixels.flatten(0, 1), dtype=dtype).view(len(kept), views, *store.grid).cpu().numpy()
        cached = store.group["tokens"].get_orthogonal_selection((batch[kept],))
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
        "source": "embedded images" if embedded else str(root),
    }
