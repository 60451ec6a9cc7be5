"""Architectures of the embedded mini Stable-Diffusion model (32x32 RGB -> 8x8x4 latents), as frozen dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MiniSDArch:
    image_size: int = 32
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 blocks -> /4 downsampling
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def vae_kwargs(self) -> dict:
        n = len(self.vae_channels)
        return dict(
            in_channels=3, out_channels=3, latent_channels=self.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.vae_channels, layers_per_block=1, norm_num_groups=16,
            sample_size=self.image_size, mid_block_add_attention=False,
        )

    def unet_kwargs(self) -> dict:
        return dict(
            sample_size=self.latent_size, in_channels=self.latent_channels, out_channels=self.latent_channels,
            block_out_channels=self.unet_channels, layers_per_block=self.unet_layers_per_block,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=self.text_hidden, attention_head_dim=self.attention_head_dim, norm_num_groups=32,
        )

    def text_kwargs(self) -> dict:
        return dict(
            hidden_size=self.text_hidden, intermediate_size=self.text_hidden * 4,
            num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
            max_position_embeddings=self.max_tokens,
        )

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TinyArch(MiniSDArch):
    """Random tiny model for tests: same structure, a fraction of the width."""

    vae_channels: tuple[int, ...] = (8, 16, 16)
    text_hidden: int = 16
    text_layers: int = 1
    text_heads: int = 2
    unet_channels: tuple[int, ...] = (32, 32, 32)
    attention_head_dim: int = 4

    def vae_kwargs(self) -> dict:
        return {**super().vae_kwargs(), "norm_num_groups": 8}

    def unet_kwargs(self) -> dict:
        return {**super().unet_kwargs(), "norm_num_groups": 8}


# The noise schedule of Stable Diffusion (epsilon prediction, 1000 training steps).
SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    timestep_spacing="trailing",
)
