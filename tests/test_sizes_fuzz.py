"""Any input size and scale gives exactly scale × the input, or one of our clear errors (fuzzed)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sr_core.errors import InputImageError, SizeLimitError
from sr_core.pipeline import MAX_UNTILED_OUTPUT_PIXELS, MIN_SIDE, upscale_osediff
from sr_core.schedule import sd_alphas_cumprod


class ShapeOnlyHost:
    """A host whose VAE is an 8× average-pool / nearest-upsample and whose UNet predicts zero noise:
    it keeps every shape rule of the real models at no cost."""

    scale_factor = 0.18215
    alphas_cumprod = sd_alphas_cumprod()

    def encode_moments(self, pixels):
        assert pixels.shape[-1] % 8 == 0 and pixels.shape[-2] % 8 == 0, pixels.shape
        mean = F.avg_pool2d(pixels, 8).mean(dim=1, keepdim=True).expand(-1, 4, -1, -1)
        return mean, torch.zeros_like(mean)

    def decode(self, raw):
        return F.interpolate(raw[:, :3], scale_factor=8, mode="nearest")

    def predict_eps(self, x_t, t, context, control=None):
        return torch.zeros_like(x_t)


HOST = ShapeOnlyHost()


@settings(max_examples=150, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), scale=st.sampled_from([1, 2, 4, 8]),
       color_fix=st.sampled_from(["adain", "wavelet", "none"]))
def test_output_is_exactly_scale_times_input_or_a_clear_error(h, w, scale, color_fix):
    image = torch.rand(1, 3, h, w)
    sh, sw = h * scale, w * scale
    try:
        out = upscale_osediff(HOST, HOST, image, torch.zeros(1, 77, 8), scale=scale, color_fix=color_fix)
    except InputImageError as e:
        assert min(sh, sw) < MIN_SIDE, f"refused {w}×{h} ×{scale}: {e}"
        assert f"at least {MIN_SIDE} px" in str(e)
        return
    except SizeLimitError as e:
        assert sh * sw > MAX_UNTILED_OUTPUT_PIXELS, f"refused {w}×{h} ×{scale}: {e}"
        return
    assert min(sh, sw) >= MIN_SIDE and sh * sw <= MAX_UNTILED_OUTPUT_PIXELS
    assert out.shape == (1, 3, sh, sw)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@settings(max_examples=40, deadline=None)
@given(h=st.integers(8, 60), w=st.integers(8, 60), scale=st.floats(1.0, 8.0))
def test_fractional_scales_round_to_the_nearest_pixel(h, w, scale):
    out = upscale_osediff(HOST, HOST, torch.rand(2, 3, h, w), torch.zeros(1, 77, 8), scale=scale, color_fix="none")
    assert out.shape == (2, 3, max(1, round(h * scale)), max(1, round(w * scale)))
