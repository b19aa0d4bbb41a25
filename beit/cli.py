"""The `beit` command. Thin: parse, build a config, call one function of a stage, print its result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="BEiT pre-training with an offline dVAE token store, and fine-tuning of what it pre-trains. "
    "Exit codes: 0 done; 1 a bad input or setting (one line says which); 75 stopped by SIGTERM or the "
    "config's stop_signal after saving the work in flight (run the same command again to resume).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tokenizer_app = typer.Typer(
    help="The dVAE tokenizer: convert released weights, train your own, look at reconstructions.",
    no_args_is_help=True,
)
app.add_typer(tokenizer_app, name="tokenizer")
data_app = typer.Typer(
    help="Built-in data: the demo's labelled images (ImageFolder trees) and segmentation scenes.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
store_app = typer.Typer(help="Token stores: what one holds, and whether its tokens check out.", no_args_is_help=True)
app.add_typer(store_app, name="store")
segment_app = typer.Typer(
    help="Semantic segmentation: fine-tune BEiT with UperNet, evaluate mIoU, predict masks.", no_args_is_help=True
)
app.add_typer(segment_app, name="segment")

Config = Annotated[Path | None, typer.Option("--config", help="TOML file of the stage's config keys")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="override a config key: --set KEY=VALUE")]
NoResume = Annotated[bool, typer.Option("--no-resume", help="start over, ignoring a checkpoint in --out")]
RunFolder = Annotated[Path, typer.Option("--out", help="run folder: config, metrics.jsonl, checkpoints")]
Preset = Annotated[str | None, typer.Option("--model", help="tiny | small | base | large")]
MAX_SKIPPED = 0.05  # beit.shared.inputs.MAX_SKIPPED_FRACTION, without importing numpy for --help
MaxSkipped = Annotated[
    float,
    typer.Option(
        help="stop when more than this share of the images tried cannot be read (a wrong path, a broken mount), "
        "once 10 are skipped"
    ),
]
SourceRoot = Annotated[
    str | None,
    typer.Option(help="the store's source files under another folder than where they were tokenized (checked)"),
]


def _end_bars() -> None:
    """End the progress bars still open before a command's last sentence: they write nothing more
    (a bar closed at exit would add its last line after the sentence), and the sentence starts on
    a line of its own."""
    import sys

    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        bar.disable = True
    if bars:
        sys.stderr.write("\n")


def _let_go(error: BaseException) -> None:
    """Free what the frames of a command that stopped on `error` still hold (DALI pipelines, the
    threads reading ahead) now, rather than at exit, where DALI's own exit hook could find a
    pipeline still alive and print a traceback after the sentence. Its bars are ended first
    (`_end_bars`), so nothing they own writes as it goes."""
    import gc
    import traceback

    traceback.clear_frames(error.__traceback__)  # (the frames still running are left as they are)
    error.__traceback__ = None
    gc.collect()


def _fail(error: Exception) -> None:
    _end_bars()
    _let_go(error)
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


def _config(ctx: typer.Context, cls: type, renames: dict[str, str] | None = None):
    """The command's config of class `cls`: the --config TOML file, then the --set overrides, then
    the explicit options given, each named as its config key (--model is model.preset; `renames`
    names other keys, e.g. --crop is model.image_size)."""
    from dataclasses import fields

    from beit.shared.config import load_config

    keys = {field.name for field in fields(cls)}
    renames = {"model": "model.preset", **(renames or {})}
    explicit = []
    for name, value in ctx.params.items():
        key = renames.get(name, name)
        if key.split(".")[0] in keys and value is not None and value is not False:
            explicit.append(f"{key}={'true' if value is True else value}")
    return load_config(cls, ctx.params.get("config"), [*(ctx.params.get("set_") or []), *explicit])


def _explicit(ctx: typer.Context, renames: dict[str, str] | None = None) -> set[str]:
    """The dotted config keys the user set: in the --config file, with --set, or by an option given."""
    from click.core import ParameterSource

    from beit.shared.config import flatten

    keys = set()
    if ctx.params.get("config") is not None:
        import tomllib

        keys |= set(flatten(tomllib.loads(Path(ctx.params["config"]).read_text())))
    keys |= {item.split("=", 1)[0].strip() for item in ctx.params.get("set_") or []}
    renames = {"model": "model.preset", **(renames or {})}
    for name in ctx.params:
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            keys.add(renames.get(name, name))
    return keys


def _architecture_from_init(ctx: typer.Context, cfg, init: str, renames: dict[str, str] | None = None) -> None:
    """Build the model `init` holds (its architecture: the config's ARCHITECTURE_FROM_INIT keys)
    unless the user set those settings; say which of theirs differ from the checkpoint's."""
    if init in ("", "none"):
        return
    from beit.train.model import take_architecture

    keys = getattr(type(cfg), "ARCHITECTURE_FROM_INIT", ())
    cfg.model, notes = take_architecture(cfg.model, init, _explicit(ctx, renames), keys)
    for note in notes:
        typer.echo(f"init: {note}")


def _run(ctx: typer.Context, cls: type, stage, *args, renames: dict[str, str] | None = None, **kwargs):
    """(config, stage(*args, config, **kwargs)): a bad config, store, checkpoint or input (every
    one a ValueError) is one line on stderr and exit status 1. A config with an `init` checkpoint
    builds that checkpoint's model (`_architecture_from_init`)."""
    from beit.shared.preempt import release_all

    try:
        cfg = _config(ctx, cls, renames)
        if hasattr(cfg, "init") and hasattr(type(cfg), "ARCHITECTURE_FROM_INIT"):
            _architecture_from_init(ctx, cfg, cfg.init, renames)
        return cfg, stage(*args, cfg, **kwargs)
    except ValueError as error:
        _fail(error)
    finally:
        release_all()  # the stop signals' handlers of a run that ended early, given back


def _skipped_beside(json_out: Path | None) -> Path | None:
    """Where a command that writes only a --json file keeps its skipped inputs: FILE.skipped.jsonl beside it."""
    return None if json_out is None else json_out.with_suffix(".skipped.jsonl")


def _inputs(counts: dict, split: str = "") -> None:
    """One line of what a command listed, read and skipped; without a file of them, the skipped themselves."""
    if not counts["read"] + counts["skipped"]:  # nothing read in this process (a finished run asked again)
        return
    text = (
        f"{split + ': ' if split else ''}listed {counts['listed']}, read {counts['read']}, skipped {counts['skipped']}"
    )
    if counts.get("not_reached"):
        text += f", not reached {counts['not_reached']}"
    if counts["skipped"] and counts.get("skipped_file"):
        text += f" (see {counts['skipped_file']})"
    typer.echo(text)
    shown = counts.get("skipped_inputs", [])
    for entry in shown[:10]:
        typer.echo(f"  skipped {entry['path']}: {entry['reason']}")
    if len(shown) > 10:
        typer.echo(f"  ... and {len(shown) - 10} more")


def _notes(result: dict) -> None:
    for note in result["notes"]:
        typer.echo(f"init: {note}")


@app.command("tokenize")
def tokenize_command(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            help="ImageFolder tree, image folder, or .txt list (path, label per line): a path or an fsspec URL (s3://...)"
        ),
    ],
    store: Annotated[str, typer.Argument(help="token store to write: a folder, or an fsspec URL zarr can open")],
    tokenizer: Annotated[Path, typer.Option(help="tokenizer .safetensors (beit tokenizer convert/train)")],
    views: Annotated[int | None, typer.Option(help="views per image (default 10)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the views (default 0)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per batch (default 16)")] = None,
    embed_images: Annotated[bool, typer.Option("--embed-images", help="store the source files too")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit non-zero if any image failed")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a STORE made differently")] = False,
    config: Config = None,
    set_: Overrides = None,
) -> None:
    """Stage 1: decode images, draw V views each, and cache their dVAE tokens in a Zarr store."""
    from beit.tokenize.stage1 import TokenizeConfig, tokenize

    cfg, summary = _run(ctx, TokenizeConfig, tokenize, source, store, tokenizer, overwrite=overwrite)
    if summary.get("already_complete") or "done" not in summary:
        return
    typer.echo(
        f"tokenized {summary['done']} of {summary['images']} images x {cfg.views} views into {store} "
        f"({summary['views_per_s']:.0f} views/s on rank 0); {summary['failed']} failed"
    )
    for key, error in summary["failures"][:10]:
        typer.echo(f"  failed: {key}: {error}")
    if summary["failed"] > 10:
        typer.echo(f"  ... and {summary['failed'] - 10} more (beit store info {store} --failures)")
    if cfg.strict and summary["failed"]:
        raise typer.Exit(3)


@app.command("pretrain")
def pretrain_command(
    ctx: typer.Context,
    store: Annotated[str, typer.Argument(help="token store made by `beit tokenize`")],
    out: RunFolder,
    model: Preset = None,
    epochs: Annotated[int | None, typer.Option(help="default 800")] = None,
    batch_size: Annotated[int | None, typer.Option(help="per rank (default 64)")] = None,
    lr: Annotated[float | None, typer.Option(help="effective learning rate")] = None,
    blr: Annotated[float | None, typer.Option(help="lr at an effective batch of 2048 (1.5e-3)")] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option(help="default: the released share of the run (10 of 800 epochs)")
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            help="cached (the store's tokens) | online (a fresh view each epoch, dVAE every step) | pixels (raw "
            "pixel regression, the paper's ablation) | normalised-pixels (each patch's mean and variance removed)"
        ),
    ] = None,
    mask: Annotated[str | None, typer.Option(help="block | random")] = None,
    source_root: SourceRoot = None,
    config: Config = None,
    set_: Overrides = None,
    no_resume: NoResume = False,
) -> None:
    """Stage 2: pre-train a BEiT ViT from a token store's views and cached tokens."""
    from beit.train.pretrain.trainer import PretrainConfig, pretrain

    _, result = _run(ctx, PretrainConfig, pretrain, store, out, resume=not no_resume)
    typer.echo(
        f"pre-trained {result['steps']} steps (effective batch {result['effective_batch']}, lr "
        f"{result['effective_lr']:.3g}); checkpoint {result['checkpoint']}"
    )


@app.command("finetune")
def finetune_command(
    ctx: typer.Context,
    data: Annotated[
        str, typer.Argument(help="folder with train/ and val/ ImageFolder trees, or a token store (a path or URL)")
    ],
    init: Annotated[str, typer.Option(help="pre-trained checkpoint (beit, unilm .pth, timm) or 'none'")],
    out: RunFolder,
    model: Preset = None,
    epochs: Annotated[int | None, typer.Option(help="default 100")] = None,
    batch_size: Annotated[int | None, typer.Option(help="per rank (default 64)")] = None,
    lr: Annotated[float | None, typer.Option(help="effective learning rate")] = None,
    blr: Annotated[float | None, typer.Option(help="lr at an effective batch of 1024 (4e-3)")] = None,
    layer_decay: Annotated[float | None, typer.Option(help="layer-wise lr decay (0.65)")] = None,
    source_root: SourceRoot = None,
    config: Config = None,
    set_: Overrides = None,
    no_resume: NoResume = False,
) -> None:
    """Fine-tune a pre-trained BEiT for classification (layer decay, mixup/cutmix, RandAugment)."""
    from beit.train.classify.finetune import FinetuneConfig, finetune

    _, result = _run(ctx, FinetuneConfig, finetune, data, out, resume=not no_resume)
    _notes(result)
    last = result["last"]
    typer.echo(
        f"fine-tuned {result['steps']} steps; val top-1 {last.get('top1', float('nan')) * 100:.2f}% "
        f"(best {result['best_top1'] * 100:.2f}%), top-5 {last.get('top5', float('nan')) * 100:.2f}%"
        f"{' ' + result['basis'] if result['basis'] else ''}; checkpoints in {out}"
    )
    for split, counts in result["inputs"].items():
        _inputs(counts, f"{split} images")


@tokenizer_app.command("convert")
def tokenizer_convert_command(
    encoder: Annotated[Path, typer.Argument(help="the released encoder.pkl")],
    decoder: Annotated[Path | None, typer.Argument(help="the released decoder.pkl (for reconstructions)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="tokenizer file to write (.safetensors)")] = Path(
        "tokenizer.safetensors"
    ),
) -> None:
    """Convert the DALL-E dVAE's released pickles to a safetensors tokenizer, running none of their code."""
    from beit.shared.dalle import convert_dall_e
    from beit.shared.dvae import save_tokenizer

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
def tokenizer_train_command(
    ctx: typer.Context,
    images: Annotated[Path, typer.Argument(help="folder of images (recursive) or a .txt file listing them")],
    out: Annotated[Path, typer.Option("--out", "-o", help="tokenizer file to write (.safetensors)")] = Path(
        "tokenizer.safetensors"
    ),
    steps: Annotated[int | None, typer.Option(help="training steps")] = None,
    batch_size: Annotated[int | None, typer.Option(help="crops per step")] = None,
    input_size: Annotated[int | None, typer.Option(help="crop size in pixels")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="codebook size")] = None,
    config: Config = None,
    set_: Overrides = None,
    no_resume: NoResume = False,
) -> None:
    """Train a dVAE tokenizer on your images (Gumbel-softmax, KL to a uniform prior, DALI crops)."""
    from beit.train.tokenizer.trainer import DVAETrainConfig, train_dvae

    cfg, report = _run(
        ctx, DVAETrainConfig, train_dvae, images, out, renames={"vocab_size": "model.vocab_size"}, resume=not no_resume
    )
    held = report.get("held_out")
    summary = f"wrote {out} after {report['steps']} steps on {report['train_images']} images"
    if held:
        summary += (
            f"; held-out crops: PSNR {held['psnr']:.1f} dB (mean-colour baseline {held['baseline_psnr']:.1f} dB), "
            f"codes used {held['codes_used']}/{cfg.model.vocab_size}, perplexity {held['perplexity']:.0f}"
        )
    typer.echo(summary)
    for split, counts in report["inputs"].items():
        _inputs(counts, f"{split.replace('_', '-')} images")


@tokenizer_app.command("reconstruct")
def tokenizer_reconstruct_command(
    tokenizer: Annotated[Path, typer.Argument(help="tokenizer .safetensors (with its decoder)")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("reconstructions.png"),
    size: Annotated[int | None, typer.Option(help="pixels (default: the tokenizer's input size)")] = None,
) -> None:
    """Write a PNG grid of original / reconstruction / token map for each image, and print PSNR."""
    from beit.shared.dvae import check_grid, load_tokenizer
    from beit.train.tokenizer.reconstruct import reconstruction_grid

    if out.suffix.lower() != ".png":
        _fail(ValueError(f"--out {out} must end in .png."))
    try:
        model = load_tokenizer(tokenizer)
        if model.decoder is None:
            raise ValueError(f"tokenizer {tokenizer} has no decoder: convert it with its decoder.pkl to reconstruct.")
        if size is not None:
            check_grid(size, model.cfg)
        psnrs = reconstruction_grid(model, images, out, size)
    except ValueError as error:
        _fail(error)
    for path, value in zip(images, psnrs, strict=True):
        typer.echo(f"{path}: PSNR {value:.2f} dB")
    typer.echo(f"wrote {out}; mean PSNR {sum(psnrs) / len(psnrs):.2f} dB over {len(psnrs)} images")


@store_app.command("info")
def store_info_command(
    store: Annotated[str, typer.Argument(help="token store (folder or URL)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (with every failed item)")] = False,
    failures: Annotated[bool, typer.Option("--failures", help="list every failed item, not the first 10")] = False,
) -> None:
    """Images, views, grid, vocab, tokenizer, failed items, token usage and size of a store."""
    import json

    from beit.tokenize.inspect_store import info_text, store_info

    shown = None if failures or as_json else 10
    try:
        info = store_info(store, failures=shown)
    except ValueError as error:
        _fail(error)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(info_text(info))


@store_app.command("verify")
def store_verify_command(
    store: Annotated[str, typer.Argument(help="token store (folder or URL)")],
    sample: Annotated[int, typer.Option(help="images to check")] = 64,
    tokenizer: Annotated[Path | None, typer.Option(help="the store's tokenizer (default: the recorded path)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    full: Annotated[
        bool, typer.Option("--full", help="first read back every chunk of every array and list the damaged ones")
    ] = False,
) -> None:
    """Re-render a sample of views from their recorded parameters, re-tokenize, compare with the store.
    With --full, every chunk is read back first (its crc32c checksum checked): damaged chunks are
    listed and the exit status is 5."""
    from beit.shared.store import TokenStore
    from beit.tokenize.inspect_store import verify_store

    if full:
        try:
            opened = TokenStore.open(store)
            damage = opened.damaged()
        except ValueError as error:
            _fail(error)
        how = (
            "its crc32c checksums checked"
            if opened.has_checksums
            else "this store was made before chunk checksums, so only chunks that no longer decode show"
        )
        typer.echo(f"{store}: every chunk of every array read back ({how}): {len(damage)} damaged")
        for entry in damage:
            typer.echo(f"  {entry['array']}, images {entry['start']}-{entry['stop'] - 1}: {entry['why']}")
        if damage:
            typer.echo("run the same `beit tokenize` command again: it redoes just these chunks")
            raise typer.Exit(5)
    try:
        report = verify_store(store, tokenizer, sample=sample, device=device)
    except ValueError as error:
        _fail(error)
    typer.echo(
        f"{report['views_checked']} views of {report['images_checked']} images re-rendered from {report['source']} "
        f"on {report['device']}: {report['token_agreement'] * 100:.2f}% of tokens and "
        f"{report['views_identical'] * 100:.2f}% of views identical to the store"
    )
    for key in report["unreadable_sources"]:
        typer.echo(f"  could not read the source of {key}")
    if report["token_agreement"] != 1.0:
        raise typer.Exit(4)


@app.command("plot")
def plot_command(
    runs: Annotated[list[Path], typer.Argument(help="run folders (their metrics.jsonl are overlaid)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("curves.png"),
) -> None:
    """Draw a run's training curves (loss, masked-token accuracy, lr, grad norm, images/s, data wait)."""
    from beit.train.plot import plot_run

    try:
        drawn = plot_run(runs, out)
    except ValueError as error:
        _fail(error)
    typer.echo(f"wrote {out}: {', '.join(drawn)}")


@app.command("attention")
def attention_command(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint.pt of `beit pretrain` or `beit finetune`")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("attention.png"),
    query: Annotated[
        list[str] | None, typer.Option(help="query patch ROW,COL (repeat; default: four spread out)")
    ] = None,
    layer: Annotated[int, typer.Option(help="block whose attention to draw: 1..depth, -1 = the last")] = -1,
) -> None:
    """Draw self-attention maps of chosen query patches over each image (the BEiT paper's Figure 2)."""
    from beit.train.pretrain.pictures import attention_picture, load_model

    try:
        queries = []
        for text in query or []:
            parts = text.split(",")
            if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                raise ValueError(f"--query {text} is not ROW,COL: give two patch indices such as 3,5.")
            queries.append((int(parts[0]), int(parts[1])))
        model = load_model(checkpoint)
        summaries = attention_picture(model, images, out, layer, queries or None)
    except ValueError as error:  # CheckpointError is a ValueError
        _fail(error)
    for path, rows in zip(images, summaries, strict=True):
        for s in rows:
            typer.echo(
                f"{path}: query {s['query'][0]},{s['query'][1]}: peak {s['peak']:.2f}x uniform, low "
                f"{s['low']:.2f}x, entropy {s['entropy']:.3f} of uniform, {s['cls'] * 100:.1f}% to cls"
            )
    typer.echo(f"wrote {out}")


@app.command("mask")
def mask_command(
    image: Annotated[Path, typer.Argument(help="an image file")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("masks.png"),
    grid: Annotated[int, typer.Option(help="patches per side")] = 14,
    count: Annotated[int, typer.Option(help="patches to mask (0: 75 of 196, scaled to the grid)")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    random_: Annotated[bool, typer.Option("--random", help="uniform random patches, not blocks")] = False,
    samples: Annotated[int, typer.Option(help="masks to draw")] = 4,
) -> None:
    """Draw samples of pre-training's blockwise (or random) mask over an image."""
    from beit.train.pretrain.pictures import mask_picture

    try:
        masks, _, blocks = mask_picture(image, out, grid, count, seed, random_, samples)
    except ValueError as error:
        _fail(error)
    for i, (drawn_mask, drawn) in enumerate(zip(masks, blocks, strict=True), start=1):
        how = "at random" if random_ else f"in {len(drawn)} blocks"
        typer.echo(f"sample {i}: {int(drawn_mask.sum())} of {grid * grid} patches masked {how}")
    typer.echo(f"wrote {out}")


@app.command("evaluate")
def evaluate_command(
    checkpoint: Annotated[Path, typer.Argument(help="a fine-tuned checkpoint (best.pt / checkpoint.pt)")],
    data: Annotated[Path, typer.Argument(help="an ImageFolder tree with the checkpoint's classes")],
    per_class: Annotated[bool, typer.Option("--per-class", help="print accuracy per class")] = False,
    batch_size: Annotated[int, typer.Option()] = 64,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="also write the figures and counts into this JSON file (skipped files beside it)"),
    ] = None,
    max_skipped_fraction: MaxSkipped = MAX_SKIPPED,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
) -> None:
    """Top-1 / top-5 accuracy and loss of a fine-tuned checkpoint on a labelled set."""
    from beit.shared.preempt import OnePass
    from beit.train.classify.evaluate import evaluate_classifier_checkpoint

    try:
        with OnePass("beit evaluate"):  # SIGTERM or SIGUSR1: stop at the next batch, exit 75
            result = evaluate_classifier_checkpoint(
                checkpoint, data, batch_size, device, max_skipped_fraction=max_skipped_fraction,
                skipped_file=_skipped_beside(json_out),
            )  # fmt: skip
    except ValueError as error:  # CheckpointError is a ValueError
        _fail(error)
    typer.echo(
        f"top-1 {result['top1'] * 100:.2f}%, top-5 {result['top5'] * 100:.2f}%, loss {result['loss']:.4f} "
        f"{result['basis']}"
    )
    _inputs(result["inputs"])
    if json_out is not None:
        import json

        figures = {key: result[key] for key in ("top1", "top5", "loss", "per_class", "class_names")}
        record = {"checkpoint": str(checkpoint), "data": str(data), **figures, **result["inputs"]}
        json_out.write_text(json.dumps(record, indent=1) + "\n")
    if per_class:
        for name, (hit, count) in zip(result["class_names"], result["per_class"], strict=True):
            if count:
                typer.echo(f"  {name:<24} {hit / count * 100:6.2f}%  ({hit}/{count})")


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="a beit checkpoint")],
    out: Annotated[Path, typer.Option("--out", "-o", help="file (timm, safetensors) or folder (hf) to write")],
    format: Annotated[
        str,
        typer.Option(help="timm (torch.save state dict) | safetensors | hf (a Hugging Face model folder) | onnx"),
    ] = "timm",
) -> None:
    """Write a model for other libraries: a classifier's weights in timm's key layout (timm's
    beit_* models load them), any pre-training, fine-tuning or segmentation checkpoint as a
    Hugging Face folder (transformers' from_pretrained loads it), or a classifier or segmenter as
    an ONNX model (dynamic batch)."""
    try:
        if format == "hf":
            from beit.train.hf_export import export_hf

            config = export_hf(checkpoint, out)
            typer.echo(f"wrote {out}: {config['architectures'][0]} (config.json, model.safetensors)")
            return
        if format == "onnx":
            from beit.api import BeitForMIM, load_model
            from beit.train.onnx_export import export_onnx

            model = load_model(checkpoint)
            if isinstance(model, BeitForMIM):
                raise ValueError(
                    f"{checkpoint} is a pre-training checkpoint: export a classifier or a segmenter to ONNX."
                )
            info = export_onnx(model, out)
            size = info["input_size"]
            typer.echo(
                f"wrote {out}: {type(model).__name__}, pixel_values [batch, 3, {size}, {size}] -> logits "
                f"[batch, {', '.join(map(str, info['outputs']))}] (opset {info['opset']})"
            )
            return
        from beit.shared.checkpoint import export_classifier

        weights, meta = export_classifier(checkpoint, out, format)
    except ValueError as error:  # CheckpointError, HFFormatError are ValueErrors
        _fail(error)
    typer.echo(
        f"wrote {out}: {len(weights)} tensors in timm's layout ({meta['model'].get('preset')}, "
        f"{meta['model']['num_classes']} classes)"
    )


@app.command("probe")
def probe_command(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="folder with train/ and val/ ImageFolder trees")],
    init: Annotated[str, typer.Option(help="pre-trained checkpoint (beit, unilm .pth, timm) or 'none'")],
    model: Annotated[str, typer.Option(help="tiny | small | base | large")] = "base",
    layer: Annotated[int | None, typer.Option(help="block whose output to probe (default: the last)")] = None,
    all_layers: Annotated[bool, typer.Option("--all-layers", help="probe every block")] = False,
    epochs: Annotated[int, typer.Option(help="epochs of the linear classifier")] = 300,
    batch_size: Annotated[int, typer.Option()] = 64,
    set_: Overrides = None,
) -> None:
    """Linear probe of a frozen backbone: cls + mean patch token of a block, a linear classifier."""
    from beit.shared.preempt import OnePass
    from beit.train.classify.probe import ProbeConfig, probe

    try:
        cfg = _config(ctx, ProbeConfig)
        _architecture_from_init(ctx, cfg, init)
        model_cfg = cfg.model.resolved()
        layers = None if all_layers else [layer or model_cfg.depth]
        with OnePass("beit probe"):  # SIGTERM or SIGUSR1: stop at the next batch or epoch, exit 75
            result = probe(
                data, init, model_cfg, layers, batch_size=batch_size, epochs=epochs, device=cfg.device,
                max_skipped_fraction=cfg.max_skipped_fraction,
            )  # fmt: skip
    except ValueError as error:  # ConfigError, CheckpointError are ValueErrors
        _fail(error)
    for split, counts in result["inputs"].items():
        _inputs(counts, f"{split} images")
    typer.echo(f"linear probe on {result['train_images']} train / {result['val_images']} val images:")
    for k, accuracy in result["accuracy"].items():
        typer.echo(f"  block {k:>2}: top-1 {accuracy * 100:.2f}%")


@data_app.command("fashion-mnist")
def fashion_mnist_command(
    out: Annotated[Path, typer.Argument(help="folder to write train/<class>/*.png and val/<class>/*.png into")],
    size: Annotated[int, typer.Option(help="image side in pixels (28 = the originals)")] = 28,
    source: Annotated[
        Path | None, typer.Option(help="folder with the official idx files (default: the shipped subset)")
    ] = None,
    train: Annotated[int | None, typer.Option(help="training images, class-balanced (default: all)")] = None,
    val: Annotated[int | None, typer.Option(help="validation images, class-balanced (default: all)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Fashion-MNIST (Zalando, MIT) as ImageFolder trees: the shipped 10,000-image subset, or all 70,000."""
    from beit.shared.datasets.fashion_mnist import write_imagefolder

    try:
        counts = write_imagefolder(out, size, source, train, val, seed)
    except ValueError as error:
        _fail(error)
    typer.echo(f"wrote {counts['train']} training and {counts['val']} validation images ({size} px) under {out}")


def _pair(text: str, option: str, kind: type) -> tuple:
    """ "A,B" -> (A, B) of `kind`, or one sentence naming the option."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return kind(parts[0]), kind(parts[1])
    except ValueError:
        raise ValueError(f"{option} {text!r} is not two numbers: give them as LOW,HIGH, e.g. {option} 40,56.") from None


@data_app.command("fashion-scenes")
def fashion_scenes_command(
    out: Annotated[Path, typer.Argument(help="folder to write images/ and annotations/ (training, validation) into")],
    train: Annotated[int, typer.Option(help="training scenes")] = 800,
    val: Annotated[int, typer.Option(help="validation scenes")] = 200,
    seed: Annotated[int, typer.Option()] = 0,
    sides: Annotated[str, typer.Option(help="the scenes' smallest and largest side in px, e.g. 40,56")] = "64,112",
    item_scale: Annotated[str, typer.Option(help="range of each item's scale, of its 28 px")] = "0.6,2.0",
) -> None:
    """A small real segmentation task: scenes of 1-4 Fashion-MNIST items on noise, 11 classes."""
    from beit.shared.datasets.fashion_scenes import write_scenes

    try:
        low, high = _pair(sides, "--sides", int)
        smallest, largest = _pair(item_scale, "--item-scale", float)
        counts = write_scenes(
            out, train=train, val=val, seed=seed, min_side=low, max_side=high, scale=(smallest, largest)
        )
    except ValueError as error:
        _fail(error)
    typer.echo(f"wrote {counts['training']} training and {counts['validation']} validation scenes under {out}")


@segment_app.command("train")
def segment_train_command(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="ADE20K, Pascal VOC 2012, Cityscapes, or images/ + annotations/")],
    init: Annotated[str, typer.Option(help="pre-trained or fine-tuned checkpoint (beit, unilm, timm) or 'none'")],
    out: RunFolder,
    format: Annotated[str | None, typer.Option(help="ade20k | voc | cityscapes | folder (default: detected)")] = None,
    crop: Annotated[
        int | None,
        typer.Option(
            help="crop size (default 512, 640 from a fine-tuned checkpoint; less for images smaller than that)"
        ),
    ] = None,
    head: Annotated[str | None, typer.Option(help="upernet | linear")] = None,
    model: Preset = None,
    iters: Annotated[int | None, typer.Option(help="iterations (default 160000)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="per rank (default 16)")] = None,
    lr: Annotated[float | None, typer.Option(help="default 7e-4 (3e-5 from a fine-tuned checkpoint)")] = None,
    layer_decay: Annotated[float | None, typer.Option(help="default 0.65 (0.9 from a fine-tuned checkpoint)")] = None,
    num_classes: Annotated[int | None, typer.Option(help="folder layout: classes (else its classes.json)")] = None,
    config: Config = None,
    set_: Overrides = None,
    no_resume: NoResume = False,
) -> None:
    """Fine-tune a pre-trained BEiT for semantic segmentation (UperNet, the released recipe)."""
    from beit.train.segment.trainer import SegmentConfig, segment

    _, result = _run(ctx, SegmentConfig, segment, data, out, renames={"crop": "model.image_size"}, resume=not no_resume)
    _notes(result)
    last = result["last"]
    typer.echo(
        f"trained {result['steps']} iterations ({result['recipe']} recipe, lr {result['lr']:.3g}); val mIoU "
        f"{last.get('mIoU', float('nan')) * 100:.2f} (best {result['best_miou'] * 100:.2f})"
        f"{' ' + result['basis'] if result['basis'] else ''}; checkpoints in {out}"
    )
    for split, counts in result["inputs"].items():
        _inputs(counts, f"{split} images")


@segment_app.command("evaluate")
def segment_evaluate_command(
    checkpoint: Annotated[Path, typer.Argument(help="best.pt / checkpoint.pt of `beit segment train`")],
    data: Annotated[Path, typer.Argument(help="the data set (its layout as in training)")],
    split: Annotated[str, typer.Option(help="train | val")] = "val",
    mode: Annotated[str, typer.Option(help="slide | whole")] = "slide",
    stride: Annotated[int, typer.Option(help="sliding window stride (default: the training run's)")] = 0,
    scales: Annotated[str, typer.Option(help="comma-separated scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")] = "1.0",
    flip: Annotated[bool, typer.Option("--flip", help="average with the mirrored image")] = False,
    per_class: Annotated[bool, typer.Option("--per-class", help="print IoU and accuracy per class")] = False,
    picture: Annotated[Path | None, typer.Option(help="PNG of images beside ground truth and prediction")] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="also write the figures, per class too, and the counts into this JSON file (skipped files beside it)",
        ),
    ] = None,
    max_skipped_fraction: MaxSkipped = MAX_SKIPPED,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
) -> None:
    """mIoU, mAcc and aAcc of a segmentation checkpoint, by sliding window, multi-scale and flip."""
    from beit.shared.preempt import OnePass
    from beit.train.segment.predict import evaluate_segmenter_checkpoint

    try:
        factors = tuple(float(x) for x in scales.split(","))
        with OnePass("beit segment evaluate"):  # SIGTERM or SIGUSR1: stop at the next image, exit 75
            result = evaluate_segmenter_checkpoint(
                checkpoint, data, split, mode, stride, factors, flip, device, picture,
                max_skipped_fraction=max_skipped_fraction, skipped_file=_skipped_beside(json_out),
            )  # fmt: skip
    except ValueError as error:
        _fail(error)
    typer.echo(
        f"mIoU {result['mIoU'] * 100:.2f}, mAcc {result['mAcc'] * 100:.2f}, aAcc {result['aAcc'] * 100:.2f} "
        f"{result['basis']}"
    )
    _inputs(result["inputs"])
    if json_out is not None:
        import json

        figures = {key: result[key] for key in ("mIoU", "mAcc", "aAcc", "per_class")}
        record = {"checkpoint": str(checkpoint), "data": str(data), **figures, **result["inputs"]}
        json_out.write_text(json.dumps(record, indent=1) + "\n")
    if per_class:
        for row in result["per_class"]:
            typer.echo(f"  {row['name']:<24} IoU {row['iou'] * 100:6.2f}  acc {row['acc'] * 100:6.2f}")


@segment_app.command("predict")
def segment_predict_command(
    checkpoint: Annotated[Path, typer.Argument(help="best.pt / checkpoint.pt of `beit segment train`")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the masks")] = Path("masks"),
    overlay: Annotated[bool, typer.Option("--overlay", help="also write the colours over each image")] = False,
    max_skipped_fraction: MaxSkipped = MAX_SKIPPED,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
) -> None:
    """Palette PNG masks (class indices) for images, and overlays to look at."""
    from beit.shared.preempt import OnePass
    from beit.train.segment.predict import predict_files

    try:
        with OnePass("beit segment predict"):  # SIGTERM or SIGUSR1: stop at the next image, exit 75
            summaries, inputs = predict_files(
                checkpoint, images, out, overlay, device=device, max_skipped_fraction=max_skipped_fraction
            )
    except ValueError as error:
        _fail(error)
    for row in summaries:
        shares = ", ".join(f"{name} {share * 100:.0f}%" for name, share in row["top"])
        typer.echo(f"{row['image']}: {shares}")
    typer.echo(f"wrote {len(summaries)} masks under {out}")
    _inputs(inputs.summary())


def main() -> None:
    """The `beit` command. A command stopped by SIGTERM or its stop_signal after saving its work
    says where it stands and exits 75 (`beit.shared.preempt.PREEMPTED`), for a scheduler to requeue."""
    from beit.shared.preempt import PREEMPTED, Preempted

    try:
        app(prog_name="beit")
    except Preempted as stop:
        _end_bars()
        _let_go(stop)
        typer.echo(f"preempted: {stop}", err=True)
        raise SystemExit(PREEMPTED) from None
