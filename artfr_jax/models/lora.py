"""Low-rank adaptation (LoRA, Hu et al. 2021) for any linen model, without changing its code.

LoRA (Hu et al. 2021, Eq. 3) adds a trainable low-rank update to a frozen weight ``W0``:
``h = W0 x + (alpha / r) B A x`` with ``A`` mapping the input to ``r`` channels and ``B`` mapping
them to the output, ``B`` initialised to zero so that training starts from the base model.

Here the LoRA parameters live in their own variable collection ``'lora'`` whose tree mirrors the
module paths of the targeted layers, with leaves ``lora_A`` and ``lora_B``::

  params: {'mid': {'attn': {'to_q': {'kernel': [C, C]}}}}
  lora:   {'mid': {'attn': {'to_q': {'lora_A': [C, r], 'lora_B': [r, C]}}}}

:func:`active` intercepts the ``__call__`` of every ``nn.Dense`` and ``nn.Conv`` (through
``flax.linen.intercept_methods``) and, where the module has a ``'lora'`` variable, adds
``scale * B(A(x))`` to its output. Works under ``jax.jit``, ``jax.grad`` and ``nn.remat``; a model
using ``nn.scan``/``nn.vmap`` must name the ``'lora'`` collection in the lifted transform's
variable axes, as it does ``'params'``.

Layouts (PEFT's, in flax order): a Dense ``kernel [in, out]`` gets ``lora_A [in, r]`` and
``lora_B [r, out]``; a Conv ``kernel [kh, kw, in, out]`` gets ``lora_A [kh, kw, in, r]``, a conv
with the layer's kernel size, strides, padding and dilation, and ``lora_B [1, 1, r, out]``, a 1x1
conv. (PEFT builds ``A`` without the layer's dilation; for dilated convs only this choice makes
the merged and unmerged forms agree.)

Training the LoRA alone (the base parameters frozen)::

  config = lora.LoraConfig(rank=16, alpha=16, target_modules=("to_q", "to_k", "to_v", "to_out.0"))
  lora_params = lora.init(rng, params, config)
  tx = optax.adam(1e-4)
  opt_state = tx.init(lora_params)  # holds LoRA-shaped leaves only

  def loss_fn(lora_params, params, batch):  # params: an argument, never differentiated
      y = lora.apply(model, {"params": params, "lora": lora_params}, batch["x"], scale=config.scale)
      return jnp.mean((y - batch["y"]) ** 2)

  grads = jax.grad(loss_fn)(lora_params, params, batch)
  updates, opt_state = tx.update(grads, opt_state, lora_params)
  lora_params = optax.apply_updates(lora_params, updates)

When other small modules train with the LoRA (OSDFace: the UNet LoRA plus a prompt projection),
put them into one trainable tree, ``{'lora': lora_params, 'prompt': prompt_params}``, and
differentiate and optimise that tree; the base parameters stay a frozen argument. For inference,
:func:`merge` folds ``scale * A B`` into the kernels and the model runs without any LoRA code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from artfr_jax.models import naming

Path = tuple[str, ...]
COLLECTION = "lora"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha and target modules of a LoRA (Hu et al. 2021, Eq. 3: ``scale = alpha / r``).

    ``target_modules`` has PEFT's semantics over the modules' dotted names
    (:func:`naming.torch_name`, e.g. ``'down_blocks.0.attentions.0.proj_in'``): a ``str`` is a
    regular expression that must match the whole name (``re.fullmatch``); a sequence of names
    matches a module whose name equals an entry or ends with ``'.' + entry``.
    """

    rank: int
    alpha: float
    target_modules: str | tuple[str, ...]

    def __post_init__(self):
        if not isinstance(self.rank, numbers.Integral) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank!r}: expected a positive int")
        object.__setattr__(self, "rank", int(self.rank))
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha={self.alpha!r}: expected a positive number")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ValueError("LoraConfig.target_modules: empty")

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of ``B A x`` in Eq. 3."""
        return self.alpha / self.rank


def matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """Whether the dotted module ``name`` is a target (PEFT semantics, see :class:`LoraConfig`)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def module_kernels(params: Mapping[str, Any]) -> dict[Path, Any]:
    """Module path -> kernel of every module holding a 2-D (Dense) or 4-D (Conv) ``kernel``:
    the modules a LoRA may target."""
    flat = traverse_util.flatten_dict(params)
    return {
        path[:-1]: leaf
        for path, leaf in flat.items()
        if path[-1] == "kernel" and len(leaf.shape) in (2, 4)
    }


def target_paths(params: Mapping[str, Any], config: LoraConfig) -> list[Path]:
    """Paths of the Dense/Conv modules of ``params`` that ``config.target_modules`` selects.

    Raises ValueError, naming the patterns, when nothing matches.
    """
    kernels = module_kernels(params)
    paths = [p for p in kernels if matches(naming.torch_name(p), config.target_modules)]
    if not paths:
        names = sorted(naming.torch_name(p) for p in kernels)
        examples = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(
            f"LoRA target_modules={config.target_modules!r} matched none of the {len(names)} "
            f"Dense/Conv modules ({examples})"
        )
    return paths


def lora_shapes(kernel_shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(A, B)`` shapes for a kernel: Dense ``[in, out]`` -> ``[in, r], [r, out]``; Conv
    ``[kh, kw, in, out]`` -> ``[kh, kw, in, r], [1, 1, r, out]``."""
    *window_in, out = kernel_shape
    ones = (1,) * (len(kernel_shape) - 2)
    return (*window_in, rank), (*ones, rank, out)


def _unflatten(flat: Mapping[Path, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat))


def init(rng: jax.Array, params: Mapping[str, Any], config: LoraConfig) -> dict:
    """A float32 LoRA tree for the targets of ``params``: ``A`` as PEFT (PyTorch's default layer
    init ``kaiming_uniform_(a=sqrt(5))``: ``U(+-1/sqrt(fan_in))``, fan_in = all axes but the
    last), ``B = 0``, so the adapted model starts equal to the base one (Hu et al. 2021, Sec. 4.1).

    ``params`` may be abstract (``jax.ShapeDtypeStruct`` leaves): only shapes are read.
    """
    kernels = module_kernels(params)
    paths = target_paths(params, config)
    shapes = tuple(lora_shapes(kernels[p].shape, config.rank) for p in paths)
    factors = _init_factors(rng, shapes)
    flat = {}
    for path, (a, b) in zip(paths, factors, strict=True):
        flat[(*path, "lora_A")], flat[(*path, "lora_B")] = a, b
    return _unflatten(flat)


@functools.partial(jax.jit, static_argnums=1)
def _init_factors(rng: jax.Array, shapes: tuple) -> list[tuple[jax.Array, jax.Array]]:
    # One uniform draw for all modules, cut into the A factors: one small program (a draw per
    # module compiles one random-bits computation per module).
    sizes = [math.prod(a) for a, _ in shapes]
    u = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out, start = [], 0
    for (a, b), n in zip(shapes, sizes, strict=True):
        bound = 1.0 / math.sqrt(math.prod(a[:-1]))  # kaiming_uniform(a=sqrt(5)), fan_in
        out.append((u[start : start + n].reshape(a) * bound, jnp.zeros(b, jnp.float32)))
        start += n
    return out


def module_paths(lora: Mapping[str, Any]) -> list[Path]:
    """The module paths of a LoRA tree (each holds ``lora_A`` and ``lora_B``)."""
    flat = traverse_util.flatten_dict(lora)
    paths = [p[:-1] for p in flat if p[-1] == "lora_A"]
    for p in paths:
        if (*p, "lora_B") not in flat:
            raise ValueError(f"LoRA tree: {naming.torch_name(p)} has lora_A but no lora_B")
    if len(paths) * 2 != len(flat):
        extra = sorted(".".join(p) for p in flat if p[-1] not in ("lora_A", "lora_B"))
        raise ValueError(f"LoRA tree: leaves other than lora_A/lora_B or unpaired: {extra[:3]}")
    return paths


# ----------------------------------------------------------------------------- the forward pass


def _matmul(h: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    """``h [..., k] @ w [k, n]`` (a 1x1 conv) with ``precision``."""
    return jax.lax.dot_general(h, w, (((h.ndim - 1,), (0,)), ((), ())), precision=precision)


def _check_shapes(m: nn.Module, a: jax.Array, b: jax.Array) -> None:
    kernel = m.get_variable("params", "kernel")
    name = naming.torch_name(tuple(m.scope.path))
    if kernel is None:
        raise ValueError(f"LoRA on {name}: the module has no 'kernel' parameter")
    want = lora_shapes(kernel.shape, a.shape[-1])
    if (a.shape, b.shape) != want:
        raise ValueError(
            f"LoRA on {name}: lora_A {a.shape} / lora_B {b.shape} do not fit kernel "
            f"{kernel.shape}; expected {want[0]} / {want[1]}"
        )


def _lora_branch(m: nn.Module, x: jax.Array) -> jax.Array:
    """``B(A(x))`` of module ``m`` in the layer's compute dtype, before the scale.

    Dense: ``x [..., in] -> [..., out]``; Conv: ``x [B, H, W, in] -> [B, H', W', out]`` with ``A``
    computed by a copy of the layer with ``r`` output channels (its padding, strides, dilation,
    precision, dtype and ``conv_general_dilated``, hence the framework's kernel switch).
    """
    a = m.get_variable(COLLECTION, "lora_A")
    b = m.get_variable(COLLECTION, "lora_B")
    _check_shapes(m, a, b)
    rank = a.shape[-1]
    if isinstance(m, nn.Conv):
        name = naming.torch_name(tuple(m.scope.path))
        if m.feature_group_count != 1:
            raise ValueError(
                f"LoRA on {name}: grouped convolutions (feature_group_count="
                f"{m.feature_group_count}) are not supported"
            )
        if m.mask is not None:
            raise ValueError(f"LoRA on {name}: masked convolutions are not supported")
        down = m.clone(parent=None, name=None, features=rank, use_bias=False)
        h = down.apply({"params": {"kernel": a}}, x)
        h, b2 = nn.dtypes.promote_dtype(h, b.reshape(rank, -1), dtype=m.dtype)
        return _matmul(h, b2, m.precision)
    down = m.clone(parent=None, name=None, features=rank, use_bias=False)
    up = m.clone(parent=None, name=None, features=b.shape[-1], use_bias=False)
    return up.apply({"params": {"kernel": b}}, down.apply({"params": {"kernel": a}}, x))


def _interceptor(scale):
    def intercept(next_fun, args, kwargs, ctx):
        m = ctx.module
        y = next_fun(*args, **kwargs)
        if m.scope is None or not m.has_variable(COLLECTION, "lora_A"):
            return y
        if not isinstance(m, nn.Dense | nn.Conv):
            raise TypeError(
                f"LoRA on {naming.torch_name(tuple(m.scope.path))}: {type(m).__name__} is not "
                "supported (only nn.Dense and nn.Conv)"
            )
        if ctx.method_name != "__call__":  # a lifted transform's wrapper around the call
            return y
        delta = _lora_branch(m, args[0] if args else kwargs["inputs"])
        return y + (scale * delta).astype(y.dtype)

    return intercept


@contextlib.contextmanager
def active(scale: float | jax.Array) -> Iterator[None]:
    """Within this context, ``model.apply({'params': ..., 'lora': lora, ...}, ...)`` adds
    ``scale * B A x`` to every ``nn.Dense``/``nn.Conv`` that has ``'lora'`` variables
    (Hu et al. 2021, Eq. 3). ``scale`` may be a traced value."""
    with nn.intercept_methods(_interceptor(scale)):
        yield


def apply(
    model: nn.Module, variables: Mapping[str, Any], *args, scale: float | jax.Array, **kwargs
) -> Any:
    """``model.apply(variables, *args, **kwargs)`` with the LoRA of ``variables['lora']``.

    ``kwargs`` go to ``model.apply`` (``method``, ``rngs``, ``mutable``, the model's own).
    """
    if COLLECTION not in variables:
        raise ValueError(f"lora.apply: variables has no {COLLECTION!r} collection")
    with active(scale):
        return model.apply(variables, *args, **kwargs)


# --------------------------------------------------------------------------- merging the weights


def delta(lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
    """``A B`` in the kernel's layout, float32: Dense ``[in, r] x [r, out] -> [in, out]``; Conv
    ``[kh, kw, in, r] x [1, 1, r, out] -> [kh, kw, in, out]`` (a sum over ``r``)."""
    rank = lora_a.shape[-1]
    a = lora_a.astype(jnp.float32)
    b = lora_b.astype(jnp.float32).reshape(rank, lora_b.shape[-1])
    return jnp.einsum("...r,ro->...o", a, b, precision=jax.lax.Precision.HIGHEST)


def _add_deltas(params: Mapping[str, Any], lora: Mapping[str, Any], factor) -> Any:
    flat = traverse_util.flatten_dict(params)
    lora_flat = traverse_util.flatten_dict(lora)
    paths = module_paths(lora)
    for path in paths:
        key = (*path, "kernel")
        if key not in flat:
            raise ValueError(f"LoRA merge: no kernel at {naming.torch_name(path)} in params")
        a, b = lora_flat[(*path, "lora_A")], lora_flat[(*path, "lora_B")]
        if lora_shapes(flat[key].shape, a.shape[-1]) != (a.shape, b.shape):
            raise ValueError(
                f"LoRA merge: {naming.torch_name(path)}: lora_A {a.shape} / lora_B {b.shape} do "
                f"not fit kernel {flat[key].shape}"
            )
    kernels = [flat[(*p, "kernel")] for p in paths]
    factors = [(lora_flat[(*p, "lora_A")], lora_flat[(*p, "lora_B")]) for p in paths]
    for path, kernel in zip(paths, _fold(kernels, factors, factor), strict=True):
        flat[(*path, "kernel")] = kernel
    out = traverse_util.unflatten_dict(flat)
    return type(params)(out) if not isinstance(params, dict) else out


@jax.jit
def _fold(kernels: list, factors: list, factor) -> list:
    # One program for all modules; ``W + factor * A B`` in float32, back in the kernel's dtype.
    return [
        (w.astype(jnp.float32) + factor * delta(a, b)).astype(w.dtype)
        for w, (a, b) in zip(kernels, factors, strict=True)
    ]


def merge(params: Mapping[str, Any], lora: Mapping[str, Any], scale: float | jax.Array) -> Any:
    """Params with ``W0 + scale * A B`` (Hu et al. 2021, Sec. 4.1: "no additional inference
    latency") for every LoRA module; the others are passed through unchanged."""
    return _add_deltas(params, lora, scale)


def unmerge(params: Mapping[str, Any], lora: Mapping[str, Any], scale: float | jax.Array) -> Any:
    """Inverse of :func:`merge`: ``W - scale * A B`` (up to float rounding)."""
    return _add_deltas(params, lora, -scale)
