from .unet_edm2 import EDM2UNet2DModel, EDM2UNet2DOutput

__all__ = ["EDM2UNet2DModel", "EDM2UNet2DOutput"]
