"""The visual tokenizer: the DALL-E discrete VAE (Ramesh et al., 2021), as released.

Encoder: 7x7 conv to `n_hid`, then `group_count` groups of `blocks_per_group` residual
blocks at widths n_hid x 1, 2, 4, 8 (for 4 groups), 2x2 max-pool after every group but the
last (so the grid is the input over 2^(group_count-1): 8 for the released model), ReLU and a
1x1 conv to `vocab_size` logits. Tokens = argmax over the logits. Decoder: 1x1 conv from the
one-hot tokens to `n_init`, the groups in reverse with nearest 2x upsampling, ReLU and a 1x1
conv to 6 channels; the reconstruction is unmap_pixels(sigmoid(first 3 channels)).
Each residual block adds `post_gain * res_path(x)` with post_gain = 1 / (groups x blocks)^2.

Encoder input is `map_pixels(x) = 0.8 x + 0.1` for x in [0, 1]. The released model (n_hid 256,
2 blocks per group, 4 groups, vocab 8192, n_init 128) has a 53.8M-parameter encoder and a
43.8M-parameter decoder.

Tokenizer files are safetensors whose metadata holds {"beit_tokenizer": JSON of the
architecture}; a JSON sidecar beside them repeats it with the file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the encoder's input range [0.1, 0.9]."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """The decoder's [0.1, 0.9] range -> [0, 1] pixels, clamped."""
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


@dataclass(frozen=True)
class DVAEConfig:
    n_hid: int = 256
    blocks_per_group: int = 2
    group_count: int = 4
    vocab_size: int = 8192
    n_init: int = 128
    # Self-trained tokenizers: logits = scale * cosine(features, code vector) instead of the
    # released 1x1 conv, which keeps training from collapsing onto a few codes.
    cosine_logits: bool = False

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)


class _Block(nn.Module):
    """A residual block; `kernels` are the four res-path kernel sizes (encoder 3,3,3,1; decoder 1,3,3,3)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        hidden = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, hidden, hidden, hidden, n_out]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, k in enumerate(kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = nn.Conv2d(widths[i], widths[i + 1], k, padding=(k - 1) // 2)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _init_conv(module: nn.Module) -> None:
    """The released init: normal(std = 1 / sqrt(fan_in)) weights, zero biases."""
    if isinstance(module, nn.Conv2d):
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        nn.init.normal_(module.weight, std=fan_in**-0.5)
        nn.init.zeros_(module.bias)


def _add_groups(blocks: OrderedDict, cfg: DVAEConfig, widths: list[int], n_in: int, kernels, between) -> int:
    """Add the released groups to `blocks`: group_g of `blocks_per_group` residual blocks of
    width widths[g-1], then `between` = (name, make module) except after the last; returns the
    last width."""
    n_layers = cfg.group_count * cfg.blocks_per_group
    for g, width in enumerate(widths):
        stage: OrderedDict[str, nn.Module] = OrderedDict()
        for b in range(cfg.blocks_per_group):
            stage[f"block_{b + 1}"] = _Block(n_in, width, n_layers, kernels)
            n_in = width
        if g < cfg.group_count - 1:
            stage[between[0]] = between[1]()
        blocks[f"group_{g + 1}"] = nn.Sequential(stage)
    return n_in


class Encoder(nn.Module):
    """[B, 3, H, W] mapped pixels -> [B, vocab, H/8, W/8] logits (released names: blocks.group_1.block_1...)."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        widths = [cfg.n_hid * 2**g for g in range(cfg.group_count)]
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=nn.Conv2d(3, cfg.n_hid, 7, padding=3))
        n_in = _add_groups(blocks, cfg, widths, cfg.n_hid, (3, 3, 3, 1), ("pool", lambda: nn.MaxPool2d(kernel_size=2)))
        blocks["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=nn.Conv2d(n_in, cfg.vocab_size, 1)))
        self.blocks = nn.Sequential(blocks)
        self.apply(_init_conv)
        self.cosine = cfg.cosine_logits
        if self.cosine:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks[:-1](x)
        # The logits are computed in fp32 even under autocast, as the release did (its output
        # conv never used fp16): low-precision logits would flip argmax ties between codes.
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = torch.relu(features.float())
            if not self.cosine:
                return self.blocks.output.conv(features)
            codes = F.normalize(self.blocks.output.conv.weight, dim=1)
            return F.conv2d(F.normalize(features, dim=1), codes) * self.logit_scale.exp()


class Decoder(nn.Module):
    """[B, vocab, h, w] one-hot (or soft) tokens -> [B, 6, 8h, 8w] statistics."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        widths = [cfg.n_hid * 2**g for g in reversed(range(cfg.group_count))]
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=nn.Conv2d(cfg.vocab_size, cfg.n_init, 1))
        upsample = ("upsample", lambda: nn.Upsample(scale_factor=2, mode="nearest"))
        n_in = _add_groups(blocks, cfg, widths, cfg.n_init, (1, 3, 3, 3), upsample)
        blocks["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=nn.Conv2d(n_in, 6, 1)))
        self.blocks = nn.Sequential(blocks)
        self.apply(_init_conv)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, h, w] token ids -> [B, 6, 8h, 8w]. The input conv on a one-hot is a column
        lookup, done as one (no [B, vocab, h, w] one-hot is built)."""
        conv = self.blocks.input
        x = conv.weight[:, :, 0, 0].t()[tokens] + conv.bias  # [B, h, w, n_init]
        rest = nn.Sequential(*list(self.blocks.children())[1:])
        return rest(x.permute(0, 3, 1, 2).contiguous())


class DVAE(nn.Module):
    """Encoder (+ optional decoder) of a discrete VAE tokenizer."""

    def __init__(self, cfg: DVAEConfig = DVAEConfig(), with_decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.input_size = 112  # the pixel size it is meant for; a tokenizer file records its own
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg) if with_decoder else None

    @torch.no_grad()
    def tokenize(self, pixels: torch.Tensor, dtype: torch.dtype | None = None, tf32: bool = False) -> torch.Tensor:
        """[B, 3, H, W] pixels in [0, 1] -> [B, H/8, W/8] token ids (int64). Runs channels-last
        (faster convolutions on CPUs and GPUs alike); `dtype` (torch.float16 or bfloat16) runs
        the encoder's body under autocast, the logits staying fp32; `tf32` lets cuDNN run the
        fp32 convolutions (the logits, and an fp32 body) on TF32 tensor cores. `Precision`
        holds the policy the commands, benchmarks and tests share."""
        x = map_pixels(pixels.float()).contiguous(memory_format=torch.channels_last)
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return self.encoder(x).argmax(1)
        finally:
            torch.backends.cudnn.allow_tf32 = previous

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """`tokenize`: [B, 3, H, W] pixels in [0, 1] -> [B, H/8, W/8] token ids (int64)."""
        return self.tokenize(pixels)

    @torch.no_grad()
    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, h, w] token ids -> [B, 3, 8h, 8w] pixels in [0, 1]."""
        if self.decoder is None:
            raise ValueError("this tokenizer has no decoder: convert it with its decoder file to reconstruct.")
        return unmap_pixels(torch.sigmoid(self.decoder.from_tokens(tokens)[:, :3].float()))


@dataclass(frozen=True)
class Precision:
    """How the tokenizer runs, one policy for `beit tokenize`, online targets, `store verify`,
    bench/speed/dvae.py and the GPU test: the encoder body in `body` ("fp32", "fp16" or "bf16"), the
    logits always fp32, and whether fp32 convolutions may use TF32 on a GPU (`tf32`). The store
    records the policy it was made with."""

    body: str = "fp32"
    tf32: bool = False

    @classmethod
    def resolve(cls, precision: str, tf32: bool, device: torch.device) -> Precision:
        """precision "auto" is fp16 on a GPU (as the release ran) and fp32 on the CPU; TF32 only means
        something on a GPU."""
        if precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"precision {precision!r} is not one of auto, fp32, fp16, bf16.")
        cuda = device.type == "cuda"
        body = ("fp16" if cuda else "fp32") if precision == "auto" else precision
        return cls(body, tf32 and cuda)

    @classmethod
    def recorded(cls, record: dict | None, device: torch.device) -> Precision:
        """The policy a store records (`TokenStore.tokenizer_precision`) when it ran on this kind
        of device; else this device's default ("auto", TF32 off)."""
        if record and record.get("device") == device.type:
            return cls(record["body"], bool(record["tf32"]))
        return cls.resolve("auto", False, device)

    @property
    def dtype(self) -> torch.dtype | None:
        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.body]

    def tokenize(self, model: DVAE, pixels: torch.Tensor) -> torch.Tensor:
        return model.tokenize(pixels, dtype=self.dtype, tf32=self.tf32)


def check_grid(input_size: int, cfg: DVAEConfig) -> int:
    """The token grid side for `input_size` pixels, or a clear error when it does not divide."""
    if input_size % cfg.downsample:
        raise ValueError(
            f"tokenizer input size {input_size} is not a multiple of the tokenizer's downsampling "
            f"{cfg.downsample}: choose an input size that is."
        )
    return input_size // cfg.downsample


# ---------------------------------------------------------------- tokenizer files


def save_tokenizer(model: DVAE, path: Path, input_size: int = 112, extra: dict | None = None) -> dict:
    """Write `model` as safetensors with its architecture and intended input size in the
    metadata, plus a JSON sidecar (the same, sha256, parameter counts). Returns the sidecar's content."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_grid(input_size, model.cfg)
    arch = {
        "kind": "dall-e-dvae",
        **asdict(model.cfg),
        "has_decoder": model.decoder is not None,
        "input_size": input_size,
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, tmp, metadata={"beit_tokenizer": json.dumps(arch)})
    tmp.replace(path)
    info = {
        **arch,
        **(extra or {}),
        "sha256": sha256_file(path),
        "encoder_sha256": encoder_sha256(model),
        "encoder_parameters": sum(p.numel() for p in model.encoder.parameters()),
        "decoder_parameters": sum(p.numel() for p in model.decoder.parameters()) if model.decoder else 0,
    }
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def encoder_sha256(model: DVAE) -> str:
    """The tokenizer's identity: sha256 over its encoder's tensors (sorted names, dtypes,
    shapes, bytes) and the architecture fields that shape its tokens. Files holding the same
    encoder have the same identity, with or without a decoder."""
    digest = hashlib.sha256()
    arch = {k: v for k, v in asdict(model.cfg).items() if k != "n_init"}
    digest.update(json.dumps(arch, sort_keys=True).encode())
    for name, tensor in sorted(model.encoder.state_dict().items()):
        array = np.ascontiguousarray(tensor.detach().float().cpu().numpy())  # any layout, same bytes
        digest.update(f"{name}|{tuple(array.shape)}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tokenizer(path: Path, device: torch.device | str = "cpu") -> DVAE:
    """Read a tokenizer written by `save_tokenizer` (or `beit tokenizer convert`)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {path} does not exist: pass a .safetensors file from `beit tokenizer`.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as error:
        raise ValueError(
            f"tokenizer {path} is not a safetensors file ({error}): convert released weights with "
            "`beit tokenizer convert` or train one with `beit tokenizer train`."
        ) from None
    if "beit_tokenizer" not in meta:
        raise ValueError(
            f"tokenizer {path} has no beit tokenizer metadata: make it with `beit tokenizer convert` "
            "or `beit tokenizer train`."
        )
    damaged = f"tokenizer {path} is damaged or not from this beit"
    try:
        arch = json.loads(meta["beit_tokenizer"])
        cfg = DVAEConfig(**{k: arch[k] for k in DVAEConfig.__dataclass_fields__ if k in arch})
        model = DVAE(cfg, with_decoder=arch.get("has_decoder", True))
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{damaged} (its metadata: {error}): convert or train it again.") from None
    model.input_size = int(arch.get("input_size", 112))
    target = model.state_dict()
    problems = sorted(set(target) ^ set(state)) + sorted(
        k for k in set(target) & set(state) if target[k].shape != state[k].shape
    )
    if problems:
        raise ValueError(
            f"{damaged}: its tensors do not fit its recorded architecture ({', '.join(problems[:3])}"
            f"{' and more' if len(problems) > 3 else ''}): convert or train it again."
        )
    model.load_state_dict(state)
    return model.to(device).eval()
