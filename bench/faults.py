"""What each fault costs: the faults of issue 24 injected into real commands at a known moment,
and what the run lost (steps, chunks, seconds) against an uninterrupted run of the same command.

    python bench/faults.py [--work runs/faults] [--json F]

The workload: 192 Fashion-MNIST training images at 64 px (the shipped subset), a small random
tokenizer (128 codes), stage 1 with V = 2 views in chunks of 16 images (12 chunks), and
pre-training a 4-layer, width-128 ViT for 48 steps of 16 with no periodic checkpoint due (as a
long run between two of its checkpoints) unless a fault needs one. Every fault is real: a signal
sent to the process (polled every 5 ms for the moment: the metrics row or the chunk), a small
tmpfs in a user namespace (`unshare -rm`) that fills, a byte flipped in a chunk or checkpoint file,
a moto S3 server on 127.0.0.1 behind the tests' fault-injecting proxy (tests/faulty_proxy.py).
"Lost" is work done before the fault that the resumed run does again; "overhead" is the
interrupted and resumed runs' wall time less the uninterrupted run's (it includes the second
start-up, a few seconds on a CPU). Each resumed result is checked against the uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ["--views", "2", "--set", "view.image_size=64", "--set", "chunk_images=16", "--batch-size", "16"]
MODEL = ["--model", "tiny", "--set", "model.width=128", "--set", "model.heads=4", "--set", "model.depth=4"]
PRETRAIN = [*MODEL, "--batch-size", "16", "--lr", "1e-3", "--warmup-epochs", "1", "--epochs", "4"]
PRETRAIN += ["--set", "log_every=1"]
STEPS = 48  # 192 images (one view of each an epoch) / 16 a step, 4 epochs


def beit(*args, check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "beit", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if check and result.returncode:
        raise SystemExit(f"beit {shlex.join(map(str, args))} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result, seconds


def interrupt(args: list, condition, sig: int) -> dict:
    """Run `beit *args`, send `sig` the moment `condition()` holds; what the condition saw then,
    the exit code, the seconds from start to the signal and from the signal to the exit."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "beit", *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    seen = None
    while process.poll() is None and time.perf_counter() - start < 600:
        try:
            seen = condition()
        except (OSError, ValueError, KeyError):
            seen = None
        if seen:
            break
        time.sleep(0.005)
    sent = time.perf_counter()
    process.send_signal(sig)
    stderr = process.communicate(timeout=600)[1].decode()
    ended = time.perf_counter()
    return {"seen": seen, "code": process.returncode, "to_signal": sent - start, "to_exit": ended - sent,
            "seconds": ended - start, "stderr": stderr[-1500:]}  # fmt: skip


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def checkpoint_step(run: Path, name: str = "checkpoint") -> int | None:
    path = run / f"{name}.json"
    return json.loads(path.read_text())["step"] if path.exists() else None


def chunks_done(store: Path) -> int:
    import zarr

    from beit.shared.store import PENDING

    status = zarr.open_group(str(store), mode="r")["status"][:]
    return int((status != PENDING).sum()) // 16


def same_losses(a: Path, b: Path) -> bool:
    return [r["loss"] for r in rows(a)] == [r["loss"] for r in rows(b)]


def same_store(a: Path, b: Path) -> bool:
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    return all(np.array_equal(ga[n][:], gb[n][:]) for n in ("tokens", "views", "labels", "keys", "status"))


def flip(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def small_disk(mount: Path, size_mb: int, free: int, lines: list[str]) -> subprocess.CompletedProcess:
    """Shell `lines` in a user and mount namespace where `mount` is a tmpfs of `size_mb` MiB with
    about `free` bytes left ($FILLER frees the rest)."""
    mount.mkdir(parents=True, exist_ok=True)
    script = [
        f"mount -t tmpfs -o size={size_mb}m tmpfs {shlex.quote(str(mount))}",
        f"FILLER={shlex.quote(str(mount / 'filler'))}",
        f"head -c {size_mb * 2**20 - free} /dev/zero > $FILLER",
        *lines,
    ]
    return subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(script)], capture_output=True, text=True)


def timed_line(args: list, log: Path) -> str:
    """A shell line running `beit *args`, its stderr in `log`, exit code and seconds in `log`.rc."""
    command = shlex.join([sys.executable, "-m", "beit", *map(str, args)])
    q = shlex.quote(str(log))
    return f"s=$(date +%s.%N); {command} >/dev/null 2>{q}; c=$?; echo $c $s $(date +%s.%N) > {q}.rc"


def read_rc(log: Path) -> tuple[int, float]:
    code, start, end = Path(f"{log}.rc").read_text().split()
    return int(code), float(end) - float(start)


def object_storage(work: Path, source: Path, tokenizer: Path, record) -> None:
    """Stage 1 from s3:// into s3:// on a moto server on 127.0.0.1, through the tests' fault-injecting
    proxy: every request answered 503 SlowDown for 10 s from the fifth chunk on (waited out), then
    for 60 s (outlasts BEIT_STORAGE_SECONDS=30: the command stops, then runs again to the end); then
    pre-training from that store with its photos' GETs failing for 60 s mid-run."""
    sys.path.insert(0, str(ROOT / "tests"))
    import s3fs
    import zarr
    from faulty_proxy import FaultyProxy
    from test_s3 import start_server

    from beit.shared.store import PENDING

    server, upstream = start_server(work / "moto.log")
    proxy = FaultyProxy(upstream)
    settings = {"AWS_ENDPOINT_URL": proxy.start(), "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1", "BEIT_STORAGE_TRIES": "8", "BEIT_STORAGE_WAIT": "1",
                "BEIT_STORAGE_SECONDS": "30"}  # fmt: skip
    os.environ.update(settings)
    try:
        direct = s3fs.S3FileSystem(endpoint_url=upstream, skip_instance_cache=True)
        direct.mkdir("photos")
        direct.mkdir("stores")
        direct.put(str(source), "photos/", recursive=True)
        tok = ["--tokenizer", tokenizer, *STAGE1]

        def done(name: str) -> int:
            group = zarr.open_group(f"s3://stores/{name}", mode="r", storage_options={"endpoint_url": upstream})
            return int((group["status"][:] != PENDING).sum()) // 16

        _, t_clean = beit("tokenize", "s3://photos/train", "s3://stores/clean", *tok)
        for name, outage in (("passes", 10), ("outlasts", 60)):
            start = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-m", "beit", "tokenize", "s3://photos/train",
                                        f"s3://stores/{name}", *map(str, tok)], cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)  # fmt: skip
            at = 0
            while process.poll() is None:
                try:
                    at = done(name)
                except Exception:  # not made yet
                    at = 0
                if at >= 5:
                    break
                time.sleep(0.05)
            proxy.inject("slowdown", seconds=outage)
            stdout, stderr = process.communicate(timeout=600)
            first = time.perf_counter() - start
            proxy.clear()
            kept = done(name)
            t_again = 0.0
            if process.returncode:
                _, t_again = beit("tokenize", "s3://photos/train", f"s3://stores/{name}", *tok)
            equal = all(
                np.array_equal(a, b)
                for a, b in (
                    (zarr.open_group(f"s3://stores/{n}", mode="r", storage_options={"endpoint_url": upstream})[k][:]
                     for n in ("clean", name))
                    for k in ("tokens", "views", "labels", "keys", "status")
                )
            )  # fmt: skip
            said = next((line[line.index("error:") :] for line in stderr.splitlines() if "error:" in line), "")
            record(f"object storage, 503 SlowDown {outage} s", f"every request from chunk {at} of 12 on, {outage} s",
                   ("0 chunks (waited it out)" if not process.returncode else
                    f"the chunk in flight (stopped with exit {process.returncode}, {kept} chunks kept; run again)"),
                   0.0 if not process.returncode else t_clean / 12, first + t_again - t_clean, equal,
                   exit_code=process.returncode, proxy_hits=proxy.hits, sentence=said)  # fmt: skip

        # pre-training from that store, its photos in the bucket: every photo's GET answered 503 for
        # 60 s from step 20 on, checkpoints every 8 steps (outlasts the 30 s: stops, then resumes)
        cmd = ["pretrain", "s3://stores/clean", *PRETRAIN, "--set", "checkpoint_every=8"]
        clean_run, cut_run = work / "pretrain-s3-whole", work / "pretrain-s3-outage"
        _, t_clean_pt = beit(*cmd[:2], "--out", clean_run, *cmd[2:])
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "beit", *cmd[:2], "--out", str(cut_run), *map(str, cmd[2:])],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        at = 0
        while process.poll() is None:
            try:
                at = len(rows(cut_run))
            except (OSError, ValueError):  # not there yet, or a row half-written
                pass
            if at >= 20:
                break
            time.sleep(0.005)
        proxy.inject("slowdown", seconds=60, method="GET", path=r"^/photos/")
        _, stderr = process.communicate(timeout=600)
        first = time.perf_counter() - start
        proxy.clear()
        saved = checkpoint_step(cut_run) or 0
        reached = len(rows(cut_run))
        _, t_again = beit(*cmd[:2], "--out", cut_run, *cmd[2:])
        said = next((line[line.index("error:") :] for line in stderr.splitlines() if "error:" in line), "")
        lost = reached - saved
        record("object storage, pretrain", f"503 SlowDown to every photo's GET for 60 s, after step {at} of {STEPS}",
               f"{lost} steps since the checkpoint at step {saved} (stopped with exit {process.returncode}; run "
               "again)", lost * t_clean_pt / STEPS, first + t_again - t_clean_pt, same_losses(clean_run, cut_run),
               exit_code=process.returncode, proxy_hits=proxy.hits, sentence=said)  # fmt: skip
    finally:
        proxy.close()
        server.terminate()
        server.wait(timeout=30)
        for key in settings:
            os.environ.pop(key, None)


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "faults")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    import torch

    from beit.shared.dvae import DVAE, DVAEConfig, save_tokenizer

    beit("data", "fashion-mnist", work / "data", "--size", 64, "--train", 192, "--val", 10)
    source = work / "data" / "train"
    tokenizer = work / "tok.safetensors"
    torch.manual_seed(0)
    model = DVAE(DVAEConfig(n_hid=16, blocks_per_group=1, group_count=4, vocab_size=128, n_init=8, cosine_logits=True))
    save_tokenizer(model, tokenizer, input_size=32)
    tok = ["--tokenizer", tokenizer, *STAGE1]
    results: list[dict] = []

    def record(fault: str, injected: str, lost: str, seconds_lost: float, overhead: float, same: bool, **extra):
        row = {"fault": fault, "injected": injected, "lost": lost, "seconds_lost": round(seconds_lost, 2),
               "overhead_s": round(overhead, 2), "result_equal": same, **extra}  # fmt: skip
        results.append(row)
        print(json.dumps(row), flush=True)

    # the uninterrupted runs
    whole_store = work / "store-whole"
    _, t_tokenize = beit("tokenize", source, whole_store, *tok)
    whole_run = work / "pretrain-whole"
    _, t_pretrain = beit("pretrain", whole_store, "--out", whole_run, *PRETRAIN, "--set", "checkpoint_every=1000")
    step_s = sum(r["images_per_s"] ** -1 * 16 for r in rows(whole_run)[2:]) / (STEPS - 2)  # steady steps
    chunk_s = t_tokenize / 12
    print(f"uninterrupted: tokenize {t_tokenize:.1f} s (12 chunks), pretrain {t_pretrain:.1f} s ({STEPS} steps, "
          f"{step_s:.3f} s a step)", flush=True)  # fmt: skip

    # preemption of pre-training: SIGTERM, and SIGKILL at the same moment, half-way, no checkpoint due
    for sig in (signal.SIGTERM, signal.SIGKILL):
        run = work / f"pretrain-{sig.name}"
        cmd = ["pretrain", whole_store, "--out", run, *PRETRAIN, "--set", "checkpoint_every=1000"]
        cut = interrupt(cmd, lambda r=run: len(rows(r)) >= STEPS // 2 and len(rows(r)), sig)
        saved = checkpoint_step(run) or 0
        done = cut["seen"]  # steps finished when the signal came
        _, t_resume = beit(*cmd)
        lost = max(0, done - saved)
        record(f"preemption, pretrain ({sig.name})", f"{sig.name} after step {done} of {STEPS}, none due",
               f"{lost} steps (checkpoint at step {saved}; exit {cut['code']} {cut['to_exit']:.1f} s after)",
               lost * step_s, cut["seconds"] + t_resume - t_pretrain, same_losses(whole_run, run),
               exit_code=cut["code"], checkpoint_step=saved, signal_after_step=done, stop_s=cut["to_exit"])  # fmt: skip

    # preemption of stage 1
    for sig in (signal.SIGTERM, signal.SIGKILL):
        store = work / f"store-{sig.name}"
        cut = interrupt(["tokenize", source, store, *tok], lambda s=store: chunks_done(s) >= 5 and chunks_done(s), sig)
        done_then, done_after = cut["seen"], chunks_done(store)
        _, t_resume = beit("tokenize", source, store, *tok)
        # a SIGKILLed chunk in flight is redone: its time since the last chunk done is lost
        lost = 0 if sig == signal.SIGTERM else 1
        record(f"preemption, tokenize ({sig.name})", f"{sig.name} after chunk {done_then} of 12",
               f"{lost} chunks in flight (chunks done at exit: {done_after}; exit {cut['code']} "
               f"{cut['to_exit']:.1f} s after)", lost * chunk_s, cut["seconds"] + t_resume - t_tokenize,
               same_store(whole_store, store), exit_code=cut["code"], chunks_at_signal=done_then,
               chunks_at_exit=done_after, stop_s=cut["to_exit"])  # fmt: skip

    namespaces = subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    if namespaces:
        # a full disk at the second checkpoint (every 16 steps): room for one and a half
        every = ["--set", "checkpoint_every=16"]
        ck = work / "pretrain-ck"
        beit("pretrain", whole_store, "--out", ck, *PRETRAIN, *every)
        size = (ck / "checkpoint.pt").stat().st_size
        mount, logs = work / "small-ck", work / "logs-ck"
        logs.mkdir()
        run = mount / "run"
        lines = [timed_line(["pretrain", whole_store, "--out", run, *PRETRAIN, *every], logs / "full"),
                 f"cp -a {shlex.quote(str(run))} {shlex.quote(str(work / 'ck-after-full'))}", "rm $FILLER",
                 timed_line(["pretrain", whole_store, "--out", run, *PRETRAIN, *every], logs / "freed"),
                 f"cp -a {shlex.quote(str(run))} {shlex.quote(str(work / 'ck-after-freed'))}"]  # fmt: skip
        small_disk(mount, 64, int(size * 1.5) + 65536, lines)
        (code, t_full), (_, t_freed) = read_rc(logs / "full"), read_rc(logs / "freed")
        kept, reached = checkpoint_step(work / "ck-after-full"), len(rows(work / "ck-after-full"))
        lost = reached - kept
        record("full disk, checkpoint", f"no room for the checkpoint at step {reached}",
               f"{lost} steps (the checkpoint at step {kept} kept whole; exit {code})", lost * step_s,
               t_full + t_freed - t_pretrain, same_losses(ck, work / "ck-after-freed"), exit_code=code)  # fmt: skip

        # a full disk while the store's chunks are written (the images embedded make the chunks the bulk)
        embedded = work / "store-embedded"
        _, t_embedded = beit("tokenize", source, embedded, *tok, "--embed-images")
        size = sum(f.stat().st_size + 4096 for f in embedded.rglob("*") if f.is_file())
        mount, logs = work / "small-store", work / "logs-store"
        logs.mkdir()
        store = mount / "store"
        lines = [timed_line(["tokenize", source, store, *tok, "--embed-images"], logs / "full"),
                 f"cp -a {shlex.quote(str(store))} {shlex.quote(str(work / 'store-after-full'))}", "rm $FILLER",
                 timed_line(["tokenize", source, store, *tok, "--embed-images"], logs / "freed"),
                 f"cp -a {shlex.quote(str(store))} {shlex.quote(str(work / 'store-after-freed'))}"]  # fmt: skip
        small_disk(mount, 64, size * 2 // 3, lines)
        (code, t_full), (_, t_freed) = read_rc(logs / "full"), read_rc(logs / "freed")
        done = chunks_done(work / "store-after-full")
        record("full disk, store chunk", f"no room after about 2/3 of the store ({done} of 12 chunks done)",
               f"1 chunk in flight, left pending (exit {code})", t_embedded / 12,
               t_full + t_freed - t_embedded, same_store(embedded, work / "store-after-freed"),
               exit_code=code)  # fmt: skip
    else:
        print("no user namespaces here (`unshare -rm`): the full-disk faults are left out", flush=True)

    # silent corruption: one token chunk changed on disk, found by verify --full, redone by tokenize
    store = work / "store-damaged"
    shutil.copytree(whole_store, store)
    flip(store / "tokens" / "c" / "5" / "0" / "0" / "0")
    verify, t_verify = beit("store", "verify", store, "--full", check=False)
    _, t_repair = beit("tokenize", source, store, *tok)
    record("corruption, token chunk", "a byte changed in the tokens of images 80-95",
           f"1 chunk redone (verify --full: exit {verify.returncode} in {t_verify:.1f} s)", chunk_s,
           t_repair, same_store(whole_store, store), verify_exit=verify.returncode, repair_s=t_repair)  # fmt: skip

    # a damaged newest checkpoint: the resume falls back to the one before it
    run = work / "pretrain-damaged"
    cmd = ["pretrain", whole_store, "--out", run, *PRETRAIN, "--set", "checkpoint_every=8"]
    interrupt(cmd, lambda: (checkpoint_step(run) or 0) >= 32, signal.SIGKILL)  # step 32 of 48
    newest, before = checkpoint_step(run), checkpoint_step(run, "checkpoint.previous")
    flip(run / "checkpoint.pt", offset=len((run / "checkpoint.pt").read_bytes()) // 2)
    resumed, t_resume = beit(*cmd)
    lost = newest - before
    said = "from the previous checkpoint" in resumed.stdout + resumed.stderr
    record("corruption, checkpoint", f"a byte changed in the newest checkpoint (step {newest}), then a resume",
           f"{lost} steps (resumed from step {before})", lost * step_s, t_resume,
           same_losses(whole_run, run) and said)  # fmt: skip

    try:
        import moto  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        print("no moto or s3fs here: the object storage faults are left out", flush=True)
    else:
        object_storage(work, source, tokenizer, record)

    import torch as _torch

    report = {"machine": f"{os.cpu_count()} cores, {cpu_name()}",
              "date": time.strftime("%Y-%m-%d"), "torch": _torch.__version__, "command": shlex.join(sys.argv),
              "uninterrupted": {"tokenize_s": t_tokenize, "pretrain_s": t_pretrain, "step_s": step_s},
              "faults": results}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print("\n| fault | injected | lost | seconds lost | overhead (s) | result equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['fault']} | {r['injected']} | {r['lost']} | {r['seconds_lost']:.1f} | {r['overhead_s']:.1f} | "
              f"{'yes' if r['result_equal'] else 'NO'} |")  # fmt: skip


if __name__ == "__main__":
    main()
