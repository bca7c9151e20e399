"""Mask schedules, training masks and MaskGIT iterative decoding (ART-FR Sec. 3.2-3.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.sampling import (
    decode,
    decode_python_loop,
    decode_step,
    init_state,
    masked_counts,
    num_masked_training,
    schedule,
    training_mask,
)

K = 12  # codebook size of the stub; [MASK] = K
MASK = K


def _gamma_np(r, kind):
    r = np.asarray(r, np.float64)
    return {"cosine": np.cos(np.pi / 2 * r), "linear": 1 - r, "square": 1 - r**2}[kind]


def _params(seq_len, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    table = jax.random.normal(k1, (seq_len, K))
    emb = jax.random.normal(k2, (K + 1, K))  # row K embeds [MASK]
    return table, emb


def _static_logits(params, tokens):
    table, _ = params
    return jnp.broadcast_to(table, (tokens.shape[0],) + table.shape)


def _dependent_logits(params, tokens):
    """Row-wise stub whose logits depend on the left neighbour and the row's mean token embedding."""
    table, emb = params
    e = emb[tokens]
    return table[None] + 2.0 * jnp.roll(e, 1, axis=1) + 1.0 * e.mean(axis=1, keepdims=True)


def _run(fn, params, key, *, batch_size, seq_len, jit=True, **kw):
    kw = dict(batch_size=batch_size, seq_len=seq_len, mask_token_id=MASK, **kw)
    if not jit:
        return decode(lambda t: fn(params, t), key, **kw)
    return jax.jit(lambda p, k: decode(lambda t: fn(p, t), k, **kw))(params, key)


def _expected_counts(init_masked, seq_len, num_steps, kind):
    """[T, B] masked counts: min(floor(gamma((t+1)/T) N), prev - 1), clipped at 0."""
    prev = np.asarray(init_masked)
    out = []
    for t in range(num_steps):
        sched = np.floor(_gamma_np((t + 1) / num_steps, kind) * seq_len)
        prev = np.maximum(np.minimum(sched, prev - 1), 0)
        out.append(prev)
    return np.stack(out).astype(np.int64)


# --- schedule ---------------------------------------------------------------------------------


def test_schedule_values_and_bad_kind():
    r = np.array([0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(schedule(r, "cosine"), np.cos(np.pi / 2 * r), atol=1e-15)
    np.testing.assert_allclose(schedule(r, "linear"), 1 - r)
    np.testing.assert_allclose(schedule(r, "square"), 1 - r**2)
    assert schedule(0.0) == 1.0 and abs(schedule(1.0)) < 1e-12
    out = schedule(jnp.asarray(r, jnp.float32), "cosine")
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(out, np.cos(np.pi / 2 * r), atol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        schedule(r, "exp")
    np.testing.assert_array_equal(masked_counts(16, 8), [15, 14, 13, 11, 8, 6, 3, 0])


# --- training masks ---------------------------------------------------------------------------


def test_training_mask_counts_match_numpy_and_mean_ratio():
    b, n = 16384, 256
    key = jax.random.key(3)
    mask = np.asarray(jax.jit(training_mask, static_argnums=(1, 2))(key, b, n))
    assert mask.shape == (b, n) and mask.dtype == bool
    counts = mask.sum(axis=1)

    count_key, _ = jax.random.split(key)
    np.testing.assert_array_equal(counts, num_masked_training(count_key, b, n))
    r = np.asarray(jax.random.uniform(count_key, (b,)), np.float64)
    v = np.cos(np.pi / 2 * r) * n
    expected = np.clip(np.ceil(v), 1, n)
    # float32 (jax) vs float64 (here) may round differently only right at an integer.
    at_boundary = np.abs(v - np.round(v)) < 1e-3
    assert at_boundary.mean() < 0.01
    np.testing.assert_array_equal(counts[~at_boundary], expected[~at_boundary])
    assert np.all(np.abs(counts - expected) <= 1)
    assert counts.min() >= 1 and counts.max() <= n

    # E[cos(pi/2 r)] = 2/pi; ceil adds about 1/(2N).
    assert abs(counts.mean() / n - 2 / np.pi) < 0.01
    # Positions are uniform: every column is masked about equally often.
    assert np.abs(mask.mean(axis=0) - counts.mean() / n).max() < 0.03


def test_training_mask_linear_kind_and_determinism():
    key = jax.random.key(5)
    a = training_mask(key, 4096, 64, "linear")
    np.testing.assert_array_equal(a, training_mask(key, 4096, 64, "linear"))
    assert not np.array_equal(a, training_mask(jax.random.key(6), 4096, 64, "linear"))
    assert abs(float(a.mean()) - 0.5) < 0.02
    assert int(a.sum(1).min()) >= 1


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq_len,num_steps,kind",
    [(16, 8, "cosine"), (256, 8, "cosine"), (16, 8, "linear"), (64, 5, "square")],
)
def test_masked_count_after_each_step(seq_len, num_steps, kind):
    hist = _run(
        _dependent_logits,
        _params(seq_len),
        jax.random.key(0),
        batch_size=3,
        seq_len=seq_len,
        num_steps=num_steps,
        temperature=1.0,
        choice_temperature=1.0,
        schedule_kind=kind,
        return_history=True,
    )
    assert hist.shape == (num_steps, 3, seq_len) and hist.dtype == jnp.int32
    sched = np.floor(_gamma_np(np.arange(1, num_steps + 1) / num_steps, kind) * seq_len)
    assert np.all(np.diff(np.concatenate([[seq_len], sched])) < 0)  # progress rule inactive here
    counts = np.asarray((hist == MASK).sum(-1))
    np.testing.assert_array_equal(counts, np.broadcast_to(sched[:, None], counts.shape))
    assert counts[-1].sum() == 0


def test_progress_rule_when_steps_exceed_tokens():
    seq_len, num_steps = 6, 20
    hist = _run(
        _dependent_logits,
        _params(seq_len),
        jax.random.key(1),
        batch_size=2,
        seq_len=seq_len,
        num_steps=num_steps,
        temperature=1.0,
        return_history=True,
    )
    counts = np.asarray((hist == MASK).sum(-1))
    expected = _expected_counts([seq_len] * 2, seq_len, num_steps, "cosine")
    np.testing.assert_array_equal(counts, expected)
    # At least one new token per step while any are masked; none masked at the end.
    prev = np.concatenate([np.full((1, 2), seq_len), counts[:-1]])
    assert np.all((counts <= prev - 1) | (prev == 0))
    assert counts[-1].sum() == 0


def test_revealed_tokens_never_change():
    seq_len, num_steps = 64, 8
    hist = np.asarray(
        _run(
            _dependent_logits,
            _params(seq_len),
            jax.random.key(2),
            batch_size=4,
            seq_len=seq_len,
            num_steps=num_steps,
            temperature=2.0,
            choice_temperature=4.5,
            return_history=True,
        )
    )
    assert hist.min() >= 0 and hist.max() <= MASK
    assert np.all(hist[-1] < K)  # sampling never emits [MASK]
    for t in range(1, num_steps):
        revealed = hist[t - 1] != MASK
        np.testing.assert_array_equal(hist[t][revealed], hist[t - 1][revealed])


def test_deterministic_for_a_key():
    params = _params(64)
    kw = dict(batch_size=4, seq_len=64, num_steps=8, temperature=1.0, choice_temperature=1.0)
    a = _run(_dependent_logits, params, jax.random.key(7), **kw)
    b = _run(_dependent_logits, params, jax.random.key(7), **kw)
    c = _run(_dependent_logits, params, jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Rows get independent draws.
    assert not np.array_equal(a[0], a[1])


def test_rows_do_not_depend_on_batch():
    params = _params(32)
    kw = dict(seq_len=32, num_steps=8, temperature=1.0, choice_temperature=2.0)
    big = _run(_dependent_logits, params, jax.random.key(9), batch_size=3, **kw)
    one = _run(_dependent_logits, params, jax.random.key(9), batch_size=1, **kw)
    np.testing.assert_array_equal(big[:1], one)


def test_temperature_zero_is_argmax_of_static_logits():
    seq_len = 32
    params = _params(seq_len)
    want = np.broadcast_to(np.argmax(np.asarray(params[0]), -1), (2, seq_len))
    for choice_temperature in (0.0, 3.0):
        got = _run(
            _static_logits,
            params,
            jax.random.key(0),
            batch_size=2,
            seq_len=seq_len,
            choice_temperature=choice_temperature,
        )
        np.testing.assert_array_equal(got, want)


def test_temperature_zero_reveals_argmax_of_most_confident():
    seq_len, num_steps, batch = 48, 8, 3
    params = _params(seq_len)
    hist = np.asarray(
        _run(
            _dependent_logits,
            params,
            jax.random.key(0),
            batch_size=batch,
            seq_len=seq_len,
            num_steps=num_steps,
            return_history=True,
        )
    )
    prev = np.full((batch, seq_len), MASK)
    for t in range(num_steps):
        logits = np.asarray(_dependent_logits(params, jnp.asarray(prev)), np.float64)
        arg = logits.argmax(-1)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        conf = np.take_along_axis(logp, arg[..., None], -1)[..., 0]
        new = (prev == MASK) & (hist[t] != MASK)
        still = hist[t] == MASK
        assert new.sum() > 0
        np.testing.assert_array_equal(hist[t][new], arg[new])
        for b in range(batch):
            if still[b].any():  # the least confident stay masked
                assert conf[b][new[b]].min() >= conf[b][still[b]].max() - 1e-5
        prev = hist[t]


def test_one_jit_equals_python_loop():
    seq_len, batch = 40, 3
    params = _params(seq_len)
    kw = dict(
        batch_size=batch,
        seq_len=seq_len,
        mask_token_id=MASK,
        num_steps=8,
        temperature=1.0,
        choice_temperature=1.5,
        return_history=True,
    )
    key = jax.random.key(11)
    one_jit = jax.jit(lambda p, k: decode(lambda t: _dependent_logits(p, t), k, **kw))(params, key)
    eager = decode(lambda t: _dependent_logits(params, t), key, **kw)
    loop_partial = decode_python_loop(jax.tree_util.Partial(_dependent_logits, params), key, **kw)
    loop_lambda = decode_python_loop(lambda t: _dependent_logits(params, t), key, **kw)
    assert one_jit.shape == (8, batch, seq_len)
    for other in (eager, loop_partial, loop_lambda):
        np.testing.assert_array_equal(one_jit, other)


def test_init_tokens_preserved_and_counted():
    seq_len, num_steps, batch = 32, 8, 4
    k1, k2 = jax.random.split(jax.random.key(4))
    codes = np.asarray(jax.random.randint(k1, (batch, seq_len), 0, K))
    revealed = np.asarray(jax.random.uniform(k2, (batch, seq_len))) < np.array(
        [[0.0], [0.3], [0.7], [1.0]]
    )
    init = np.where(revealed, codes, MASK).astype(np.int32)
    hist = np.asarray(
        _run(
            _dependent_logits,
            _params(seq_len),
            jax.random.key(5),
            batch_size=batch,
            seq_len=seq_len,
            num_steps=num_steps,
            temperature=1.0,
            init_tokens=init,
            return_history=True,
        )
    )
    for t in range(num_steps):
        np.testing.assert_array_equal(hist[t][revealed], init[revealed])
    expected = _expected_counts((~revealed).sum(1), seq_len, num_steps, "cosine")
    np.testing.assert_array_equal((hist == MASK).sum(-1), expected)
    assert np.all(hist[-1] < K)


def test_bad_arguments_raise():
    params = _params(8)
    f = lambda t: _static_logits(params, t)
    kw = dict(batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="mask_token_id"):
        decode(f, jax.random.key(0), mask_token_id=K - 1, **kw)
    with pytest.raises(ValueError, match="kind"):
        decode(f, jax.random.key(0), mask_token_id=K, schedule_kind="exp", **kw)
    with pytest.raises(ValueError, match="init_tokens"):
        decode(f, jax.random.key(0), mask_token_id=K, init_tokens=np.zeros((2, 7), np.int32), **kw)
    with pytest.raises(ValueError, match=r"\[B, N, K\]"):
        decode(lambda t: f(t)[:, :4], jax.random.key(0), mask_token_id=K, **kw)
    with pytest.raises(ValueError, match="num_steps"):
        decode(f, jax.random.key(0), mask_token_id=K, num_steps=0, **kw)


def test_each_step_draws_fresh_randomness():
    seq_len = 64
    params = (0.1 * _params(seq_len)[0], None)  # near-uniform logits: draws differ by key
    f = lambda t: _static_logits(params, t)
    state = init_state(jax.random.key(0), batch_size=2, seq_len=seq_len, mask_token_id=MASK)
    kw = dict(mask_token_id=MASK, num_steps=2, temperature=1.0)
    at0 = decode_step(f, state, **kw).tokens
    at1 = decode_step(f, state.replace(step=jnp.int32(1)), **kw).tokens
    both = (at0 != MASK) & (at1 != MASK)
    assert int(both.sum()) > 20
    assert not np.array_equal(at0[both], at1[both])
