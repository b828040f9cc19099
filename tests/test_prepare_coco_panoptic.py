"""prepare-data coco-panoptic: nested annotation zips, and semantic labels from panoptic (0..132, 255)."""

from __future__ import annotations

import json

import numpy as np
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image
from prepare_utils import jpg_bytes, png_bytes, quiet_console, write_zip, zip_bytes

from maskformer_cli.commands.prepare_data import run_prepare
from maskformer_cli.data.catalog import get_dataset_info
from maskformer_cli.data.staging import read_stamp

# facts: COCO panoptic category id -> contiguous index among the 133 sorted ids
CONTIGUOUS = {1: 0, 7: 6, 92: 80, 200: 132}
H, W = 12, 16


def _image(seed):
    """Segment id map (values chosen to need all three RGB channels) and its segments_info."""
    rng = np.random.default_rng(seed)
    sids = [0, 5, 300, 70_000, 123_456]
    cats = {5: 1, 300: 7, 70_000: 92, 123_456: 200}
    ids = rng.choice(sids, size=(H, W))
    segments = [{"id": s, "category_id": c, "iscrowd": int(s == 300), "area": int((ids == s).sum()), "bbox": [0, 0, 1, 1]}
                for s, c in cats.items()]
    return ids, segments


def make_archives(tmp_path):
    names = {"train2017": ["000000000009", "000000000025"], "val2017": ["000000000139"]}
    truth = {}
    ann_members = {}
    cats = [{"id": i, "name": f"c{i}", "isthing": int(i < 92)} for i in CONTIGUOUS]
    image_zips = {}
    for split, stems in names.items():
        pngs, images, anns, imgs = {}, [], [], {}
        for k, stem in enumerate(stems):
            ids, segments = _image(int(stem) + k)
            truth[(split, stem)] = (ids, segments)
            pngs[f"panoptic_{split}/{stem}.png"] = png_bytes(id2rgb(ids).astype(np.uint8))
            images.append({"id": int(stem), "file_name": f"{stem}.jpg", "height": H, "width": W})
            anns.append({"image_id": int(stem), "file_name": f"{stem}.png", "segments_info": segments})
            imgs[f"{split}/{stem}.jpg"] = jpg_bytes(H, W)
        ann_members[f"annotations/panoptic_{split}.json"] = json.dumps(
            {"images": images, "annotations": anns, "categories": cats}).encode()
        ann_members[f"annotations/panoptic_{split}.zip"] = zip_bytes(pngs)  # nested, as in the official zip
        image_zips[split] = write_zip(tmp_path / f"{split}.zip", imgs)
    pan = write_zip(tmp_path / "panoptic_annotations_trainval2017.zip", ann_members)
    return [pan, image_zips["train2017"], image_zips["val2017"]], truth


def test_coco_panoptic_layout_and_semantic_labels(tmp_path):
    archives, truth = make_archives(tmp_path)
    root = tmp_path / "datasets"
    run_prepare("coco-panoptic", root=root, archives=archives, download=False, check=None, accept_checksum=True,
                force=False, synthetic={}, console=quiet_console())
    base = root / "coco"
    for (split, stem), (ids, segments) in truth.items():
        with Image.open(base / f"panoptic_{split}" / f"{stem}.png") as im:
            np.testing.assert_array_equal(rgb2id(np.array(im)), ids)
        with Image.open(base / f"panoptic_semseg_{split}" / f"{stem}.png") as im:
            sem = np.array(im)
        cat_of = {s["id"]: s["category_id"] for s in segments}
        for (y, x), sid in np.ndenumerate(ids):
            want = 255 if sid == 0 else CONTIGUOUS[cat_of[int(sid)]]
            assert sem[y, x] == want
        assert (base / split / f"{stem}.jpg").is_file()
    assert (base / "annotations/panoptic_val2017.json").is_file()
    assert not (base / "annotations/panoptic_val2017.zip").exists(), "nested zips are unpacked, not kept"
    assert read_stamp(base)["datasets"]["coco_panoptic"]["counts"] == {"train": 2, "val": 1}
    info = get_dataset_info("coco-panoptic")
    for img_dir, js, png_dir in info.panoptic.values():
        assert (base / img_dir).is_dir() and (base / js).is_file() and (base / png_dir).is_dir()
    assert [info.dataset_ids[k] for k in CONTIGUOUS.values()] == list(CONTIGUOUS)
    assert len(info.thing_ids) == 80 and info.num_classes == 133


def test_existing_coco_tree_needs_no_archives(tmp_path):
    archives, truth = make_archives(tmp_path)
    root = tmp_path / "datasets"
    run_prepare("coco-panoptic", root=root, archives=archives, download=False, check=None, accept_checksum=True,
                force=False, synthetic={}, console=quiet_console())
    import shutil

    shutil.rmtree(root / "coco" / "panoptic_semseg_val2017")  # a detectron2 tree without semantic labels
    (root / "coco" / ".maskformer_prepared.json").unlink()
    run_prepare("coco-panoptic", root=root, archives=[], download=False, check=None, accept_checksum=False,
                force=False, synthetic={}, console=quiet_console())
    assert (root / "coco/panoptic_semseg_val2017/000000000139.png").is_file()
    sources = read_stamp(root / "coco")["datasets"]["coco_panoptic"]["sources"]
    assert all("in place" in v for v in sources.values())
