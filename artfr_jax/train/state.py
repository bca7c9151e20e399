"""Train state and its sharded construction.

The state is built the big_vision / flax lm1b way: shapes come from ``jax.eval_shape`` of the init
function, shardings from the fsdp rule, and a jitted init with ``out_shardings`` materialises every
array directly on its devices (nothing full-size ever sits on the host).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from artfr_jax.train import sharding as sharding_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """step, trainable params, optimizer state and (optionally) an EMA of the params.

    ``params`` is a dict of named parameter trees (e.g. ``{'generator': ..., 'discriminator': ...}``);
    one optax transform (usually an ``optax.multi_transform``) updates all of them.
    ``ema_params`` is ``None`` when EMA is off; ``extras`` is ``None`` unless a stage keeps other
    state (it is checkpointed with the rest and left alone by ``apply_gradients``).
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree = None
    extras: PyTree = None  # non-trained state a stage carries (e.g. a k-means reservoir)

    def apply_gradients(self, grads, tx: optax.GradientTransformation, ema_decay: float = 0.0):
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        ema = self.ema_params
        if ema is not None:
            ema = jax.tree.map(lambda e, p: e * ema_decay + (1.0 - ema_decay) * p, ema, params)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def ema_subset(params: PyTree, ema_keys: tuple[str, ...]) -> PyTree:
    return {k: params[k] for k in ema_keys}


def create_train_state(
    init_params: Callable[[jax.Array], PyTree],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    *,
    ema_keys: tuple[str, ...] = (),
    min_shard_size: int = 2**14,
    init_extras: Callable[[], PyTree] | None = None,
) -> tuple[TrainState, PyTree]:
    """Returns (state, state_shardings) with every leaf created on its devices.

    ``ema_keys`` names the entries of ``params`` that get an EMA copy (empty: no EMA);
    ``init_extras()`` builds ``state.extras``.
    """

    def init(rng):
        params = init_params(rng)
        ema = jax.tree.map(jnp.copy, ema_subset(params, ema_keys)) if ema_keys else None
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=ema,
            extras=init_extras() if init_extras is not None else None,
        )

    abstract = jax.eval_shape(init, rng)
    shardings = sharding_lib.state_shardings(abstract, mesh, min_shard_size)
    with _mesh_context(mesh):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def _mesh_context(mesh: Mesh):
    """``jax.set_mesh(mesh)``, or nothing when ``mesh`` is already set: ``set_mesh`` is refused
    inside a trace, and an ahead-of-time compilation traces ``init_state`` with ``jax.eval_shape``
    under the mesh (``benchmarks/aot_compile.py``: its devices cannot run the init)."""
    if jax.sharding.get_abstract_mesh() == mesh.abstract_mesh:
        return contextlib.nullcontext()
    return jax.set_mesh(mesh)


def host_copy(tree: PyTree) -> PyTree:
    """NumPy copies of concrete arrays (fresh buffers that reach the devices of every process
    through ``jax.device_put``); traced values (``jax.eval_shape`` of an init, ahead-of-time
    compilation) pass through unchanged."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.core.Tracer) else np.array(x), tree)


def abstract_with_shardings(state_shardings: PyTree, state: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying shardings, the target orbax restores into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
    )


def tree_norm(tree: PyTree) -> jax.Array:
    return optax.global_norm(tree)
