"""Learning-rate schedules and Adam as the stages' configs describe them (``config.optimizer``)."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, peak: float, total_steps: int):
    """'constant' (paper stage I), 'cosine' from ``peak`` to ``end_learning_rate``, or 'multistep'
    (times ``decay_factor`` at each of ``milestones``), all after a linear warm-up of
    ``warmup_steps``."""
    if opt.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif opt.schedule == "cosine":
        decay = max(total_steps - opt.warmup_steps, 1)
        main = optax.cosine_decay_schedule(peak, decay, alpha=opt.end_learning_rate / peak)
    elif opt.schedule == "multistep":  # BasicSR's MultiStepLR (VQFR)
        factor = float(opt.get("decay_factor", 0.5))
        main = optax.piecewise_constant_schedule(
            peak, {int(m) - opt.warmup_steps: factor for m in opt.milestones}
        )
    else:
        raise ValueError(
            f"config.optimizer.schedule={opt.schedule!r}: expected 'constant', 'cosine' or "
            "'multistep'"
        )
    if not opt.warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, peak, opt.warmup_steps)
    return optax.join_schedules([warmup, main], [opt.warmup_steps])


def adam(
    opt: ml_collections.ConfigDict, peak: float, total_steps: int
) -> optax.GradientTransformation:
    """Adam (``b1``, ``b2``, ``eps``) on :func:`learning_rate_schedule` from ``peak``, after global
    norm clipping at ``grad_clip`` when it is set."""
    lr = learning_rate_schedule(opt, peak, total_steps)
    clip = opt.get("grad_clip", 0.0)
    chain = [optax.clip_by_global_norm(clip)] if clip else []
    return optax.chain(*chain, optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps))
