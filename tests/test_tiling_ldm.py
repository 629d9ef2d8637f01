"""The ldm-layout adapter (ComfyUI's Encoder/Decoder names) gives the diffusers adapter's result.

A small ldm-named module tree is written here (names and structure of ComfyUI's
comfy/ldm/modules/diffusionmodules/model.py Encoder/Decoder: down[i].block[j].norm1/conv1/
norm2/conv2/nin_shortcut, down[i].downsample.conv with the asymmetric pad, mid.block_1/
attn_1/block_2, up[i].upsample (nearest ×2 + conv), norm_out, conv_out); weights come
from a diffusers tiny VAE through sr_core.keymap. With COMFYUI_DIR set, the same is
checked against ComfyUI's own modules in ComfyUI's venv (a subprocess).
"""
from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_models
from sr_core import keymap
from sr_core.tiling import TiledVAE, vae_ops


pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parent.parent


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class LdmResnet(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _gn(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class LdmAttn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _gn(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        n, c, hh, ww = h.shape
        q = self.q(h).reshape(n, c, -1).transpose(1, 2)
        k = self.k(h).reshape(n, c, -1)
        v = self.v(h).reshape(n, c, -1)
        a = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=-1)
        o = torch.bmm(v, a.transpose(1, 2)).reshape(n, c, hh, ww)
        return x + self.proj_out(o)


class LdmDown(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class LdmUp(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int) -> nn.Module:
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = LdmResnet(c, c), LdmAttn(c), LdmResnet(c, c)
    return m


class LdmEncoder(nn.Module):
    def __init__(self, ch: int, mult: tuple[int, ...], blocks: int, z: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList([LdmResnet(cin if j == 0 else ch * m, ch * m) for j in range(blocks)])
            level.attn = nn.ModuleList()
            cin = ch * m
            if i != len(mult) - 1:
                level.downsample = LdmDown(cin)
            self.down.append(level)
        self.mid = _mid(cin)
        self.norm_out, self.conv_out = _gn(cin), nn.Conv2d(cin, 2 * z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for b in level.block:
                h = b(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class LdmDecoder(nn.Module):
    def __init__(self, ch: int, mult: tuple[int, ...], blocks: int, z: int) -> None:
        super().__init__()
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        self.mid = _mid(cin)
        ups = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList([LdmResnet(cin if j == 0 else ch * mult[i], ch * mult[i])
                                         for j in range(blocks + 1)])
            level.attn = nn.ModuleList()
            cin = ch * mult[i]
            if i != 0:
                level.upsample = LdmUp(cin)
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out, self.conv_out = _gn(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            for b in self.up[i].block:
                h = b(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LdmAutoencoder(nn.Module):
    """ComfyUI's first_stage_model layout: encoder, decoder, quant_conv, post_quant_conv."""

    def __init__(self, ch=32, mult=(1, 2, 4, 4), blocks=2, z=4) -> None:
        super().__init__()
        self.encoder, self.decoder = LdmEncoder(ch, mult, blocks, z), LdmDecoder(ch, mult, blocks, z)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)


@pytest.fixture(scope="module")
def pair():
    _, vae, _ = tiny_models.build_models(3)
    ldm = LdmAutoencoder().eval()
    ldm.load_state_dict(keymap.vae_diffusers_to_ldm(vae.state_dict(), tiny_models.TINY_VAE), strict=True)
    return vae, ldm


def test_ldm_tree_is_the_same_network(pair):
    vae, ldm = pair
    x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        d = vae.encode(x).latent_dist
        moments = ldm.quant_conv(ldm.encoder(x))
        torch.testing.assert_close(moments[:, :4], d.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ldm.decoder(ldm.post_quant_conv(d.mean)), vae.decode(d.mean).sample,
                                   atol=5e-5, rtol=1e-5)


def test_ldm_and_diffusers_executors_agree(pair):
    vae, ldm = pair
    assert vae_ops(ldm).layout == "ldm" and vae_ops(vae).layout == "diffusers"
    x = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1
    t_d, t_l = TiledVAE(vae, encoder_tile=24, decoder_tile=3), TiledVAE(ldm, encoder_tile=24, decoder_tile=3)
    m_d, lv_d = t_d.encode_moments(x)
    m_l, lv_l = t_l.encode_moments(x)
    torch.testing.assert_close(m_l, m_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lv_l, lv_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_l.decode(m_d), t_d.decode(m_d), atol=5e-5, rtol=1e-5)
    with torch.no_grad():  # and both equal the untiled ldm network
        torch.testing.assert_close(t_l.decode(m_d), ldm.decoder(ldm.post_quant_conv(m_d)), atol=5e-5, rtol=1e-5)


COMFY_SCRIPT = textwrap.dedent("""
    import sys, torch
    comfy_dir, root, data = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path[:0] = [comfy_dir, root]
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from sr_core.tiling import TiledVAE, vae_ops
    d = torch.load(data)
    dd = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    model = AutoencoderKL(ddconfig=dd, embed_dim=4).eval()
    missing, unexpected = model.load_state_dict(d["sd"], strict=False)
    assert not [k for k in missing if "loss" not in k], missing
    assert vae_ops(model).layout == "ldm"
    tv = TiledVAE(model, encoder_tile=24, decoder_tile=3)
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(d["x"]))
        dec = model.decoder(model.post_quant_conv(d["z"]))
    torch.save({"moments": moments, "dec": dec, "tiled_mean": tv.encode_moments(d["x"])[0],
                "tiled_dec": tv.decode(d["z"])}, data)
""")


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR not set")
def test_comfyui_modules_give_the_same_result(pair, tmp_path):
    """ComfyUI's own Encoder/Decoder (its venv, a subprocess): untiled and tiled through our ldm adapter."""
    vae, _ = pair
    comfy = Path(os.environ["COMFYUI_DIR"])
    py = os.environ.get("COMFYUI_PYTHON") or str(comfy.parent / "venv" / "bin" / "python")
    if not Path(py).exists():
        pytest.skip(f"no ComfyUI python at {py} (set COMFYUI_PYTHON)")
    x = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        d = vae.encode(x).latent_dist
        ref_dec = vae.decode(d.mean).sample
    data = tmp_path / "io.pt"
    sd = keymap.vae_diffusers_to_ldm(vae.state_dict(), tiny_models.TINY_VAE)
    torch.save({"sd": sd, "x": x, "z": d.mean}, data)
    script = tmp_path / "run_comfy.py"
    script.write_text(COMFY_SCRIPT)
    proc = subprocess.run([py, str(script), str(comfy), str(ROOT), str(data)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(data)
    torch.testing.assert_close(out["moments"][:, :4], d.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["tiled_mean"], d.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["dec"], ref_dec, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(out["tiled_dec"], ref_dec, atol=5e-5, rtol=1e-5)
    print("\nComfyUI Encoder/Decoder through the ldm adapter: tiled = untiled = diffusers")
