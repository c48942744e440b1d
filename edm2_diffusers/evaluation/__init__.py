"""Evaluation: FID with a pluggable feature extractor, the offline digits metric, the linear probe, the EMA sweep."""

from .digits import (
    DigitsClassifier,
    DigitsFeatureExtractor,
    digits_feature_extractor,
    digits_metrics,
    digits_reference_stats,
    load_digits_split,
)
from .evaluate import (
    EvaluationOutput,
    compute_reference_stats,
    dataset_image_batches,
    evaluate_pipeline,
    reference_stats,
)
from .extractors import InceptionFeatureExtractor, extractor_name, get_feature_extractor
from .fid import FeatureFrechetDistance, FeatureStats, frechet_distance, frechet_distance_from_stats
from .generation import FeatureCache, iter_generated_features, seed_ranges

__all__ = [
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "EvaluationOutput",
    "FeatureCache",
    "FeatureFrechetDistance",
    "FeatureStats",
    "InceptionFeatureExtractor",
    "compute_reference_stats",
    "dataset_image_batches",
    "digits_feature_extractor",
    "digits_metrics",
    "digits_reference_stats",
    "evaluate_pipeline",
    "extractor_name",
    "frechet_distance",
    "frechet_distance_from_stats",
    "get_feature_extractor",
    "iter_generated_features",
    "load_digits_split",
    "reference_stats",
    "seed_ranges",
]
