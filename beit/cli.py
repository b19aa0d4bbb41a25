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
data_app = typer.Typer(
    help="Built-in data: write the demo's labelled images as ImageFolder trees.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
store_app = typer.Typer(help="Token stores: what one holds, and whether its tokens check out.", no_args_is_help=True)
app.add_typer(store_app, name="store")


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


@app.command()
def tokenize(
    source: Annotated[Path, typer.Argument(help="ImageFolder tree, image folder, or .txt list: path, label per line")],
    store: Annotated[str, typer.Argument(help="token store to write: a folder, or an fsspec URL zarr can open")],
    tokenizer: Annotated[Path, typer.Option(help="tokenizer .safetensors (beit tokenizer convert/train)")],
    views: Annotated[Optional[int], typer.Option(help="views per image (default 10)")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help="seed of the views (default 0)")] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option(help="images per batch (default 16)")] = None,  # noqa: UP045
    embed_images: Annotated[bool, typer.Option("--embed-images", help="store the source files too")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit non-zero if any image failed")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a STORE made differently")] = False,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of TokenizeConfig keys")] = None,  # noqa: UP045
    set_: Annotated[list[str], typer.Option("--set", help="override a config key: --set view.jitter=0.3")] = [],  # noqa: B006
) -> None:
    """Stage 1: decode images, draw V views each, and cache their dVAE tokens in a Zarr store."""
    from beit.shared.config import ConfigError, load_config
    from beit.shared.store import StoreError
    from beit.tokenize.run import TokenizeConfig
    from beit.tokenize.run import tokenize as run_tokenize

    explicit = {"views": views, "seed": seed, "batch_size": batch_size}
    overrides = [*set_, *(f"{k}={v}" for k, v in explicit.items() if v is not None)]
    overrides += ["embed_images=true"] * embed_images + ["strict=true"] * strict
    try:
        cfg = load_config(TokenizeConfig, config, overrides)
        summary = run_tokenize(source, store, tokenizer, cfg, overwrite=overwrite)
    except (ConfigError, StoreError, ValueError) as error:
        _fail(error)
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


@app.command()
def pretrain(
    store: Annotated[str, typer.Argument(help="token store made by `beit tokenize`")],
    out: Annotated[Path, typer.Option("--out", help="run folder: config, metrics.jsonl, checkpoint.pt")],
    model: Annotated[Optional[str], typer.Option(help="tiny | small | base | large")] = None,  # noqa: UP045
    epochs: Annotated[Optional[int], typer.Option(help="default 800")] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option(help="per rank (default 64)")] = None,  # noqa: UP045
    lr: Annotated[Optional[float], typer.Option(help="effective learning rate")] = None,  # noqa: UP045
    blr: Annotated[Optional[float], typer.Option(help="lr at an effective batch of 2048 (1.5e-3)")] = None,  # noqa: UP045
    warmup_epochs: Annotated[Optional[float], typer.Option(help="default 10")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option()] = None,  # noqa: UP045
    targets: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="cached (the store's tokens) | online (a fresh view each epoch, dVAE every step) | pixels"),
    ] = None,
    mask: Annotated[Optional[str], typer.Option(help="block | random")] = None,  # noqa: UP045
    config: Annotated[Optional[Path], typer.Option(help="TOML file of PretrainConfig keys")] = None,  # noqa: UP045
    set_: Annotated[list[str], typer.Option("--set", help="override a config key: --set model.depth=6")] = [],  # noqa: B006
    no_resume: Annotated[bool, typer.Option("--no-resume", help="start over, ignoring a checkpoint in --out")] = False,
) -> None:
    """Stage 2: pre-train a BEiT ViT from a token store's views and cached tokens."""
    from beit.shared.checkpoint import CheckpointError
    from beit.shared.config import ConfigError, load_config
    from beit.shared.store import StoreError
    from beit.train.pretrain import PretrainConfig
    from beit.train.pretrain import pretrain as run_pretrain

    explicit = {
        "model.preset": model,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "blr": blr,
        "warmup_epochs": warmup_epochs,
        "seed": seed,
        "targets": targets,
        "mask": mask,
    }
    overrides = [*set_, *(f"{k}={v}" for k, v in explicit.items() if v is not None)]
    try:
        cfg = load_config(PretrainConfig, config, overrides)
        result = run_pretrain(store, out, cfg, resume=not no_resume)
    except (ConfigError, StoreError, CheckpointError, ValueError) as error:
        _fail(error)
    typer.echo(
        f"pre-trained {result['steps']} steps (effective batch {result['effective_batch']}, lr "
        f"{result['effective_lr']:.3g}); checkpoint {result['checkpoint']}"
    )


@app.command()
def finetune(
    data: Annotated[Path, typer.Argument(help="folder with train/ and val/ ImageFolder trees, or a token store")],
    init: Annotated[str, typer.Option(help="pre-trained checkpoint (beit, unilm .pth, timm) or 'none'")],
    out: Annotated[Path, typer.Option("--out", help="run folder")],
    model: Annotated[Optional[str], typer.Option(help="tiny | small | base | large")] = None,  # noqa: UP045
    epochs: Annotated[Optional[int], typer.Option(help="default 100")] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option(help="per rank (default 64)")] = None,  # noqa: UP045
    lr: Annotated[Optional[float], typer.Option(help="effective learning rate")] = None,  # noqa: UP045
    blr: Annotated[Optional[float], typer.Option(help="lr at an effective batch of 1024 (4e-3)")] = None,  # noqa: UP045
    layer_decay: Annotated[Optional[float], typer.Option(help="layer-wise lr decay (0.65)")] = None,  # noqa: UP045
    config: Annotated[Optional[Path], typer.Option(help="TOML file of FinetuneConfig keys")] = None,  # noqa: UP045
    set_: Annotated[list[str], typer.Option("--set", help="override a config key: --set mixup=0")] = [],  # noqa: B006
    no_resume: Annotated[bool, typer.Option("--no-resume", help="start over, ignoring a checkpoint in --out")] = False,
) -> None:
    """Fine-tune a pre-trained BEiT for classification (layer decay, mixup/cutmix, RandAugment)."""
    from beit.shared.checkpoint import CheckpointError
    from beit.shared.config import ConfigError, load_config
    from beit.train.finetune import FinetuneConfig
    from beit.train.finetune import finetune as run_finetune

    explicit = {
        "model.preset": model,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "blr": blr,
        "layer_decay": layer_decay,
    }
    overrides = [*set_, f"init={init}", *(f"{k}={v}" for k, v in explicit.items() if v is not None)]
    try:
        cfg = load_config(FinetuneConfig, config, overrides)
        result = run_finetune(data, out, cfg, resume=not no_resume)
    except (ConfigError, CheckpointError, ValueError) as error:
        _fail(error)
    for note in result["notes"]:
        typer.echo(f"init: {note}")
    last = result["last"]
    typer.echo(
        f"fine-tuned {result['steps']} steps; val top-1 {last.get('top1', float('nan')) * 100:.2f}% "
        f"(best {result['best_top1'] * 100:.2f}%), top-5 {last.get('top5', float('nan')) * 100:.2f}%; "
        f"checkpoints in {out}"
    )


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
def store_info(
    store: Annotated[str, typer.Argument(help="token store (folder or URL)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (with every failed item)")] = False,
    failures: Annotated[bool, typer.Option("--failures", help="list every failed item, not the first 10")] = False,
) -> None:
    """Images, views, grid, vocab, tokenizer, failed items, token usage and size of a store."""
    import json

    from beit.shared.store import StoreError
    from beit.tokenize.inspect_store import store_info as info_of

    shown = None if failures or as_json else 10
    try:
        info = info_of(store, failures=shown)
    except (StoreError, ValueError) as error:
        _fail(error)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
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
    typer.echo("\n".join(lines))


@store_app.command("verify")
def store_verify(
    store: Annotated[str, typer.Argument(help="token store (folder or URL)")],
    sample: Annotated[int, typer.Option(help="images to check")] = 64,
    tokenizer: Annotated[Path | None, typer.Option(help="the store's tokenizer (default: the recorded path)")] = None,  # noqa: UP045
) -> None:
    """Re-render a sample of views from their recorded parameters, re-tokenize, compare with the store."""
    from beit.shared.store import StoreError, TokenStore
    from beit.tokenize.inspect_store import verify_store

    try:
        if tokenizer is None:
            recorded = TokenStore.open(store).attrs.get("tokenizer_path")
            if not recorded or not Path(recorded).exists():
                raise StoreError(f"{store} does not record a tokenizer file that exists here: pass --tokenizer.")
            tokenizer = Path(recorded)
        report = verify_store(store, tokenizer, sample=sample)
    except (StoreError, ValueError) as error:
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


@app.command()
def plot(
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


@app.command()
def attention(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint.pt of `beit pretrain` or `beit finetune`")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("attention.png"),
    query: Annotated[list[str], typer.Option(help="query patch ROW,COL (repeat; default: four spread out)")] = [],  # noqa: B006
    layer: Annotated[int, typer.Option(help="block whose attention to draw: 1..depth, -1 = the last")] = -1,
) -> None:
    """Draw self-attention maps of chosen query patches over each image (the BEiT paper's Figure 2)."""
    from beit.shared.checkpoint import CheckpointError
    from beit.train.pictures import attention_picture, load_model

    try:
        queries = []
        for text in query:
            parts = text.split(",")
            if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                raise ValueError(f"--query {text} is not ROW,COL: give two patch indices such as 3,5.")
            queries.append((int(parts[0]), int(parts[1])))
        model = load_model(checkpoint)
        summaries = attention_picture(model, images, out, layer, queries or None)
    except (CheckpointError, ValueError) as error:
        _fail(error)
    for path, rows in zip(images, summaries, strict=True):
        for s in rows:
            typer.echo(
                f"{path}: query {s['query'][0]},{s['query'][1]}: peak {s['peak']:.2f}x uniform, low "
                f"{s['low']:.2f}x, entropy {s['entropy']:.3f} of uniform, {s['cls'] * 100:.1f}% to cls"
            )
    typer.echo(f"wrote {out}")


@app.command()
def mask(
    image: Annotated[Path, typer.Argument(help="an image file")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("masks.png"),
    grid: Annotated[int, typer.Option(help="patches per side")] = 14,
    count: Annotated[int, typer.Option(help="patches to mask")] = 75,
    seed: Annotated[int, typer.Option()] = 0,
    random_: Annotated[bool, typer.Option("--random", help="uniform random patches, not blocks")] = False,
    samples: Annotated[int, typer.Option(help="masks to draw")] = 4,
) -> None:
    """Draw samples of pre-training's blockwise (or random) mask over an image."""
    from beit.train.pictures import mask_picture

    try:
        masks, _, blocks = mask_picture(image, out, grid, count, seed, random_, samples)
    except ValueError as error:
        _fail(error)
    for i, (drawn_mask, drawn) in enumerate(zip(masks, blocks, strict=True), start=1):
        how = "at random" if random_ else f"in {len(drawn)} blocks"
        typer.echo(f"sample {i}: {int(drawn_mask.sum())} of {grid * grid} patches masked {how}")
    typer.echo(f"wrote {out}")


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="a fine-tuned checkpoint (best.pt / checkpoint.pt)")],
    data: Annotated[Path, typer.Argument(help="an ImageFolder tree with the checkpoint's classes")],
    per_class: Annotated[bool, typer.Option("--per-class", help="print accuracy per class")] = False,
    batch_size: Annotated[int, typer.Option()] = 64,
) -> None:
    """Top-1 / top-5 accuracy and loss of a fine-tuned checkpoint on a labelled set."""

    from beit.shared.checkpoint import CheckpointError, load_checkpoint
    from beit.shared.dist import choose_device
    from beit.shared.images import read_source
    from beit.shared.model import BeitClassifier, ModelConfig
    from beit.train.finetune import ClassificationData, FinetuneConfig
    from beit.train.finetune import evaluate as run_evaluate

    try:
        state, meta = load_checkpoint(checkpoint)
        if meta.get("kind") != "finetune":
            raise ValueError(f"{checkpoint} is a {meta.get('kind')} checkpoint: evaluate a fine-tuned one.")
        model = BeitClassifier(ModelConfig(**meta["model"]))
        model.load_state_dict(state["model"])
        source = read_source(data)
        names = meta["class_names"]
        unknown = sorted(set(source.class_names) - set(names))
        if unknown:
            raise ValueError(f"{data} has classes the checkpoint does not know ({', '.join(unknown[:5])}).")
        source.labels = [names.index(source.class_names[label]) for label in source.labels]
        cfg = FinetuneConfig(batch_size=batch_size)
        device = choose_device()
        loader = ClassificationData(
            source,
            model.cfg.image_size,
            batch_size,
            False,
            cfg,
            device_id=device.index if device.type == "cuda" else None,
        )
        result = run_evaluate(model.to(device), loader, device, len(names))
    except (CheckpointError, ValueError) as error:
        _fail(error)
    typer.echo(
        f"{result['images']} images: top-1 {result['top1'] * 100:.2f}%, top-5 {result['top5'] * 100:.2f}%, "
        f"loss {result['loss']:.4f}"
    )
    if per_class:
        for name, (hit, count) in zip(names, result["per_class"], strict=True):
            if count:
                typer.echo(f"  {name:<24} {hit / count * 100:6.2f}%  ({hit}/{count})")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="a beit checkpoint (fine-tuned classifier)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="file to write")],
    format: Annotated[str, typer.Option(help="timm (torch.save state dict) | safetensors")] = "timm",
) -> None:
    """Write a classifier's weights in timm's BEiT key layout (loadable by timm's beit_* models)."""
    import torch

    from beit.shared.checkpoint import CheckpointError, load_checkpoint, to_timm

    try:
        state, meta = load_checkpoint(checkpoint)
        if meta.get("kind") != "finetune":
            raise ValueError(f"{checkpoint} is a {meta.get('kind')} checkpoint: export a fine-tuned classifier.")
        weights = to_timm(state["model"])
        out.parent.mkdir(parents=True, exist_ok=True)
        if format == "safetensors":
            from safetensors.torch import save_file

            save_file(weights, out)
        elif format == "timm":
            torch.save(weights, out)
        else:
            raise ValueError(f"--format {format} is not one of timm, safetensors.")
    except (CheckpointError, ValueError) as error:
        _fail(error)
    typer.echo(
        f"wrote {out}: {len(weights)} tensors in timm's layout ({meta['model'].get('preset')}, "
        f"{meta['model']['num_classes']} classes)"
    )


@app.command()
def probe(
    data: Annotated[Path, typer.Argument(help="folder with train/ and val/ ImageFolder trees")],
    init: Annotated[str, typer.Option(help="pre-trained checkpoint (beit, unilm .pth, timm) or 'none'")],
    model: Annotated[str, typer.Option(help="tiny | small | base | large")] = "base",
    layer: Annotated[Optional[int], typer.Option(help="block whose output to probe (default: the last)")] = None,  # noqa: UP045
    all_layers: Annotated[bool, typer.Option("--all-layers", help="probe every block")] = False,
    epochs: Annotated[int, typer.Option(help="epochs of the linear classifier")] = 300,
    batch_size: Annotated[int, typer.Option()] = 64,
    set_: Annotated[list[str], typer.Option("--set", help="model keys: --set model.image_size=96")] = [],  # noqa: B006
) -> None:
    """Linear probe of a frozen backbone: cls + mean patch token of a block, a linear classifier."""
    from beit.shared.checkpoint import CheckpointError
    from beit.shared.config import ConfigError, load_config
    from beit.train.probe import ProbeConfig
    from beit.train.probe import probe as run_probe

    try:
        model_cfg = load_config(ProbeConfig, None, [f"model.preset={model}", *set_]).model.resolved()
        layers = None if all_layers else [layer or model_cfg.depth]
        result = run_probe(data, init, model_cfg, layers, batch_size=batch_size, epochs=epochs)
    except (ConfigError, CheckpointError, ValueError) as error:
        _fail(error)
    typer.echo(f"linear probe on {result['train_images']} train / {result['val_images']} val images:")
    for k, accuracy in result["accuracy"].items():
        typer.echo(f"  block {k:>2}: top-1 {accuracy * 100:.2f}%")


@data_app.command("fashion-mnist")
def data_fashion_mnist(
    out: Annotated[Path, typer.Argument(help="folder to write train/<class>/*.png and val/<class>/*.png into")],
    size: Annotated[int, typer.Option(help="image side in pixels (28 = the originals)")] = 28,
    source: Annotated[
        Path | None, typer.Option(help="folder with the official idx files (default: the shipped subset)")
    ] = None,  # noqa: UP045
    train: Annotated[Optional[int], typer.Option(help="training images, class-balanced (default: all)")] = None,  # noqa: UP045
    val: Annotated[Optional[int], typer.Option(help="validation images, class-balanced (default: all)")] = None,  # noqa: UP045
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Fashion-MNIST (Zalando, MIT) as ImageFolder trees: the shipped 10,000-image subset, or all 70,000."""
    from beit.shared.fashion_mnist import write_imagefolder

    try:
        counts = write_imagefolder(out, size, source, train, val, seed)
    except ValueError as error:
        _fail(error)
    typer.echo(f"wrote {counts['train']} training and {counts['val']} validation images ({size} px) under {out}")
