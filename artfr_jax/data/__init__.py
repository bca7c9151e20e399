"""Data: HQ sources (synthetic faces, image folder, TFDS), Eq. 8 degradations, grain pipeline."""

from artfr_jax.data.degradations import (
    DegradationParams,
    apply_degradation,
    degradation_preset,
    random_degrade,
    sample_degradation,
)
from artfr_jax.data.pipeline import (
    default_config,
    make_eval_batches,
    make_train_dataset,
    make_train_iterator,
)
from artfr_jax.data.sources import load_image
from artfr_jax.data.synthetic import render_face

__all__ = [
    "DegradationParams",
    "apply_degradation",
    "default_config",
    "degradation_preset",
    "load_image",
    "make_eval_batches",
    "make_train_dataset",
    "make_train_iterator",
    "random_degrade",
    "render_face",
    "sample_degradation",
]
