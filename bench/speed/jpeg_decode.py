"""JPEG decoding on the GPU, side by side on the same files: torchvision's `decode_jpeg` (nvJPEG,
what a user without DALI would pick) and DALI's mixed decoder (what `beit tokenize` and the
trainers run). Decoding only: the bytes are in memory, the output is an RGB uint8 image on the
device, nothing else is done to it.

    python bench/speed/jpeg_decode.py --images /tmp/beit-jpegs --count 2000 --json out.json
    python bench/speed/jpeg_decode.py --images DIR --count 64 --batch 16 --reps 1    # CPU rehearsal

Without DALI (a GPU window's first call) only torchvision is timed. On a machine without CUDA both
decode on the CPU (DALI's cpu decoder with one thread per core; torchvision one image at a time).
Timing: one untimed pass, then `--reps` passes over all the files in batches, CUDA-synchronised;
the median pass gives images/s. The JSON is rewritten after each decoder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dvae import time_batches  # noqa: E402
from jpegs import make_jpegs  # noqa: E402


def torchvision_pass(data: list[bytes], batch: int, cuda: bool):
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    device = "cuda" if cuda else "cpu"

    def run_pass():
        for b0 in range(0, len(tensors), batch):
            chunk = tensors[b0 : b0 + batch]
            if cuda:
                decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
            else:
                for t in chunk:
                    decode_jpeg(t, mode=ImageReadMode.RGB)

    return run_pass


def dali_pass(data: list[bytes], batch: int, cuda: bool):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def decode():
        encoded = fn.external_source(name="jpegs", dtype=types.UINT8)
        return fn.decoders.image(encoded, device="mixed" if cuda else "cpu", output_type=types.RGB)

    pipe = decode(
        batch_size=batch, num_threads=os.cpu_count() or 2, device_id=0 if cuda else None, prefetch_queue_depth=1
    )
    pipe.build()
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in data]

    def run_pass():
        for b0 in range(0, len(arrays), batch):
            chunk = arrays[b0 : b0 + batch]
            if len(chunk) < batch:  # the pipeline's batch is fixed: the last one is padded
                chunk = chunk + arrays[: batch - len(chunk)]
            pipe.feed_input("jpegs", chunk)
            (images,) = pipe.run()
            if cuda:
                images.as_tensor()  # the batch is there before the next one is fed

    return run_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="a folder of JPEGs (made if missing)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    files = make_jpegs(args.images, args.count)
    data = [f.read_bytes() for f in files]
    megapixels = 500 * 375 * len(data) / 1e6
    device = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores"
    result = {
        "device": device,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "images": len(data),
        "batch": args.batch,
        "size": [375, 500],
        "decoders": {},
    }
    print(f"device: {device}; {len(data)} JPEGs 500x375 q90, batch {args.batch}")
    decoders = {"torchvision decode_jpeg": torchvision_pass}
    if importlib.util.find_spec("nvidia.dali"):
        decoders["DALI decoders.image"] = dali_pass
    for name, make in decoders.items():
        try:
            run_pass = make(data, args.batch, cuda)
            run_pass()  # untimed: the decoder's start-up
            seconds = time_batches(run_pass, args.reps, cuda)
        except Exception as error:  # a decoder that cannot run here is recorded, and the other still timed
            result["decoders"][name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(f"{name}: {type(error).__name__}: {error}")
        else:
            row = {"images_per_s": len(data) / seconds, "megapixels_per_s": megapixels / seconds, "pass_s": seconds}
            result["decoders"][name] = row
            print(f"{name:<24} {row['images_per_s']:9.0f} images/s  {row['megapixels_per_s']:8.0f} MP/s")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
