"""The decoded tile store's build on the demo data: images/s with every core (and with one), size on disk.

    .venv/bin/python benchmarks/bench_tiles.py [--tiles-per-slide 50] [--rounds 3] [--resize N]

The demo data (data.tiles_per_slide=50: 800/200/200 tiles of 250x250 PNG) is generated, or reused,
in the usual cache folder; each store is built into a fresh temp folder, so nothing cached is
reused. Printed, per round: ``tile_writer.write_store`` (decode + write) with every core and with one thread;
then one whole ``tiles.get`` (header pass for the size check + build + SHA-256 sealing + rename)
and its verification as a new process would do it, and the store's size on disk. For comparison,
the time to read one epoch of training crops from the store against decoding them with PIL.
The PNG files are in the page cache (they were just generated or read), as after the first epoch.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def du(path: Path) -> int:
    """Bytes on disk (allocated blocks) of the files under ``path``."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles-per-slide", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resize", type=int, default=None)
    parser.add_argument("--crop", type=int, default=224)
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from resnet_sweep.config import checks
    from resnet_sweep.core import sealed
    from resnet_sweep.data import cores, crops, images, loading, tile_writer, tiles

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=demo", f"data.tiles_per_slide={args.tiles_per_slide}"])
    root = loading.resolve_root(cfg.data)
    _, files, _ = images.scan_tree(root, args.crop, cfg.data.cache_dir)
    n = sum(len(v) for v in files.values())
    workers = cores.available()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores ({workers} usable), "
        f"python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"data: {root} ({', '.join(f'{len(files[s])} {s}' for s in checks.SPLITS)}), resize={args.resize}")
    for path in (p for s in files for p in files[s]):  # into the page cache, as after a first epoch
        path.read_bytes()

    def timed_build(threads: int) -> float:
        with tempfile.TemporaryDirectory(dir=cfg.data.cache_dir) as tmp:
            stats = tile_writer.write_store(files, args.resize, Path(tmp), threads, progress=False)
        return stats["img_per_s"]

    rows = []
    for r in range(args.rounds):
        every, one = timed_build(workers), timed_build(1)
        rows.append((every, one))
        print(f"round {r + 1}: build {every:.0f} img/s with {workers} threads, {one:.0f} img/s with 1")
    every = statistics.median(r[0] for r in rows)
    one = statistics.median(r[1] for r in rows)
    print(
        f"build (decode + write), median of {args.rounds}: {every:.0f} img/s with {workers} threads, "
        f"{one:.0f} img/s with 1 ({every / one:.2f}x)"
    )

    with tempfile.TemporaryDirectory(dir=cfg.data.cache_dir) as cache:
        store_cfg = OmegaConf.merge(cfg.data, {"cache_dir": cache})
        start = time.perf_counter()
        store = tiles.get(store_cfg, files, args.resize)
        whole = time.perf_counter() - start
        sealed._verified.clear()  # as a new process
        start = time.perf_counter()
        again = tiles.get(store_cfg, files, args.resize)
        verify = time.perf_counter() - start
        assert again.key == store.key
        size = du(store.path)
        pixels = sum(store.meta["bytes"].values())
        print(
            f"tiles.get, first job: {whole:.2f} s for {n} images ({n / whole:.0f} img/s: header pass, build, "
            f"sha256 seal, rename); a later process opening it (key + sha256 verification): {verify:.2f} s"
        )
        print(
            f"store on disk: {size / 1e6:.1f} MB ({pixels / 1e6:.1f} MB of pixels + index and meta.json); "
            f"the PNG files: {sum(p.stat().st_size for s in files for p in files[s]) / 1e6:.1f} MB"
        )

        # one epoch of training crops: from the store (views, as batches.py copies them) vs PIL decode
        train = store.images("train")
        crop = args.crop
        start = time.perf_counter()
        for i in range(len(train)):
            top, left = crops.crop_offset(train.size(i), crop, 0, i, 0)
            train.crop(i, left, top, crop).copy()
        from_store = time.perf_counter() - start
        start = time.perf_counter()
        for i, path in enumerate(files["train"]):
            image = crops.resized(images.load_rgb(path), args.resize)
            top, left = crops.crop_offset(image.size, crop, 0, i, 0)
            image.crop((left, top, left + crop, top + crop)).tobytes()
        from_pil = time.perf_counter() - start
        print(
            f"one epoch of {len(train)} training crops ({crop}px), one thread: store {len(train) / from_store:.0f} "
            f"img/s, PIL decode {len(train) / from_pil:.0f} img/s"
        )


if __name__ == "__main__":
    main()
