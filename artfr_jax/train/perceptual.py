"""LPIPS for the stages: the perceptual loss's frozen network (``config.loss``) and the eval metric
(``config.eval.lpips_weights``). Weights come from files written by ``convert.lpips_vgg``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from artfr_jax.losses import perceptual
from artfr_jax.models import factory
from artfr_jax.utils import images as image_utils

PERCEPTUAL_MODES = ("required", "if_available", "off")


def loss_lpips(config: ml_collections.ConfigDict) -> tuple[dict, perceptual.LPIPS | None]:
    """``({'lpips': params}, LPIPS module)`` when the perceptual loss is on, else ``({}, None)``;
    the module computes in ``config.model.dtype`` (the distance itself is float32).

    ``loss.perceptual``: 'required' (paper default: a missing file is an error), 'if_available'
    (used when ``loss.lpips_weights`` names a file, else the term is dropped) or 'off'.
    """
    mode = config.loss.perceptual
    if mode not in PERCEPTUAL_MODES:
        raise ValueError(f"config.loss.perceptual={mode!r}: expected one of {PERCEPTUAL_MODES}")
    path = config.loss.lpips_weights
    if mode == "off" or config.loss.perceptual_weight == 0 or (mode == "if_available" and not path):
        return {}, None
    if not path:
        raise FileNotFoundError(
            "config.loss.lpips_weights is empty but config.loss.perceptual='required': convert "
            "LPIPS weights with `python -m artfr_jax.convert.lpips_vgg --vgg16=vgg16-397923af.pth "
            "--output=lpips_vgg.msgpack` and pass --config.loss.lpips_weights=lpips_vgg.msgpack "
            "(or set --config.loss.perceptual=off)"
        )
    params = perceptual.load_lpips_params(path)
    dtype = factory.policy(config.model)["dtype"]
    return {"lpips": params}, perceptual.LPIPS(dtype=dtype, param_dtype=jnp.float32)


def eval_lpips_params(config: ml_collections.ConfigDict, frozen: dict) -> dict:
    """``{'eval_lpips': params}`` for eval-time LPIPS, or ``{}``.

    The file is ``config.eval.lpips_weights``, else the perceptual loss's ``loss.lpips_weights``
    (then the loss's already loaded ``frozen['lpips']`` is reused rather than loaded twice).
    """
    path = config.eval.get("lpips_weights", "")
    if not path:
        if "lpips" in frozen:
            return {}
        loss = config.get("loss")
        path = loss.get("lpips_weights", "") if loss is not None else ""
    if not path:
        return {}
    return {"eval_lpips": perceptual.load_lpips_params(path)}


def eval_lpips(frozen: dict, x_u8: jax.Array, y_u8: jax.Array) -> dict:
    """``{'lpips': [B]}`` between uint8 images (float32, as every metric) when eval LPIPS weights
    are loaded, else ``{}``."""
    params = frozen.get("eval_lpips", frozen.get("lpips"))
    if params is None:
        return {}
    x, y = image_utils.to_float_image(x_u8), image_utils.to_float_image(y_u8)
    return {"lpips": perceptual.lpips_distance(params, x, y)}
