"""The custom-dataset spec shown in the README (and in data/custom.py's docstring) is one the loader accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from maskformer_cli.data.catalog import get_dataset_info

ROOT = Path(__file__).parent.parent


def _spec_blocks() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    doc = (ROOT / "maskformer_cli" / "data" / "custom.py").read_text()
    blocks = [("README", b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "semantic:" in b]
    blocks += [("custom.py", b) for b in re.findall(r"```yaml\n(.*?)```", doc, re.S)]
    assert len(blocks) == 2
    return blocks


@pytest.mark.parametrize("where, text", _spec_blocks(), ids=lambda v: v if v in ("README", "custom.py") else "")
def test_documented_spec_loads(tmp_path, where, text):
    spec = yaml.safe_load(text)
    for split in spec.get("semantic", {}).values():
        for key in ("images", "labels"):
            (tmp_path / split[key]).mkdir(parents=True, exist_ok=True)
    for split in spec.get("panoptic", {}).values():
        (tmp_path / split["images"]).mkdir(parents=True, exist_ok=True)
        (tmp_path / split["pngs"]).mkdir(parents=True, exist_ok=True)
        cats = [{"id": i, "name": n, "isthing": int(n in spec.get("thing_classes", []))}
                for i, n in enumerate(spec["classes"])]
        (tmp_path / split["json"]).write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    info = get_dataset_info(path)
    assert info.classes == tuple(spec["classes"]) and info.num_classes == 3
    assert info.label_suffix == ("", spec.get("label_suffix", ""))
