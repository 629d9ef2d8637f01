"""Color fixes against their definitions."""
import torch

from sr_core.color import adain, apply_color_fix, wavelet, wavelet_split


def _images(seed=0, shape=(2, 3, 40, 56)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


def test_adain_gives_reference_channel_statistics():
    img = _images(0) * 0.5 + 0.1  # darker, lower contrast: stays inside [0,1] after the fix
    ref = _images(1) * 0.6 + 0.2
    out = adain(img, ref)
    torch.testing.assert_close(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), ref.std(dim=(2, 3)), atol=1e-3, rtol=0)
    # the structure of the image is kept: per-channel affine map of the input
    flat_in, flat_out = img[0, 0].flatten(), out[0, 0].flatten()
    corr = torch.corrcoef(torch.stack([flat_in, flat_out]))[0, 1]
    assert corr > 0.9999


def test_wavelet_split_is_exact_and_low_band_is_smooth():
    x = _images(2)
    high, low = wavelet_split(x)
    torch.testing.assert_close(high + low, x, atol=1e-6, rtol=0)
    # 5 levels of blur remove nearly all pixel-to-pixel variation
    assert low.diff(dim=-1).abs().mean() < 0.1 * x.diff(dim=-1).abs().mean()


def test_wavelet_keeps_reference_low_band_and_image_high_band():
    img = _images(3) * 0.5 + 0.25
    ref = torch.full_like(img, 0.5) + 0.2 * torch.linspace(-1, 1, img.shape[-1])  # smooth gradient
    out = wavelet(img, ref)
    high_img, low_img = wavelet_split(img)
    _, low_ref = wavelet_split(ref)
    # by construction: the image's detail bands on the reference's base
    torch.testing.assert_close(out, (high_img + low_ref).clamp(0, 1))
    # and so, measured again, the result's low band is the reference's, not the image's
    _, low_out = wavelet_split(out)
    assert (low_out - low_ref).abs().mean() < 0.25 * (low_img - low_ref).abs().mean()


def test_none_only_clamps_and_unknown_method_is_refused():
    x = _images(4) * 1.4 - 0.2
    torch.testing.assert_close(apply_color_fix(x, x, "none"), x.clamp(0, 1))
    try:
        apply_color_fix(x, x, "hist")
    except ValueError as e:
        assert "hist" in str(e)
    else:
        raise AssertionError("unknown color fix accepted")
