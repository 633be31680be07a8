"""What depends only on the data is done once per sweep: the tree listed and stamped once, each image
decoded once (for its check and the tile store together), and a file changed between two sweeps
seen by the second."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from conftest import FAST, make_tree, mlflow_runs, run_app
from PIL import ImageFile

from resnet_sweep.data import image_folder, loading, shared_tree, tiles


@pytest.fixture
def decodes(monkeypatch) -> Counter:
    """Every real decode of an image file (PIL's ``ImageFile.load`` with tiles still to decode), by path."""
    counts: Counter = Counter()
    load = ImageFile.ImageFile.load

    def counted(self):
        if self.tile and getattr(self, "filename", None):
            counts[str(self.filename)] += 1
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    return counts


def test_the_first_sweep_decodes_each_image_once(tmp_path, decodes):
    root = make_tree(tmp_path / "tiles")
    files = sorted(str(p) for p in root.rglob("*.png"))
    # one job trains a head on the feature bank, one fine-tunes from the tile store
    run_app(tmp_path, "-m", *FAST, "data=imagefolder", f"data.root={root}", "backbone.freeze=all,none")
    runs = mlflow_runs(tmp_path)
    assert sorted(r.info.status for r in runs.children) == ["FINISHED", "FINISHED"]
    assert {path: decodes[path] for path in files} == dict.fromkeys(files, 1)
    assert sum(decodes.values()) == len(files)


def test_a_sweep_lists_and_stats_its_data_once_for_all_its_jobs(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tiles")
    listed = []
    list_tree = image_folder.list_tree
    monkeypatch.setattr(image_folder, "list_tree", lambda r: listed.append(r) or list_tree(r))
    for module in (loading, shared_tree):
        monkeypatch.setattr(module, "list_tree", image_folder.list_tree)
    run_app(tmp_path, "-m", *FAST, "data=imagefolder", f"data.root={root}", "optimizer.lr=1e-3,1e-2,1e-1")
    assert len(mlflow_runs(tmp_path).children) == 3
    assert listed == [root]  # the pre-flight's; its three jobs read its record


def test_a_file_added_or_changed_between_two_sweeps_is_seen(tmp_path):
    root = make_tree(tmp_path / "tiles")
    sweep = ["-m", *FAST, "data=imagefolder", f"data.root={root}", "optimizer.lr=1e-3,1e-2"]
    run_app(tmp_path, *sweep, "hydra.sweep.dir=sweep")
    first = {r.info.run_id for r in mlflow_runs(tmp_path).children}
    added = root / "train" / "a_class" / "added.png"
    added.write_bytes((root / "train" / "a_class" / "img0.png").read_bytes())
    run_app(tmp_path, *sweep, "hydra.sweep.dir=sweep")  # the same sweep folder, the same process
    second = [r for r in mlflow_runs(tmp_path).children if r.info.run_id not in first]
    assert len(second) == 2  # new jobs (a new data fingerprint), not the first sweep's reused
    assert {r.data.tags["class_counts.train"] for r in second} == {"a_class 7, b_class 6"}
    os.utime(added, ns=(1, 1))  # the same files, one with another mtime: different data again
    run_app(tmp_path, *sweep, "hydra.sweep.dir=sweep")
    assert len(mlflow_runs(tmp_path).children) == 6


def test_a_record_shared_through_the_sweep_folder_is_read_without_listing_again(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tiles")
    cfg = {"cache_dir": str(tmp_path / "cache"), "tile_store": "off"}
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.create(cfg)
    share = shared_tree.start_sweep_share(tmp_path / "sweep")
    made = shared_tree.share_tree(share, data_cfg, root, crop_size=32)
    shared_tree._trees.clear()  # another process: nothing remembered
    shared_tree._share["folder"] = None
    for module in (loading, shared_tree):
        monkeypatch.setattr(module, "list_tree", lambda r: pytest.fail("listed again"))
    again = shared_tree.share_tree(share, data_cfg, root, crop_size=32)
    assert again.listing.files == made.listing.files and again.checks == made.checks
    every = [p for split in ("train", "valid", "test") for p in made.listing.files[split]]
    assert again.listing.fingerprint == made.listing.fingerprint == image_folder.fingerprint(every)


def test_fingerprints_from_the_listing_equal_those_from_the_disk(tmp_path):
    root = make_tree(tmp_path / "tiles")
    elsewhere = make_tree(tmp_path / "other", per_class=(1, 1, 1))
    target = elsewhere / "train" / "a_class" / "img0.png"
    (root / "train" / "a_class" / "linked.png").symlink_to(target)  # as resnet-sweep split makes them
    (root / "train" / "b_class" / "deeper").mkdir()
    (root / "train" / "b_class" / "deeper" / "img9.png").write_bytes(target.read_bytes())
    listing = image_folder.list_tree(root)
    assert listing.files["train"][:7] == sorted((root / "train" / "a_class").rglob("*.png"))
    for split in ("train", "valid", "test"):
        paths = listing.files[split]
        assert image_folder.fingerprint(paths, listing.stamps) == image_folder.fingerprint(paths)
    assert listing.stamps[str(root / "train" / "a_class" / "linked.png")][0] == str(target.resolve())
    assert tiles.key_of(listing.files, None, listing.stamps) == tiles.key_of(listing.files, None)
    assert listing.fingerprint == image_folder.fingerprint([p for s in listing.files for p in listing.files[s]])


def test_a_jobs_keys_and_digests_from_the_listing_equal_those_from_the_disk(tmp_path):
    import hashlib

    from omegaconf import OmegaConf

    from resnet_sweep.config import schema
    from resnet_sweep.tracking import logged

    root = make_tree(tmp_path / "tiles")
    (root / "valid" / "a_class" / "img0.png").write_bytes(b"")  # skipped: the valid split is not the listing's
    cfg = OmegaConf.create(
        {
            "data": OmegaConf.structured(
                schema.DataConf(kind="imagefolder", root=str(root), cache_dir=str(tmp_path / "c"))
            ),
            "trainer": OmegaConf.structured(schema.TrainerConf(num_workers=0, batch_size=4)),
        }
    )  # the defaults from the schema, where they live
    cfg.data.on_bad_image = "skip"
    splits = loading.load_splits(cfg.data, cfg.trainer, crop_size=32)
    for split in ("train", "valid", "test"):
        files = [p for p, _ in getattr(splits, split).dataset.samples]
        assert splits.fingerprint(split) == image_folder.fingerprint(files)
    assert tiles.key_of(splits.files, None, splits.listing.stamps) == tiles.key_of(splits.files, None)
    names = sorted(
        f"{s}/{p.relative_to(root / s).as_posix()}\t{y}"
        for s in ("train", "valid", "test")
        for p, y in getattr(splits, s).dataset.samples
    )
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    assert logged.dataset_input(splits, cfg.data).digest == digest  # as pathlib's relative_to gave it


def test_an_image_changed_after_the_sweep_listed_it_is_one_line_and_no_store(tmp_path):
    from omegaconf import OmegaConf

    from resnet_sweep.config import schema
    from resnet_sweep.core.errors import UserError

    root = make_tree(tmp_path / "tiles")
    listing = image_folder.list_tree(root)
    changed = listing.files["valid"][1]
    os.utime(changed, ns=(1, 1))  # after the listing, before the store is built
    data_cfg = OmegaConf.structured(schema.DataConf(cache_dir=str(tmp_path / "cache")))
    with pytest.raises(UserError, match=f"^{changed}: changed since this sweep listed its data"):
        tiles.get(data_cfg, listing.files, None, stamps=listing.stamps)
    assert not [p for p in tiles.root_of(data_cfg).iterdir() if not p.name.endswith(".lock")]
    assert tiles.get(data_cfg, listing.files, None) is not None  # listed afresh (the next sweep): built
