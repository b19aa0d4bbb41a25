"""Train Hugging Face transformers' own BeitForMaskedImageModeling from a beit token store.

    pip install transformers
    python examples/hf_masked_image_modeling.py STORE [--steps 30] [--batch-size 16] [--device cuda]

The store is a dataset like any other: `bool_masked_pos` comes from it as is, and the token labels
are the cached tokens of the masked patches. No tokenizer runs during training.
"""

import argparse

import torch
from transformers import BeitConfig, BeitForMaskedImageModeling

import beit

parser = argparse.ArgumentParser()
parser.add_argument("store")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--hidden-size", type=int, default=192)
parser.add_argument("--heads", type=int, default=3)
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--workers", type=int, default=0)
parser.add_argument("--seed", type=int, default=0)  # the model's init and the data's order, views and masks
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()

torch.manual_seed(args.seed)
store = beit.open_store(args.store)
config = BeitConfig(
    image_size=store.image_size,
    patch_size=store.patch_size,
    vocab_size=store.vocab_size,
    hidden_size=args.hidden_size,
    num_attention_heads=args.heads,
    num_hidden_layers=args.layers,
    intermediate_size=4 * args.hidden_size,
    use_mask_token=True,
    use_absolute_position_embeddings=False,
    use_shared_relative_position_bias=True,  # BEiT's pre-training layout
    layer_scale_init_value=0.1,
)
model = BeitForMaskedImageModeling(config).to(args.device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
data = store.dataset(seed=args.seed)

step, epoch = 0, 0
while step < args.steps:
    data.set_epoch(epoch)
    for batch in data.loader(args.batch_size, device=args.device, num_workers=args.workers):
        mask = batch["bool_masked_pos"]
        out = model(pixel_values=batch["pixel_values"], bool_masked_pos=mask, labels=batch["tokens"][mask])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        step += 1
        print(f"epoch {epoch} step {step} loss {out.loss.item():.4f}", flush=True)
        if step == args.steps:
            break
    epoch += 1
