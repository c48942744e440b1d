"""Dataset readers shared by training, evaluation and latent encoding: Hub datasets, image folders, the scikit-learn
digits, latent datasets of VAE posterior moments, and the torch datasets that turn their rows into tensors."""

from .latents import (
    LABEL_COLUMN,
    LATENT_INFO_KEY,
    LATENTS_COLUMN,
    LatentStatistics,
    build_latent_dataset,
    center_crop,
    encode_images,
    images_to_tensor,
    load_latent_dataset,
    read_latent_info,
    save_latent_dataset,
)
from .sources import (
    check_dataset,
    dataset_columns,
    is_saved_dataset,
    load_digits_dataset,
    load_train_dataset,
    resolve_source,
)
from .tensors import EDM2ImageDataset, EDM2LatentDataset, build_image_dataset, image_to_array, random_flip

__all__ = [
    "EDM2ImageDataset",
    "EDM2LatentDataset",
    "LABEL_COLUMN",
    "LATENTS_COLUMN",
    "LATENT_INFO_KEY",
    "LatentStatistics",
    "build_image_dataset",
    "build_latent_dataset",
    "center_crop",
    "check_dataset",
    "dataset_columns",
    "encode_images",
    "image_to_array",
    "images_to_tensor",
    "is_saved_dataset",
    "load_digits_dataset",
    "load_latent_dataset",
    "load_train_dataset",
    "random_flip",
    "read_latent_info",
    "resolve_source",
    "save_latent_dataset",
]
