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
tokenizer_app = typer.Typer(
    help="The dVAE tokenizer: convert released weights, train your own, look at reconstructions.",
    no_args_is_help=True,
)
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
    info = save_tokenizer(
        model, out, input_size=112, extra={"source": [str(encoder)] + ([str(decoder)] if decoder else [])}
    )
    typer.echo(
        f"wrote {out}: vocab {info['vocab_size']}, downsampling {model.cfg.downsample}, encoder "
        f"{info['encoder_parameters'] / 1e6:.1f}M parameters"
        + (f", decoder {info['decoder_parameters'] / 1e6:.1f}M" if decoder else ", no decoder")
        + f", sha256 {info['sha256'][:16]}"
    )


@tokenizer_app.command("train")
def tokenizer_train(
    images: Annotated[Path, typer.Argument(help="folder of images (recursive) or a .txt file listing them")],
    out: Annotated[Path, typer.Option("--out", "-o", help="tokenizer file to write (.safetensors)")] = Path(
        "tokenizer.safetensors"
    ),
    steps: Annotated[Optional[int], typer.Option(help="training steps")] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option(help="crops per step")] = None,  # noqa: UP045
    input_size: Annotated[Optional[int], typer.Option(help="crop size in pixels")] = None,  # noqa: UP045
    vocab_size: Annotated[Optional[int], typer.Option(help="codebook size")] = None,  # noqa: UP045
    config: Annotated[Optional[Path], typer.Option(help="TOML file of DVAETrainConfig keys")] = None,  # noqa: UP045
    set_: Annotated[list[str], typer.Option("--set", help="override a config key: --set lr=2e-3")] = [],  # noqa: B006
    no_resume: Annotated[bool, typer.Option("--no-resume", help="start over, ignoring a checkpoint")] = False,
) -> None:
    """Train a dVAE tokenizer on your images (Gumbel-softmax, KL to a uniform prior, DALI crops)."""
    from beit.shared.config import ConfigError, load_config
    from beit.tokenize.dvae_train import DVAETrainConfig, train_dvae

    explicit = {"steps": steps, "batch_size": batch_size, "input_size": input_size, "vocab_size": vocab_size}
    overrides = [*set_, *(f"{k}={v}" for k, v in explicit.items() if v is not None)]
    try:
        cfg = load_config(DVAETrainConfig, config, overrides)
        report = train_dvae(images, out, cfg, resume=not no_resume)
    except (ConfigError, ValueError) as error:
        _fail(error)
    held = report.get("held_out")
    summary = f"wrote {out} after {report['steps']} steps on {report['train_images']} images"
    if report["failed_images"]:
        summary += f" ({len(report['failed_images'])} skipped: they could not be decoded)"
    if held:
        summary += (
            f"; held-out crops: PSNR {held['psnr']:.1f} dB (mean-colour baseline {held['baseline_psnr']:.1f} dB), "
            f"codes used {held['codes_used']}/{cfg.vocab_size}, perplexity {held['perplexity']:.0f}"
        )
    typer.echo(summary)


@tokenizer_app.command("reconstruct")
def tokenizer_reconstruct(
    tokenizer: Annotated[Path, typer.Argument(help="tokenizer .safetensors (with its decoder)")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("reconstructions.png"),
    size: Annotated[Optional[int], typer.Option(help="pixels (default: the tokenizer's input size)")] = None,  # noqa: UP045
) -> None:
    """Write a PNG grid of original / reconstruction / token map for each image, and print PSNR."""
    from beit.shared.dvae import check_grid, load_tokenizer
    from beit.tokenize.reconstruct import reconstruction_grid

    try:
        model = load_tokenizer(tokenizer)
        if size is not None:
            check_grid(size, model.cfg)
        psnrs = reconstruction_grid(model, images, out, size)
    except ValueError as error:
        _fail(error)
    for path, value in zip(images, psnrs, strict=True):
        typer.echo(f"{path}: PSNR {value:.2f} dB")
    typer.echo(f"wrote {out}; mean PSNR {sum(psnrs) / len(psnrs):.2f} dB over {len(psnrs)} images")
