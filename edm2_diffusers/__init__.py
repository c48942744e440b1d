"""edm2-diffusers: EDM2 diffusion models (Karras et al., CVPR 2024) for the Hugging Face stack."""

__version__ = "0.1.0"

from .models import EDM2UNet2DModel, EDM2UNet2DOutput
from .pipelines import EDM2Pipeline
from .schedulers import EDMHeunScheduler

# EDM2Pipeline.from_pretrained / save_pretrained / push_to_hub look this module up (see pipelines/pipeline_edm2.py).
from .hub import pipeline_io  # noqa: F401  isort: skip

__all__ = ["EDM2UNet2DModel", "EDM2UNet2DOutput", "EDM2Pipeline", "EDMHeunScheduler"]
