"""The host harness itself: the server starts with the pack, runs core workflows, reports errors."""
from __future__ import annotations

import json
import time

import pytest

import comfy_server as cs
import workflow_tools as wt

CORE_NODES = ("CheckpointLoaderSimple", "CLIPTextEncode", "LoadImage", "VAEEncode", "KSampler",
              "VAEDecode", "SaveImage")


def sd21_img2img_api(ckpt: str, image: str, seed: int = 42, prefix: str = "host_sd21") -> dict:
    """Load Checkpoint -> 2x CLIP Text Encode, Load Image -> VAE Encode -> KSampler (1 step)
    -> VAE Decode -> Save Image, in API format."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode",
              "inputs": {"text": "a photo of a cat, high detail", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": seed, "steps": 1, "cfg": 7.0,
                         "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                         "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["7", 0]}},
    }


def sd21_img2img_ui(ckpt: str, image: str, seed: int = 42, prefix: str = "host_sd21") -> dict:
    """The same graph in the editor's UI format (ids and values as sd21_img2img_api)."""
    links = [  # id, from node, from slot, to node, to slot, type
        [1, 1, 1, 2, 0, "CLIP"], [2, 1, 1, 3, 0, "CLIP"], [3, 4, 0, 5, 0, "IMAGE"],
        [4, 1, 2, 5, 1, "VAE"], [5, 1, 0, 6, 0, "MODEL"], [6, 2, 0, 6, 1, "CONDITIONING"],
        [7, 3, 0, 6, 2, "CONDITIONING"], [8, 5, 0, 6, 3, "LATENT"], [9, 6, 0, 7, 0, "LATENT"],
        [10, 1, 2, 7, 1, "VAE"], [11, 7, 0, 8, 0, "IMAGE"],
    ]

    def node(nid, ntype, x, y, inputs=(), outputs=(), values=()):
        ins = [{"name": n, "type": t, "link": lk} for n, t, lk in inputs]
        outs = [{"name": t, "type": t, "links": [ln[0] for ln in links if ln[1] == nid and ln[2] == i]}
                for i, t in enumerate(outputs)]
        return {"id": nid, "type": ntype, "pos": [x, y], "size": [300, 120], "flags": {},
                "order": nid - 1, "mode": 0, "inputs": ins, "outputs": outs, "properties": {},
                "widgets_values": list(values)}

    nodes = [
        node(1, "CheckpointLoaderSimple", 0, 0, (), ("MODEL", "CLIP", "VAE"), [ckpt]),
        node(2, "CLIPTextEncode", 400, 0, [("clip", "CLIP", 1)], ("CONDITIONING",),
             ["a photo of a cat, high detail"]),
        node(3, "CLIPTextEncode", 400, 200, [("clip", "CLIP", 2)], ("CONDITIONING",), ["blurry"]),
        node(4, "LoadImage", 0, 300, (), ("IMAGE", "MASK"), [image, "image"]),
        node(5, "VAEEncode", 400, 400, [("pixels", "IMAGE", 3), ("vae", "VAE", 4)], ("LATENT",)),
        node(6, "KSampler", 800, 0,
             [("model", "MODEL", 5), ("positive", "CONDITIONING", 6),
              ("negative", "CONDITIONING", 7), ("latent_image", "LATENT", 8)], ("LATENT",),
             [seed, "fixed", 1, 7.0, "euler", "normal", 1.0]),
        node(7, "VAEDecode", 1200, 0, [("samples", "LATENT", 9), ("vae", "VAE", 10)], ("IMAGE",)),
        node(8, "SaveImage", 1500, 0, [("images", "IMAGE", 11)], (), [prefix]),
    ]
    return {"last_node_id": 8, "last_link_id": 11, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def test_server_lists_core_nodes(comfy_server):
    info = comfy_server.object_info()
    for name in CORE_NODES:
        assert name in info, f"{name} missing from /object_info"
    stats = comfy_server.get_json("/system_stats")
    assert stats["system"]["comfyui_version"]
    assert comfy_server.url.startswith("http://127.0.0.1:")
    print(f"ComfyUI {stats['system']['comfyui_version']}: {len(info)} node classes, "
          f"started in {comfy_server.start_seconds:.1f}s")


def test_pack_is_loaded_by_the_custom_node_loader(comfy_server):
    log = comfy_server.log_text()
    status, lines = cs.pack_load_status(log)
    assert status != "absent", "ComfyUI did not try to load the pack (custom_nodes link?)\n" + \
        comfy_server.log_tail()
    assert status != "failed", "the pack failed to import:\n" + "\n".join(lines) + "\n" + \
        comfy_server.log_tail(80)
    ours = [k for k, v in comfy_server.object_info().items()
            if v.get("python_module") == f"custom_nodes.{cs.PACK_NAME}"]
    if ours:  # a pack that registers nodes must be listed as a clean import
        assert status == "loaded", "\n".join(lines)
    print(f"pack load status: {status}; {len(ours)} node classes: {sorted(ours)}")


def test_image_only_prompt_runs_and_writes_files(comfy_server, sample_image):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": sample_image}},
        "2": {"class_type": "ImageScaleBy",
              "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "scale_by": 2.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "scale"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    outputs = comfy_server.run_prompt(prompt, timeout=120)
    saved, = comfy_server.output_files({"3": outputs["3"]})
    preview, = comfy_server.output_files({"4": outputs["4"]})
    assert saved.parent == comfy_server.output_dir and preview.parent == comfy_server.temp_dir
    from PIL import Image
    with Image.open(saved) as im:
        assert im.size == (192, 128)
    with Image.open(preview) as im:
        assert im.size == (96, 64)


def test_rejected_prompt_reports_node_errors(comfy_server, sample_image):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": sample_image}},
        "2": {"class_type": "ImageScaleBy",
              "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "scale_by": 100.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bad"}},
    }
    with pytest.raises(cs.ComfyError) as ei:
        comfy_server.run_prompt(prompt, timeout=60)
    msg = str(ei.value)
    assert "scale_by" in msg and "node 2" in msg, msg
    assert "node_errors" in ei.value.details


def test_execution_error_reports_exception_and_traceback(comfy_server, sample_image):
    prompt = {  # ImageToMask "alpha" of an RGB image: IndexError inside the node
        "1": {"class_type": "LoadImage", "inputs": {"image": sample_image}},
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "err"}},
    }
    with pytest.raises(cs.ComfyError) as ei:
        comfy_server.run_prompt(prompt, timeout=60)
    msg = str(ei.value)
    assert "ImageToMask" in msg and "IndexError" in msg, msg
    assert "image_to_mask" in msg, "no traceback in the message:\n" + msg


def test_core_sd21_img2img_one_step(comfy_server, sd21_checkpoint, sample_image):
    prompt = sd21_img2img_api(sd21_checkpoint, sample_image, seed=int(time.time()) % 100000)
    t0 = time.monotonic()
    outputs = comfy_server.run_prompt(prompt, timeout=600)
    seconds = time.monotonic() - t0
    files = comfy_server.output_files(outputs)
    assert len(files) == 1 and files[0].is_file(), outputs
    from PIL import Image
    with Image.open(files[0]) as im:
        assert im.size == (96, 64) and im.mode == "RGB"
    print(f"SD2.1 img2img, 1 step, 96x64, cold: {seconds:.1f}s")


def test_workflow_tools_agree_with_the_live_server(comfy_server, sd21_checkpoint, sample_image):
    """ui_to_api of the UI graph equals the API prompt, and check_workflow finds nothing."""
    info = comfy_server.object_info()
    ui = sd21_img2img_ui(sd21_checkpoint, sample_image)
    assert wt.check_workflow(ui, info) == []
    assert wt.ui_to_api(ui, info) == sd21_img2img_api(sd21_checkpoint, sample_image)


def test_editor_loads_the_graph_like_workflow_tools(comfy_server, sd21_checkpoint, sample_image,
                                                    editor_check, tmp_path):
    ui = sd21_img2img_ui(sd21_checkpoint, sample_image)
    path = tmp_path / "sd21_img2img.json"
    path.write_text(json.dumps(ui))
    res = editor_check(path, screenshot=tmp_path / "editor.png")
    assert res["missing_types"] == [] and res["loaded_nodes"] == 8, res
    assert res["errors"] == [], res["errors"]
    editor_api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                  for k, v in res["api"].items()}
    assert editor_api == wt.ui_to_api(ui, comfy_server.object_info())
    print(f"editor: {res['seconds']:.1f}s, notes {res['notes']}, blocked {res['blocked']}")


def test_editor_agrees_with_ui_to_api_on_reroute_primitive_bypass_mute(
        comfy_server, sd21_checkpoint, sample_image, editor_check, tmp_path):
    from test_workflow_tools import frontend_only_ui

    ui = frontend_only_ui(sd21_checkpoint, sample_image)
    info = comfy_server.object_info()
    assert wt.check_workflow(ui, info) == []
    path = tmp_path / "frontend_only.json"
    path.write_text(json.dumps(ui))
    res = editor_check(path)
    assert res["missing_types"] == [] and res["errors"] == [], res
    editor_api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                  for k, v in res["api"].items()}
    assert editor_api == wt.ui_to_api(ui, info)


def test_editor_reports_missing_node_types(comfy_server, editor_check, tmp_path):
    ui = {"last_node_id": 1, "last_link_id": 0, "links": [], "groups": [], "config": {},
          "extra": {}, "version": 0.4,
          "nodes": [{"id": 1, "type": "NoSuchNodeAnywhere", "pos": [0, 0], "size": [200, 80],
                     "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                     "properties": {}, "widgets_values": []}]}
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(ui))
    res = editor_check(path)
    assert res["missing_types"] == ["NoSuchNodeAnywhere"], res
