"""Pre-train beit's BEiT from a token store in a plain PyTorch loop, through beit's Python API.

    python examples/pretrain_loop.py STORE [--steps 200] [--batch-size 32] [--device cuda] [--out model.pt]

The store is one `beit tokenize` made; each step trains on views' pixels and their cached tokens,
with BEiT's blockwise masks. On a GPU the batches come from the trainer's DALI path.
"""

import argparse

import torch
import torch.nn.functional as F

import beit

parser = argparse.ArgumentParser()
parser.add_argument("store")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--width", type=int, default=192)  # the tiny preset's width, heads and depth
parser.add_argument("--heads", type=int, default=3)
parser.add_argument("--depth", type=int, default=12)
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--seed", type=int, default=0)  # the model's init and the data's order, views and masks
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", default="")
args = parser.parse_args()

torch.manual_seed(args.seed)
store = beit.open_store(args.store)
data = store.dataset(seed=args.seed)
sizes = dict(image_size=store.image_size, patch_size=store.patch_size, vocab_size=store.vocab_size)
config = beit.ModelConfig(preset="custom", width=args.width, heads=args.heads, depth=args.depth, **sizes)
model = beit.BeitForMIM(config).to(args.device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)

step, epoch = 0, 0
while step < args.steps:
    data.set_epoch(epoch)  # a new order, the next cached view of every image, new masks
    for batch in data.loader(args.batch_size, device=args.device, num_workers=args.workers):
        mask = batch["bool_masked_pos"]
        logits = model(batch["pixel_values"], mask)  # [masked patches, vocab]
        loss = F.cross_entropy(logits, batch["tokens"][mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
        if step == args.steps:
            break
    epoch += 1
if args.out:
    torch.save(model.state_dict(), args.out)  # unilm's key names: beit.load_model reads it back
