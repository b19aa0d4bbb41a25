"""The `beit` command. Thin: parse, build a config, call one function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="BEiT pre-training with an offline dVAE token store, and fine-tuning of what it pre-trains.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tokenizer_app = typer.Typer(help="The dVAE tokenizer: convert released weights.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")

_PENDING = {"allow_extra_args": True, "ignore_unknown_options": True}


def _pending(name: str) -> None:
    typer.echo(f"beit {name} is not available in this version of beit yet.", err=True)
    raise typer.Exit(2)


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


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


@tokenizer_app.command("convert")
def tokenizer_convert(
    encoder: Annotated[Path, typer.Argument(help="the released encoder.pkl")],
    decoder: Annotated[Optional[Path], typer.Argument(help="the released decoder.pkl (for reconstructions)")] = None,  # noqa: UP045
    out: Annotated[Path, typer.Option("--out", "-o", help="tokenizer file to write (.safetensors)")] = Path(
        "tokenizer.safetensors"
    ),
) -> None:
    """Convert the DALL-E dVAE's released pickles to a safetensors tokenizer, running none of their code."""
    from beit.shared.dvae import convert_dall_e, save_tokenizer

    if out.suffix != ".safetensors":
        _fail(ValueError(f"--out {out} must end in .safetensors."))
    try:
        model = convert_dall_e(encoder, decoder)
    except ValueError as error:
        _fail(error)
    info = save_tokenizer(model, out, extra={"source": [str(encoder)] + ([str(decoder)] if decoder else [])})
    typer.echo(
        f"wrote {out}: vocab {info['vocab_size']}, downsampling {model.cfg.downsample}, encoder "
        f"{info['encoder_parameters'] / 1e6:.1f}M parameters"
        + (f", decoder {info['decoder_parameters'] / 1e6:.1f}M" if decoder else ", no decoder")
        + f", sha256 {info['sha256'][:16]}"
    )
