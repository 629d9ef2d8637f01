"""The pack in a real ComfyUI: node definitions, every example workflow run and loaded in the editor,
and the user's MODEL untouched by an SR run."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import workflow_tools as wt

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
OUR_NODES = {
    "SRCO_LoadOSEDiff": ["model", "vae", "weights"],
    "SRCO_LoadCCSR": ["model", "vae", "weights", "decoder"],
    "SRCO_EncodeLQ": ["sr_model", "image", "scale", "resize_method", "process_size", "tiling"],
    "SRCO_Sample": ["sr_model", "latent", "positive", "seed", "latent_mode", "steps", "t_max", "t_min", "cfg",
                    "start_point", "negative", "tiling"],
    "SRCO_Decode": ["latent", "color_fix", "sr_model", "vae", "reference", "tiling"],
    "SRCO_Tiling": ["mode", "latent_tile", "overlap", "vae_tile", "batch_tiles", "weighting", "vae_store"],
    "SRCO_UpscaleSimple": ["model", "vae", "clip", "image", "weights", "scale", "prompt", "color_fix"],
}
WEIGHTS_NAME = "osediff-random.pkl"


CCSR_WEIGHTS = "ccsr-v2/controlnet/diffusion_pytorch_model.safetensors"
GAN_VAE = "ccsr_v2_gan_vae.safetensors"


@pytest.fixture(scope="module")
def osediff_weights(comfy_server) -> str:
    """Random full-size weights in the server's folders: osediff.pkl (official layout), a CCSR v2
    release (controlnet/ + vae/) and its GAN VAE as a models/vae file."""
    dirs = comfy_server.extra_model_dirs
    pkl, ccsr, vae = dirs["osediff"] / WEIGHTS_NAME, dirs["ccsr"] / "ccsr-v2", dirs["vae"] / GAN_VAE
    if not (pkl.exists() and vae.exists()):
        subprocess.run([sys.executable, str(Path(__file__).parent / "random_weights.py"), str(pkl), str(ccsr), str(vae)],
                       check=True, timeout=900)
    return WEIGHTS_NAME


def test_every_node_is_registered_with_its_inputs_and_help(comfy_server):
    info = comfy_server.object_info()
    for node, inputs in OUR_NODES.items():
        assert node in info, node
        d = info[node]
        assert d["python_module"].startswith("custom_nodes."), d["python_module"]
        assert d["description"], f"{node} has no description"
        assert d["input_order"]["required"] + d["input_order"].get("optional", []) == inputs
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                assert wt.input_options(spec).get("tooltip"), f"{node}.{name} has no tooltip"
    assert "sr_model" in info["SRCO_LoadOSEDiff"]["output_name"]


def _prepare(api: dict, checkpoint: str, image: str) -> dict:
    """Swap in the test's model files and shrink the generation for a CPU."""
    api = copy.deepcopy(api)
    for node in api.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = checkpoint
        if "weights" in inputs:
            inputs["weights"] = CCSR_WEIGHTS if node["class_type"] == "SRCO_LoadCCSR" else WEIGHTS_NAME
        if "vae_name" in inputs:
            inputs["vae_name"] = GAN_VAE
        if "process_size" in inputs:
            inputs["process_size"] = 0  # CPU: no enlargement of the small test image
        if node["class_type"] == "LoadImage":
            inputs["image"] = image
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if node["class_type"] == "KSampler":
            inputs["steps"] = 1
    return api


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_is_valid_runs_and_loads_in_the_editor(comfy_server, sd21_checkpoint, sample_image, osediff_weights,
                                                        editor_check, path):
    ui = wt.load_ui_workflow(path)
    info = comfy_server.object_info()
    problems = wt.check_workflow(ui, info, exempt_combo_inputs=("ckpt_name", "weights", "image", "vae_name"))
    assert problems == [], problems
    api = _prepare(wt.ui_to_api(ui, info), sd21_checkpoint, sample_image)
    outputs = comfy_server.run_prompt(api, timeout=900)
    files = comfy_server.output_files(outputs)
    sizes = sorted(Image.open(f).size for f in files)
    w, h = 96, 64  # the uploaded sample
    if any(n["class_type"] == "EmptyLatentImage" for n in api.values()):
        assert sizes == [(64, 64), (256, 256)], sizes  # the generated image, then ×4
    else:
        assert sizes == [(4 * w, 4 * h)], sizes
    result = editor_check(path)
    assert result["missing_types"] == [], result
    assert result["loaded_nodes"] == len(ui["nodes"])


def _plain_sd_run(checkpoint: str, image: str, prefix: str, ids: int) -> dict:
    n = [str(ids + i) for i in range(8)]
    return {
        n[0]: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        n[1]: {"class_type": "CLIPTextEncode", "inputs": {"clip": [n[0], 1], "text": "a house"}},
        n[2]: {"class_type": "CLIPTextEncode", "inputs": {"clip": [n[0], 1], "text": ""}},
        n[3]: {"class_type": "LoadImage", "inputs": {"image": image}},
        n[4]: {"class_type": "VAEEncode", "inputs": {"pixels": [n[3], 0], "vae": [n[0], 2]}},
        n[5]: {"class_type": "KSampler", "inputs": {"model": [n[0], 0], "positive": [n[1], 0], "negative": [n[2], 0],
                                                    "latent_image": [n[4], 0], "seed": 5, "steps": 1, "cfg": 2.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 0.6}},
        n[6]: {"class_type": "VAEDecode", "inputs": {"samples": [n[5], 0], "vae": [n[0], 2]}},
        n[7]: {"class_type": "SaveImage", "inputs": {"images": [n[6], 0], "filename_prefix": prefix}},
    }


def test_user_model_and_vae_unchanged_after_an_sr_run(comfy_server, sd21_checkpoint, sample_image, osediff_weights):
    """KSampler + VAE encode/decode on the user's MODEL/VAE give the same pixels before and after."""
    before = comfy_server.output_files(comfy_server.run_prompt(_plain_sd_run(sd21_checkpoint, sample_image, "before", 100)))
    sr = wt.ui_to_api(wt.load_ui_workflow(ROOT / "workflows" / "osediff_x4_photo_upscale.json"), comfy_server.object_info())
    comfy_server.run_prompt(_prepare(sr, sd21_checkpoint, sample_image))
    # new node ids: nothing is served from the cache, the checkpoint loader's outputs included
    after = comfy_server.output_files(comfy_server.run_prompt(_plain_sd_run(sd21_checkpoint, sample_image, "after", 200)))
    a, b = np.asarray(Image.open(before[0])), np.asarray(Image.open(after[0]))
    assert a.shape == b.shape and np.array_equal(a, b)


def test_wrong_base_model_is_refused_with_a_clear_message(comfy_server, sample_image, osediff_weights):
    """A v-prediction model (the SD 2.1 768-v case, emulated with core ModelSamplingDiscrete on the
    random SD 2.1 checkpoint) is refused by the loader, naming what is wrong and what is needed."""
    ckpt = comfy_server.object_info("CheckpointLoaderSimple")["input"]["required"]["ckpt_name"][0]
    if "sd21-random.safetensors" not in ckpt:
        pytest.skip("no random SD 2.1 checkpoint")
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd21-random.safetensors"}},
        "2": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "v_prediction", "zsnr": False}},
        "3": {"class_type": "SRCO_LoadOSEDiff", "inputs": {"model": ["2", 0], "vae": ["1", 2], "weights": WEIGHTS_NAME}},
        "4": {"class_type": "LoadImage", "inputs": {"image": sample_image}},
        "5": {"class_type": "SRCO_EncodeLQ", "inputs": {"sr_model": ["3", 0], "image": ["4", 0], "scale": 2.0, "resize_method": "bicubic"}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}},
    }
    with pytest.raises(Exception) as e:
        comfy_server.run_prompt(api)
    assert "epsilon" in str(e.value) and "SD 2.1-base" in str(e.value)


def test_cancel_mid_run_leaves_the_user_model_untouched(comfy_server, sd21_checkpoint, sample_image, osediff_weights):
    """Cancel a CCSR run half-way (the queue's Cancel = POST /interrupt): the run stops with
    ComfyUI's interrupt, and the user's MODEL/VAE then give the same pixels as before."""
    import time

    before = comfy_server.output_files(comfy_server.run_prompt(_plain_sd_run(sd21_checkpoint, sample_image, "cb", 300)))
    ui = wt.load_ui_workflow(ROOT / "workflows" / "ccsr_two_step_x4.json")
    api = _prepare(wt.ui_to_api(ui, comfy_server.object_info()), sd21_checkpoint, sample_image)
    for node in api.values():
        if node["class_type"] == "SRCO_EncodeLQ":
            node["inputs"]["process_size"] = 768  # slow enough on a CPU to cancel in the middle
    prompt_id = comfy_server.queue_prompt(api)
    time.sleep(25)
    comfy_server._post_json("/interrupt", {})
    hist = comfy_server.wait_history(prompt_id, timeout=600)
    status = hist.get("status", {})
    assert status.get("status_str") != "success", status
    assert any(m[0] == "execution_interrupted" for m in status.get("messages", [])), status
    after = comfy_server.output_files(comfy_server.run_prompt(_plain_sd_run(sd21_checkpoint, sample_image, "ca", 400)))
    a, b = np.asarray(Image.open(before[0])), np.asarray(Image.open(after[0]))
    assert np.array_equal(a, b)


def _renumber(api: dict, offset: int, prefix: str) -> dict:
    """The same graph under new node ids (nothing served from ComfyUI's cache) and a new file prefix."""
    out = {}
    for nid, node in api.items():
        node = copy.deepcopy(node)
        for k, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                node["inputs"][k] = [str(int(v[0]) + offset), v[1]]
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] = prefix
        out[str(int(nid) + offset)] = node
    return out


def test_two_methods_back_to_back_give_the_images_of_each_run_alone(comfy_server, sd21_checkpoint, sample_image,
                                                                     osediff_weights):
    info = comfy_server.object_info()
    osediff = _prepare(wt.ui_to_api(wt.load_ui_workflow(ROOT / "workflows" / "osediff_x4_photo_upscale.json"), info),
                       sd21_checkpoint, sample_image)
    ccsr = _prepare(wt.ui_to_api(wt.load_ui_workflow(ROOT / "workflows" / "ccsr_one_step_x4_gan_decoder.json"), info),
                    sd21_checkpoint, sample_image)

    def image(outputs):
        return np.asarray(Image.open(comfy_server.output_files(outputs)[0]))

    alone_o = image(comfy_server.run_prompt(_renumber(osediff, 500, "alone_o")))
    comfy_server.run_prompt(_plain_sd_run(sd21_checkpoint, sample_image, "between", 600))  # other work in between
    alone_c = image(comfy_server.run_prompt(_renumber(ccsr, 700, "alone_c")))
    id_o = comfy_server.queue_prompt(_renumber(osediff, 800, "pair_o"))
    id_c = comfy_server.queue_prompt(_renumber(ccsr, 900, "pair_c"))
    pair_o = image(comfy_server.wait_history(id_o)["outputs"])
    pair_c = image(comfy_server.wait_history(id_c)["outputs"])
    assert np.array_equal(alone_o, pair_o)
    assert np.array_equal(alone_c, pair_c)
