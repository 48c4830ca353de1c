"""Unconditional diffusers ``UNet2DModel`` for DDPM (Ho et al., "Denoising Diffusion
Probabilistic Models", NeurIPS 2020).

diffusers is imported lazily so that ``import fl_sim.models`` stays cheap. The classic
``AttnProcessor`` replaces the default SDPA processor: on CPU the fused SDPA kernel has no
double-backward, which gradient-matching attacks need (see FACTS.md).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from fl_sim.registry import MODELS

_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.7 M params; attention at the lower-resolution level only.
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=8, attention_head_dim=8),
    # DDPM CIFAR-10 layout (Ho et al. 2020, ~36 M params): attention at the 16×16 level.
    "cifar": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=32, attention_head_dim=None, dropout=0.1),
}


@MODELS.register("unet")
def unet(in_channels: int, num_classes: int, image_size: int, *,
         preset: Literal["tiny", "cifar"] = "tiny",
         config: dict[str, Any] | None = None) -> nn.Module:
    """diffusers ``UNet2DModel`` (unconditional; ``num_classes`` is ignored).

    Input ``sample`` [B, C, H, W] in [-1, 1] and ``timestep`` [B] -> ``.sample`` [B, C, H, W]
    (predicted noise). ``image_size`` must be divisible by 2**(levels - 1) (tiny: 2,
    cifar: 8); raises ``ValueError`` otherwise. ``config``: a whole ``UNet2DModel`` config
    (as its ``config.json``) that replaces the preset -- filled from ``model.pretrained`` when
    no preset is given, so a published checkpoint's exact architecture is built; its
    ``sample_size`` / ``in_channels`` must be the data's (``ValueError`` otherwise).
    """
    from diffusers import UNet2DModel  # lazy: keeps diffusers out of this module's import

    if config is not None:
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        size = cfg.get("sample_size")
        size = size if isinstance(size, int) or size is None else size[0]
        if (cfg.get("in_channels"), size) != (in_channels, image_size):
            raise ValueError(f"unet config makes {cfg.get('in_channels')}x{size}x{size} "
                             f"images; the data has {in_channels}x{image_size}x{image_size}")
        return use_classic_attention(UNet2DModel.from_config(cfg))
    cfg = dict(_PRESETS[preset])
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if image_size % factor:
        raise ValueError(f"unet preset {preset!r} needs image_size divisible by {factor}, "
                         f"got {image_size}")
    model = UNet2DModel(sample_size=image_size, in_channels=in_channels,
                        out_channels=in_channels, **cfg)
    return use_classic_attention(model)


def use_classic_attention(model: nn.Module) -> nn.Module:
    """Give every diffusers ``Attention`` of ``model`` the classic ``AttnProcessor`` (in place;
    returns ``model``): the fused SDPA kernel has no double backward on CPU."""
    # lazy: keeps diffusers out of this module's import
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    return model
