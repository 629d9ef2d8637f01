"""workflow_tools: UI -> API conversion and workflow checks against hand-written node definitions.

The definitions below copy the shapes ComfyUI 0.3.64 returns from GET /object_info (V1 nodes:
combos as lists; V3 nodes: ["COMBO", {"options": [...]}], `control_after_generate` as an option).
"""
from __future__ import annotations

import copy
import json

import pytest

import workflow_tools as wt

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]
SCHEDULERS = ["simple", "karras", "normal"]

OBJECT_INFO = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [["sd21-random.safetensors"],
                                             {"tooltip": "The name of the checkpoint (model) to load."}]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL", "CLIP", "VAE"], "output_name": ["MODEL", "CLIP", "VAE"],
        "name": "CheckpointLoaderSimple", "python_module": "nodes", "output_node": False},
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
                               "clip": ["CLIP", {"tooltip": "The CLIP model used for encoding the text."}]}},
        "input_order": {"required": ["text", "clip"]},
        "output": ["CONDITIONING"], "name": "CLIPTextEncode", "python_module": "nodes"},
    "LoadImage": {
        "input": {"required": {"image": [["example.png"], {"image_upload": True}]}},
        "input_order": {"required": ["image"]},
        "output": ["IMAGE", "MASK"], "name": "LoadImage", "python_module": "nodes"},
    "ImageScaleBy": {
        "input": {"required": {"image": ["IMAGE"],
                               "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]],
                               "scale_by": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}]}},
        "input_order": {"required": ["image", "upscale_method", "scale_by"]},
        "output": ["IMAGE"], "name": "ImageScaleBy", "python_module": "nodes"},
    "VAEEncode": {
        "input": {"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}},
        "input_order": {"required": ["pixels", "vae"]},
        "output": ["LATENT"], "name": "VAEEncode", "python_module": "nodes"},
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL", {"tooltip": "The model used for denoising the input latent."}],
            "seed": ["INT", {"default": 0, "min": 0, "max": 18446744073709551615,
                             "control_after_generate": True}],
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
            "sampler_name": [SAMPLERS, {"tooltip": "The algorithm used when sampling"}],
            "scheduler": [SCHEDULERS, {}],
            "positive": ["CONDITIONING", {}],
            "negative": ["CONDITIONING", {}],
            "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                     "positive", "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "name": "KSampler", "python_module": "nodes"},
    "VAEDecode": {
        "input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
        "input_order": {"required": ["samples", "vae"]},
        "output": ["IMAGE"], "name": "VAEDecode", "python_module": "nodes"},
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                  "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
        "input_order": {"required": ["images", "filename_prefix"], "hidden": ["prompt", "extra_pnginfo"]},
        "output": [], "name": "SaveImage", "python_module": "nodes", "output_node": True},
    # V3 nodes (comfy_extras): combos as "COMBO" with options, control as an option of any INT
    "PrimitiveInt": {
        "input": {"required": {"value": ["INT", {"min": -9223372036854775807, "max": 9223372036854775807,
                                                 "control_after_generate": True}]}},
        "input_order": {"required": ["value"]},
        "output": ["INT"], "output_tooltips": [None], "name": "PrimitiveInt",
        "python_module": "comfy_extras.nodes_primitive", "deprecated": False, "experimental": False,
        "api_node": False},
    "LatentConcat": {
        "input": {"required": {"samples1": ["LATENT", {}], "samples2": ["LATENT", {}],
                               "dim": ["COMBO", {"multiselect": False,
                                                 "options": ["x", "-x", "y", "-y", "t", "-t"]}]}},
        "input_order": {"required": ["samples1", "samples2", "dim"]},
        "output": ["LATENT"], "name": "LatentConcat", "python_module": "comfy_extras.nodes_latent",
        "deprecated": False, "experimental": False, "api_node": False},
    "PreviewAny": {
        "input": {"required": {"source": ["*", {}]}},
        "input_order": {"required": ["source"]},
        "output": [], "name": "PreviewAny", "python_module": "comfy_extras.nodes_preview_any",
        "output_node": True},
    # an INT that is a socket only (forceInput): no widget value
    "IntSocket": {
        "input": {"required": {"image": ["IMAGE"], "count": ["INT", {"forceInput": True, "min": 0}],
                               "label": ["STRING", {}]}},
        "input_order": {"required": ["image", "count", "label"]},
        "output": ["IMAGE"], "name": "IntSocket", "python_module": "custom_nodes.x"},
}


class UI:
    """A small builder for UI-format workflows."""

    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, nid, ntype, inputs=(), outputs=(), values=None, mode=0, widget_inputs=()):
        ins = [{"name": n, "type": t, "link": None} for n, t in inputs]
        ins += [{"name": n, "type": t, "widget": {"name": n}, "link": None} for n, t in widget_inputs]
        node = {"id": nid, "type": ntype, "pos": [0, 0], "size": [200, 100], "flags": {},
                "order": len(self.nodes), "mode": mode, "inputs": ins,
                "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
                "properties": {}}
        if values is not None:
            node["widgets_values"] = list(values)
        self.nodes.append(node)
        return node

    def link(self, src, slot, dst, input_name, ltype=None):
        s = next(n for n in self.nodes if n["id"] == src)
        d = next(n for n in self.nodes if n["id"] == dst)
        to_slot = next(i for i, inp in enumerate(d["inputs"]) if inp["name"] == input_name)
        lid = max((ln[0] for ln in self.links), default=0) + 1
        ltype = ltype or s["outputs"][slot]["type"]
        self.links.append([lid, src, slot, dst, to_slot, ltype])
        s["outputs"][slot]["links"].append(lid)
        d["inputs"][to_slot]["link"] = lid
        return lid

    def build(self):
        return {"last_node_id": max(n["id"] for n in self.nodes),
                "last_link_id": max((ln[0] for ln in self.links), default=0),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {}, "extra": {},
                "version": 0.4}


def img2img_ui():
    ui = UI()
    ui.node(1, "CheckpointLoaderSimple", outputs=("MODEL", "CLIP", "VAE"), values=["sd21-random.safetensors"])
    ui.node(2, "CLIPTextEncode", [("clip", "CLIP")], ("CONDITIONING",), ["a cat"])
    ui.node(3, "CLIPTextEncode", [("clip", "CLIP")], ("CONDITIONING",), ["blurry"])
    ui.node(4, "LoadImage", outputs=("IMAGE", "MASK"), values=["example.png", "image"])
    ui.node(5, "VAEEncode", [("pixels", "IMAGE"), ("vae", "VAE")], ("LATENT",), [])
    ui.node(6, "KSampler", [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                            ("latent_image", "LATENT")], ("LATENT",),
            [1234, "randomize", 4, 7.5, "euler", "karras", 0.6],
            widget_inputs=[("seed", "INT"), ("steps", "INT")])
    ui.node(7, "VAEDecode", [("samples", "LATENT"), ("vae", "VAE")], ("IMAGE",))
    ui.node(8, "SaveImage", [("images", "IMAGE")], (), ["sr"])
    ui.node(9, "Note", values=["a note for the user"])
    for src, slot, dst, name in [(1, 1, 2, "clip"), (1, 1, 3, "clip"), (4, 0, 5, "pixels"), (1, 2, 5, "vae"),
                                 (1, 0, 6, "model"), (2, 0, 6, "positive"), (3, 0, 6, "negative"),
                                 (5, 0, 6, "latent_image"), (6, 0, 7, "samples"), (1, 2, 7, "vae"),
                                 (7, 0, 8, "images")]:
        ui.link(src, slot, dst, name)
    return ui


IMG2IMG_API = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd21-random.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
    "6": {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 1234, "steps": 4, "cfg": 7.5, "sampler_name": "euler",
        "scheduler": "karras", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0],
        "denoise": 0.6}},
    "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
    "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sr"}},
}


def node_of(ui: dict, nid: int) -> dict:
    return next(n for n in ui["nodes"] if n["id"] == nid)


# ---------------------------------------------------------------------------------------------

def test_valid_workflow_has_no_problems_and_converts():
    ui = img2img_ui().build()
    assert wt.check_workflow(ui, OBJECT_INFO) == []
    api = wt.ui_to_api(ui, OBJECT_INFO)
    assert api == IMG2IMG_API
    # the API prompt is plain JSON, in input order (what POST /prompt takes)
    assert json.loads(json.dumps(api)) == api
    assert list(api["6"]["inputs"]) == OBJECT_INFO["KSampler"]["input_order"]["required"]


def test_titles_like_the_editor_export():
    ui = img2img_ui().build()
    node_of(ui, 2)["title"] = "Positive"
    api = wt.ui_to_api(ui, OBJECT_INFO, titles=True)
    assert api["2"]["_meta"] == {"title": "Positive"}
    assert api["1"]["_meta"] == {"title": "CheckpointLoaderSimple"}


def test_load_ui_workflow(tmp_path):
    p = tmp_path / "wf.json"
    p.write_text(json.dumps(img2img_ui().build()))
    assert wt.load_ui_workflow(p)["nodes"][0]["type"] == "CheckpointLoaderSimple"
    p.write_text(json.dumps(IMG2IMG_API))
    with pytest.raises(wt.WorkflowError, match="not a UI-format"):
        wt.load_ui_workflow(p)


def test_wrong_link_type_is_reported():
    b = img2img_ui()
    ui = b.build()
    # VAE Decode's "vae" fed with the MODEL output instead of the VAE
    lid = node_of(ui, 7)["inputs"][1]["link"]
    link = next(ln for ln in ui["links"] if ln[0] == lid)
    link[2], link[5] = 0, "MODEL"
    problems = wt.check_workflow(ui, OBJECT_INFO)
    assert len(problems) == 1, problems
    assert f"link {lid}" in problems[0] and "MODEL" in problems[0] and "'vae'" in problems[0]


def test_unknown_node_type_is_reported_and_not_converted():
    b = img2img_ui()
    b.node(10, "SRCO_NoSuchNode", values=[1])
    ui = b.build()
    problems = wt.check_workflow(ui, OBJECT_INFO)
    assert problems == ["node 10 (SRCO_NoSuchNode): unknown node type 'SRCO_NoSuchNode'"]
    with pytest.raises(wt.WorkflowError, match="unknown node type"):
        wt.ui_to_api(ui, OBJECT_INFO)


@pytest.mark.parametrize("index, value, words", [
    (2, 0, ["steps", "below the minimum 1"]),
    (6, 1.5, ["denoise", "above the maximum 1.0"]),
    (3, -1.0, ["cfg", "below the minimum 0.0"]),
    (0, 2 ** 64, ["seed", "above the maximum"]),
    (2, 2.5, ["steps", "not an integer"]),
    (3, "high", ["cfg", "not a finite number"]),
])
def test_out_of_range_or_mistyped_value_is_reported(index, value, words):
    ui = img2img_ui().build()
    node_of(ui, 6)["widgets_values"][index] = value
    problems = wt.check_workflow(ui, OBJECT_INFO)
    assert len(problems) == 1 and "node 6 (KSampler)" in problems[0], problems
    assert all(w in problems[0] for w in words), problems


def test_bad_combo_value_is_reported_unless_exempt():
    ui = img2img_ui().build()
    node_of(ui, 6)["widgets_values"][4] = "euler_fancy"
    node_of(ui, 1)["widgets_values"][0] = "someone-elses-model.safetensors"
    node_of(ui, 4)["widgets_values"][0] = "photo.png"
    problems = wt.check_workflow(ui, OBJECT_INFO)
    assert len(problems) == 3, problems
    assert any("sampler_name: 'euler_fancy' is not one of" in p for p in problems)
    # model/image file names are the user's: exempt them by input name
    problems = wt.check_workflow(ui, OBJECT_INFO, exempt_combo_inputs={"ckpt_name", "image"})
    assert len(problems) == 1 and "sampler_name" in problems[0], problems
    assert {"ckpt_name", "image", "weights"} <= wt.MODEL_FILE_INPUTS
    # the file-name exemption never hides a bad sampler
    assert len(wt.check_workflow(ui, OBJECT_INFO, wt.MODEL_FILE_INPUTS)) == 1


def test_wrong_number_of_widget_values_is_reported():
    ui = img2img_ui().build()
    del node_of(ui, 6)["widgets_values"][1]   # the seed's "control after generate" value
    problems = wt.check_workflow(ui, OBJECT_INFO)
    assert len(problems) == 1 and "6 widget values, expected 7" in problems[0], problems
    with pytest.raises(wt.WorkflowError, match="expected 7"):
        wt.ui_to_api(ui, OBJECT_INFO)
    ui = img2img_ui().build()
    node_of(ui, 4)["widgets_values"] = ["example.png"]  # LoadImage's upload widget value missing
    assert "1 widget values, expected 2" in wt.check_workflow(ui, OBJECT_INFO)[0]


def test_bad_control_after_generate_value_is_reported():
    ui = img2img_ui().build()
    node_of(ui, 6)["widgets_values"][1] = "sometimes"
    problems = wt.check_workflow(ui, OBJECT_INFO)
    assert len(problems) == 1 and "control after generate 'sometimes'" in problems[0]


def test_unconnected_required_input_is_reported():
    ui = img2img_ui().build()
    lid = node_of(ui, 6)["inputs"][3]["link"]   # latent_image
    ui["links"] = [ln for ln in ui["links"] if ln[0] != lid]
    node_of(ui, 6)["inputs"][3]["link"] = None
    node_of(ui, 5)["outputs"][0]["links"] = []
    problems = wt.check_workflow(ui, OBJECT_INFO)
    assert problems == ["node 6 (KSampler): required input 'latent_image' is not connected"]


def test_converted_widget_takes_the_link_and_v3_control_value_is_skipped():
    b = img2img_ui()
    b.node(11, "PrimitiveInt", outputs=("INT",), values=[3, "increment"])
    b.link(11, 0, 6, "steps")
    ui = b.build()
    assert wt.check_workflow(ui, OBJECT_INFO) == []
    api = wt.ui_to_api(ui, OBJECT_INFO)
    assert api["6"]["inputs"]["steps"] == ["11", 0]
    assert api["11"] == {"class_type": "PrimitiveInt", "inputs": {"value": 3}}
    # a linked widget's stale value is not checked
    node_of(ui, 6)["widgets_values"][2] = 0
    assert wt.check_workflow(ui, OBJECT_INFO) == []
    # an INT output into a FLOAT widget is a type mismatch
    b2 = img2img_ui()
    b2.node(11, "PrimitiveInt", outputs=("INT",), values=[3, "fixed"])
    node6 = next(n for n in b2.nodes if n["id"] == 6)
    node6["inputs"].append({"name": "cfg", "type": "FLOAT", "widget": {"name": "cfg"}, "link": None})
    b2.link(11, 0, 6, "cfg", "INT")
    problems = wt.check_workflow(b2.build(), OBJECT_INFO)
    assert len(problems) == 1 and "is INT but node 6 (KSampler) input 'cfg' takes FLOAT" in problems[0]


def frontend_only_ui(ckpt: str = "sd21-random.safetensors", image: str = "example.png") -> dict:
    """img2img with a Reroute (VAE), a legacy PrimitiveNode (seed = 777), a bypassed Upscale
    (Load Image -> VAE Encode) and a muted Save Image. Used by the host tests too (editor check)."""
    b = img2img_ui()
    ui = b.build()
    node_of(ui, 1)["widgets_values"] = [ckpt]
    node_of(ui, 4)["widgets_values"] = [image, "image"]

    def unlink(dst, slot):
        lid = node_of(ui, dst)["inputs"][slot]["link"]
        b.links = [ln for ln in b.links if ln[0] != lid]
        node_of(ui, dst)["inputs"][slot]["link"] = None
        for n in b.nodes:
            for o in n["outputs"]:
                o["links"] = [x for x in o["links"] if x != lid]

    b.node(20, "Reroute", [("", "*")], ("VAE",))
    unlink(7, 1)
    b.link(1, 2, 20, "")
    b.link(20, 0, 7, "vae")
    b.node(21, "PrimitiveNode", outputs=("INT",), values=[777, "fixed"])
    b.link(21, 0, 6, "seed")
    b.node(22, "ImageScaleBy", [("image", "IMAGE")], ("IMAGE",), ["bicubic", 4.0], mode=4)
    unlink(5, 0)
    b.link(4, 0, 22, "image")
    b.link(22, 0, 5, "pixels")
    b.node(23, "SaveImage", [("images", "IMAGE")], (), ["lq"], mode=2)
    b.link(4, 0, 23, "images")
    return b.build()


def test_frontend_only_nodes_reroute_primitive_mute_bypass():
    ui = frontend_only_ui()
    assert wt.check_workflow(ui, OBJECT_INFO) == []
    api = wt.ui_to_api(ui, OBJECT_INFO)
    expected = copy.deepcopy(IMG2IMG_API)
    expected["6"]["inputs"]["seed"] = 777
    assert api == expected
    # a muted source leaves the input empty: then it is reported as not connected
    node_of(ui, 22)["mode"] = 2
    assert wt.check_workflow(ui, OBJECT_INFO) == [
        "node 5 (VAEEncode): required input 'pixels' is not connected"]
    assert "pixels" not in wt.ui_to_api(ui, OBJECT_INFO)["5"]["inputs"]


def test_v3_combo_star_inputs_and_force_input():
    b = UI()
    b.node(1, "CheckpointLoaderSimple", outputs=("MODEL", "CLIP", "VAE"), values=["sd21-random.safetensors"])
    b.node(2, "LoadImage", outputs=("IMAGE", "MASK"), values=["example.png", "image"])
    b.node(3, "VAEEncode", [("pixels", "IMAGE"), ("vae", "VAE")], ("LATENT",), [])
    b.node(4, "LatentConcat", [("samples1", "LATENT"), ("samples2", "LATENT")], ("LATENT",), ["-y"])
    b.node(5, "PreviewAny", [("source", "*")], (), [])
    b.node(6, "PrimitiveInt", outputs=("INT",), values=[5, "fixed"])
    b.node(7, "IntSocket", [("image", "IMAGE"), ("count", "INT")], ("IMAGE",), ["hello"])
    for src, slot, dst, name in [(2, 0, 3, "pixels"), (1, 2, 3, "vae"), (3, 0, 4, "samples1"),
                                 (3, 0, 4, "samples2"), (4, 0, 5, "source"), (2, 0, 7, "image"),
                                 (6, 0, 7, "count")]:
        b.link(src, slot, dst, name)
    ui = b.build()
    assert wt.check_workflow(ui, OBJECT_INFO) == []
    api = wt.ui_to_api(ui, OBJECT_INFO)
    assert api["4"]["inputs"] == {"samples1": ["3", 0], "samples2": ["3", 0], "dim": "-y"}
    assert api["5"]["inputs"] == {"source": ["4", 0]}
    assert api["7"]["inputs"] == {"image": ["2", 0], "count": ["6", 0], "label": "hello"}
    node_of(ui, 4)["widgets_values"] = ["z"]
    problems = wt.check_workflow(ui, OBJECT_INFO)
    assert len(problems) == 1 and "dim: 'z' is not one of ['x', '-x'" in problems[0]


def test_types_match():
    assert wt.types_match("IMAGE", "IMAGE")
    assert not wt.types_match("IMAGE", "MASK")
    assert wt.types_match("*", "MODEL") and wt.types_match("LATENT", "*")
    assert wt.types_match("INT", "INT,FLOAT") and not wt.types_match("STRING", "INT,FLOAT")
    assert wt.types_match("COMBO", ["a", "b"]) and wt.types_match(["a"], "COMBO")
    assert not wt.types_match("STRING", ["a", "b"])


def test_widget_layout_follows_the_frontend_rules():
    layout = {n: extra for n, _, extra in wt.widget_layout(OBJECT_INFO["KSampler"])}
    assert layout == {"seed": 1, "steps": 0, "cfg": 0, "sampler_name": 0, "scheduler": 0, "denoise": 0}
    assert wt.expected_widget_count(OBJECT_INFO["LoadImage"]) == 2      # + the upload button's value
    assert wt.expected_widget_count(OBJECT_INFO["PrimitiveInt"]) == 2   # V3 control on "value"
    assert wt.expected_widget_count(OBJECT_INFO["IntSocket"]) == 1      # forceInput is no widget
    # a V1 INT named seed without the option still gets the control (legacy rule); False turns it off
    legacy = {"input": {"required": {"noise_seed": ["INT", {"min": 0}]}}}
    assert wt.expected_widget_count(legacy) == 2
    off = {"input": {"required": {"seed": ["INT", {"control_after_generate": False}]}}}
    assert wt.expected_widget_count(off) == 1
