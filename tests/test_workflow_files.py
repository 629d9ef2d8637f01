"""The example workflows as files: UI format, a thumbnail each, only core nodes and ours."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

import workflow_tools as wt

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CORE_NODES = {"CheckpointLoaderSimple", "LoadImage", "SaveImage", "PreviewImage", "CLIPTextEncode", "KSampler",
              "VAEDecode", "VAEEncode", "EmptyLatentImage", "VAELoader", "Note", "MarkdownNote"}


def _our_node_ids() -> set[str]:
    src = (ROOT / "nodes" / "sr_nodes.py").read_text()
    prefix = re.search(r'^PREFIX = "(\w+)"', src, re.M).group(1)
    return {prefix + n for n in re.findall(r'node_id=PREFIX \+ "(\w+)"', src)}


def test_there_are_example_workflows():
    names = {p.stem for p in WORKFLOWS}
    assert {"osediff_x4_photo_upscale", "sd21_generate_then_osediff_x4"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_file(path):
    ui = wt.load_ui_workflow(path)  # UI format: nodes + links
    assert ui["nodes"] and isinstance(ui["links"], list)
    ours = _our_node_ids()
    for node in ui["nodes"]:
        assert node["type"] in CORE_NODES | ours, f"{path.name}: node type {node['type']} is neither core nor ours"
    assert any(n["type"] in ours for n in ui["nodes"])
    # every link joins existing nodes
    ids = {n["id"] for n in ui["nodes"]}
    for link in ui["links"]:
        assert link[1] in ids and link[3] in ids, link
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{path.name} has no thumbnail"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and min(im.size) >= 200
