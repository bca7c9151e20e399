"""Iterative parallel decoding of masked visual tokens (ART-FR Sec. 3.3, MaskGIT Sec. 3.2).

Decoding starts from all-[MASK] tokens (or partially revealed ``init_tokens``). Each of the T steps
predicts every position at once, samples a token per position, scores it by the model's probability
of that token, and keeps the ``floor(gamma((t+1)/T) N)`` least confident of the still-masked
positions masked; the rest are revealed for good. After the last step nothing is masked.

``logits_fn(tokens int32 [B, N]) -> float [B, N, K]`` closes over the model parameters and the LQ
conditioning; masked positions hold ``mask_token_id`` (by convention K, one past the last code).

Randomness: step t uses ``jax.random.fold_in(rng, t)``, split into a sampling and a choice-noise
key, each folded with the row index, so row b's draws depend only on (rng, t, b), not on the batch.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from artfr_jax.sampling.mask_schedule import rank_along_last, schedule


@flax.struct.dataclass
class DecodeState:
    """Loop carry: tokens int32 [B, N] (``mask_token_id`` where masked), rng key, step int32 []."""

    tokens: jax.Array
    rng: jax.Array
    step: jax.Array


def masked_counts(seq_len: int, num_steps: int, kind: str = "cosine") -> np.ndarray:
    """Scheduled number of masked tokens after each step: int32 [T], ``floor(gamma((t+1)/T) N)``.

    Computed in float64 NumPy (static), clipped to [0, N]; the last entry is 0.
    """
    ratios = np.arange(1, num_steps + 1, dtype=np.float64) / num_steps
    counts = np.floor(schedule(ratios, kind) * seq_len)
    return np.clip(counts, 0, seq_len).astype(np.int32)


def _row_keys(key: jax.Array, batch_size: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(batch_size))


def init_state(rng, *, batch_size: int, seq_len: int, mask_token_id: int, init_tokens=None):
    """Initial ``DecodeState``: all [MASK], or ``init_tokens`` int32 [B, N] (revealed where != mask)."""
    if init_tokens is None:
        tokens = jnp.full((batch_size, seq_len), mask_token_id, dtype=jnp.int32)
    else:
        tokens = jnp.asarray(init_tokens)
        if tokens.shape != (batch_size, seq_len):
            raise ValueError(
                f"maskgit.decode: init_tokens must have shape (batch_size, seq_len) = "
                f"{(batch_size, seq_len)}, got {tokens.shape}"
            )
        tokens = tokens.astype(jnp.int32)
    return DecodeState(tokens=tokens, rng=rng, step=jnp.zeros((), jnp.int32))


def decode_step(
    logits_fn,
    state: DecodeState,
    *,
    mask_token_id: int,
    num_steps: int = 8,
    temperature: float = 0.0,
    choice_temperature: float = 0.0,
    schedule_kind: str = "cosine",
) -> DecodeState:
    """One decoding iteration t = ``state.step`` of T = ``num_steps`` (ART-FR Sec. 3.3).

    tokens [B, N] -> logits [B, N, K] -> sampled tokens (argmax if ``temperature`` == 0, else
    categorical on logits / temperature) -> confidence = log softmax(logits) of the sampled token
    (+ ``choice_temperature * (1 - (t+1)/T)`` * Gumbel noise, MaskGIT's annealed choice noise),
    +inf at revealed positions -> the ``min(floor(gamma((t+1)/T) N), masked - 1)`` (>= 0) least
    confident positions stay masked, the rest take their sampled tokens.
    """
    tokens = state.tokens
    batch_size, seq_len = tokens.shape
    logits = logits_fn(tokens)
    if logits.ndim != 3 or logits.shape[:2] != (batch_size, seq_len):
        raise ValueError(
            f"maskgit.decode_step: logits_fn must return [B, N, K] = "
            f"[{batch_size}, {seq_len}, K], got {logits.shape}"
        )
    if logits.shape[-1] > mask_token_id:
        # Otherwise sampling could emit the [MASK] id itself.
        raise ValueError(
            f"maskgit.decode_step: logits_fn returns K={logits.shape[-1]} codes but "
            f"mask_token_id={mask_token_id}; need K <= mask_token_id (convention: mask_token_id = K)"
        )
    logits = logits.astype(jnp.float32)
    step_key = jax.random.fold_in(state.rng, state.step)
    sample_key, choice_key = jax.random.split(step_key)

    if temperature == 0.0:
        sampled = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        sampled = jax.vmap(jax.random.categorical)(
            _row_keys(sample_key, batch_size), logits / temperature
        ).astype(jnp.int32)

    log_probs = jax.nn.log_softmax(logits, axis=-1)
    confidence = jnp.take_along_axis(log_probs, sampled[..., None], axis=-1)[..., 0]
    ratio = (state.step + 1).astype(jnp.float32) / num_steps
    if choice_temperature > 0.0:
        noise = jax.vmap(lambda k: jax.random.gumbel(k, (seq_len,)))(
            _row_keys(choice_key, batch_size)
        )
        confidence = confidence + choice_temperature * (1.0 - ratio) * noise
    # A NaN would sort after +inf and let a revealed position be re-masked.
    confidence = jnp.where(jnp.isnan(confidence), -jnp.inf, confidence)

    unknown = tokens == mask_token_id
    confidence = jnp.where(unknown, confidence, jnp.inf)
    sampled = jnp.where(unknown, sampled, tokens)

    scheduled = jnp.asarray(masked_counts(seq_len, num_steps, schedule_kind))[state.step]
    num_unknown = jnp.sum(unknown, axis=-1, dtype=jnp.int32)
    mask_len = jnp.maximum(jnp.minimum(scheduled, num_unknown - 1), 0)  # [B]
    still_masked = rank_along_last(confidence) < mask_len[:, None]
    new_tokens = jnp.where(still_masked, jnp.int32(mask_token_id), sampled)
    return DecodeState(tokens=new_tokens, rng=state.rng, step=state.step + 1)


def _check_args(num_steps, temperature, choice_temperature, schedule_kind):
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"maskgit.decode: num_steps must be a positive int, got {num_steps!r}")
    if temperature < 0 or choice_temperature < 0:
        raise ValueError(
            f"maskgit.decode: temperature and choice_temperature must be >= 0, got "
            f"{temperature!r}, {choice_temperature!r}"
        )
    schedule(0.0, schedule_kind)  # raises on an unknown kind


def decode(
    logits_fn,
    rng,
    *,
    batch_size: int,
    seq_len: int,
    mask_token_id: int,
    num_steps: int = 8,
    temperature: float = 0.0,
    choice_temperature: float = 0.0,
    schedule_kind: str = "cosine",
    init_tokens=None,
    return_history: bool = False,
) -> jax.Array:
    """T-step parallel decoding in one ``lax.scan`` (ART-FR Sec. 3.3): int32 [B, N] tokens.

    Pure and jittable, also with ``logits_fn`` closing over traced arrays. ``init_tokens`` int32
    [B, N]: positions != ``mask_token_id`` are revealed from the start and never change. With
    ``return_history`` the result is int32 [T, B, N], the tokens after each step (last = final).
    """
    _check_args(num_steps, temperature, choice_temperature, schedule_kind)
    state = init_state(
        rng,
        batch_size=batch_size,
        seq_len=seq_len,
        mask_token_id=mask_token_id,
        init_tokens=init_tokens,
    )
    step = functools.partial(
        decode_step,
        logits_fn,
        mask_token_id=mask_token_id,
        num_steps=num_steps,
        temperature=temperature,
        choice_temperature=choice_temperature,
        schedule_kind=schedule_kind,
    )

    def body(carry, _):
        carry = step(carry)
        return carry, (carry.tokens if return_history else None)

    state, history = jax.lax.scan(body, state, None, length=num_steps)
    return history if return_history else state.tokens


@functools.partial(
    jax.jit,
    static_argnames=(
        "mask_token_id",
        "num_steps",
        "temperature",
        "choice_temperature",
        "schedule_kind",
    ),
)
def _jitted_step(
    logits_fn, state, *, mask_token_id, num_steps, temperature, choice_temperature, schedule_kind
):
    return decode_step(
        logits_fn,
        state,
        mask_token_id=mask_token_id,
        num_steps=num_steps,
        temperature=temperature,
        choice_temperature=choice_temperature,
        schedule_kind=schedule_kind,
    )


def decode_python_loop(
    logits_fn,
    rng,
    *,
    batch_size: int,
    seq_len: int,
    mask_token_id: int,
    num_steps: int = 8,
    temperature: float = 0.0,
    choice_temperature: float = 0.0,
    schedule_kind: str = "cosine",
    init_tokens=None,
    return_history: bool = False,
) -> jax.Array:
    """Same arguments and result as ``decode``, but a Python loop over a jitted ``decode_step``.

    For benchmarking one compiled decode against T dispatches. The step is compiled once per
    ``logits_fn``: pass the same callable, or ``jax.tree_util.Partial(apply, params, ...)`` so the
    arrays it carries are runtime arguments rather than compile-time constants.
    """
    _check_args(num_steps, temperature, choice_temperature, schedule_kind)
    if not isinstance(logits_fn, jax.tree_util.Partial):
        logits_fn = jax.tree_util.Partial(logits_fn)
    state = init_state(
        rng,
        batch_size=batch_size,
        seq_len=seq_len,
        mask_token_id=mask_token_id,
        init_tokens=init_tokens,
    )
    history = []
    for _ in range(num_steps):
        state = _jitted_step(
            logits_fn,
            state,
            mask_token_id=mask_token_id,
            num_steps=num_steps,
            temperature=float(temperature),
            choice_temperature=float(choice_temperature),
            schedule_kind=schedule_kind,
        )
        if return_history:
            history.append(state.tokens)
    return jnp.stack(history) if return_history else state.tokens
