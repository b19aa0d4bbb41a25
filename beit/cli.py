"""The `beit` command. Thin: parse, build a config, call one function."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="BEiT pre-training with an offline dVAE token store, and fine-tuning of what it pre-trains.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_PENDING = {"allow_extra_args": True, "ignore_unknown_options": True}


def _pending(name: str) -> None:
    typer.echo(f"beit {name} is not available in this version of beit yet.", err=True)
    raise typer.Exit(2)


@app.command(context_settings=_PENDING)
def tokenize(ctx: typer.Context) -> None:
    """Stage 1: decode images, draw V views each, and cache their dVAE tokens in a Zarr store."""
    _pending("tokenize")


@app.command(context_settings=_PENDING)
def pretrain(ctx: typer.Context) -> None:
    """Stage 2: pre-train a BEiT ViT from a token store's views and cached tokens."""
    _pending("pretrain")


@app.command(context_settings=_PENDING)
def finetune(ctx: typer.Context) -> None:
    """Fine-tune (or linearly probe) a pre-trained BEiT for classification."""
    _pending("finetune")
