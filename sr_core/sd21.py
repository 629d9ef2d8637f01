"""Facts of the Stable Diffusion 2.1-base model (512 px, epsilon prediction).

Everything here is plain data, so the module imports nothing and can be read by any
host. The dicts are keyword arguments of the diffusers / transformers classes that
implement the same networks:

- ``UNET_CONFIG``: ``diffusers.UNet2DConditionModel(**UNET_CONFIG)``
- ``VAE_CONFIG``: ``diffusers.AutoencoderKL(**VAE_CONFIG)``
- ``TEXT_ENCODER_CONFIG``: ``transformers.CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))``

Copy a dict before changing it (``dict(UNET_CONFIG, ...)``); the module-level values
are shared.
"""
from __future__ import annotations

#: diffusers ``UNet2DConditionModel`` kwargs of SD 2.1-base (865 M parameters, 686
#: state-dict tensors). Note the diffusers naming quirk: for SD 2.x
#: ``attention_head_dim`` holds the number of heads per block (channels // 64), not
#: the head width; the head width is 64 everywhere.
UNET_CONFIG: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1,
    "attention_head_dim": [5, 10, 20, 20],
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "upcast_attention": False,
}

#: diffusers ``AutoencoderKL`` kwargs of the SD 2.1 VAE (8x downsampling, 4 latent
#: channels, 248 state-dict tensors). The encoder produces mean and log-variance
#: (8 channels) which ``quant_conv`` mixes before the posterior is split.
VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

#: transformers ``CLIPTextConfig`` kwargs of SD 2.x's text encoder: the OpenCLIP
#: ViT-H/14 text tower (24 blocks in the original) stored with only its first 23
#: blocks, so that ``last_hidden_state`` (after ``final_layer_norm``) is the
#: "penultimate layer + final LayerNorm" conditioning SD 2.x was trained on.
#: Token ids are the real ones of the SD 2 tokenizer (start 49406, end 49407, pad 0 =
#: "!", as ComfyUI's SD2 tokenizer uses); they only choose the pooled token and do not
#: affect ``last_hidden_state``. ``projection_dim`` is unused by ``CLIPTextModel``
#: (it has no projection head); 512 is the value of the published diffusers config.
TEXT_ENCODER_CONFIG: dict = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 512,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 0,
}

#: Number of transformer blocks of the original OpenCLIP ViT-H text tower, as stored
#: in single-file checkpoints (``cond_stage_model.model.transformer.resblocks.0-23``).
OPENCLIP_TEXT_BLOCKS: int = 24

#: Factor between the raw VAE latent and the latent the UNet works on.
LATENT_SCALE: float = 0.18215

#: First beta of the "scaled_linear" training schedule (betas = linspace(sqrt(b0),
#: sqrt(b1), N) ** 2).
BETA_START: float = 0.00085

#: Last beta of the "scaled_linear" training schedule.
BETA_END: float = 0.012

#: Number of diffusion timesteps the model was trained with (t = 0 .. 999).
NUM_TRAIN_TIMESTEPS: int = 1000

#: Width of one attention head in SD 2.x (heads = channels // 64).
ATTENTION_HEAD_WIDTH: int = 64
