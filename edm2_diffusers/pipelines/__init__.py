from .pipeline_edm2 import (
    LATENT_FINAL_STD,
    SD_VAE_LATENT_MEAN,
    SD_VAE_LATENT_STD,
    EDM2Pipeline,
    encode_latents,
    standardize_latents,
    unstandardize_latents,
)

__all__ = [
    "EDM2Pipeline",
    "LATENT_FINAL_STD",
    "SD_VAE_LATENT_MEAN",
    "SD_VAE_LATENT_STD",
    "encode_latents",
    "standardize_latents",
    "unstandardize_latents",
]
