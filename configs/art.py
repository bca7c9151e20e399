r"""ART-FR stage II: masked token transformer conditioned on LQ features (Sec. 3.2-3.3, App. A).

Paper values by default: 512 px, 16x16 HQ tokens after a 256-token LQ prefix, width 768, Adam with a
cosine decay 2e-4 -> 2e-5 over 150k steps, batch 24, T = 8 decoding steps, temperature 0; bfloat16
compute and float32 parameters (``config.model.dtype``; the variants: float32). Stage I
(configs/vqgan.py) must have been trained first:

    python -m artfr_jax.main --config=configs/vqgan.py --workdir=runs/vqgan ...
    python -m artfr_jax.main --config=configs/art.py --workdir=runs/art \
        --config.stage1.workdir=runs/vqgan
    python -m artfr_jax.restore --workdir=runs/art --input=faces/ --output=restored/

Depth is not given in the paper, which follows U-ViT (Bao et al. 2023) for the architecture; the
default takes U-ViT-M's shape at the same width 768: 17 blocks (8 in-blocks, a mid-block,
8 out-blocks, long skips between mirrored in/out blocks), 12 heads, MLP 3072.

The argument is ``SIZE[,TASK]``:
  SIZE  (empty) paper; ``smoke`` (64 px, trains stage I first if missing: ~8 min for stage I
        and ~1.2 s per stage-II step on 2 CPU cores, 300 steps; checks the 64-px path, no quality
        bound); ``demo`` (32 px: stage I + stage II + restoration of held-out faces in 10-14 min,
        the README's first command);
        ``tiny`` (the tests').
  TASK  extension tasks of Sec. 4.1 / App. A.2, App. B as degradation presets: ``inpainting`` and
        ``colorization`` (fine-tuned 20k steps from a trained model named by ``init_from``),
        ``denoise_a`` (noise 25-100), ``denoise_b`` (125-200), ``sr`` (x8 super-resolution, 200k
        steps from scratch). E.g. ``--config=configs/art.py:smoke,inpainting``.
Ablations (Tables 2-3): ``--config.model.long_skips=false``, ``--config.loss.feature_weight=0``,
``--config.model.use_transformer=false``, ``--config.model.condition_mode=concat|cross_attention``.
"""

import ml_collections

from artfr_jax.data import degradations, pipeline
from artfr_jax.utils import config_files

SIZES = ("", "paper", "smoke", "demo", "tiny")
TASKS = ("inpainting", "colorization", "denoise_a", "denoise_b", "sr")


def _stage1_config(variant: str | None) -> ml_collections.ConfigDict:
    return config_files.sibling_config(__file__, "vqgan.py", variant)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (arg or "").split(",")]
    size = parts[0] if parts[0] in SIZES else ""
    tasks = [p for p in parts if p and p not in SIZES]
    unknown = [p for p in tasks if p not in TASKS]
    if unknown or len(tasks) > 1:
        raise ValueError(
            f"configs/art.py: unknown variant {arg!r}; expected SIZE[,TASK] with SIZE in "
            f"{SIZES[2:]} (or empty) and one TASK in {TASKS}"
        )

    config = ml_collections.ConfigDict()
    config.trainer = "art"
    config.seed = 0
    config.distributed = False

    config.batch_size = 24
    config.num_train_steps = 150_000
    config.log_every = 100
    config.eval_every = 5_000
    config.checkpoint_every = 5_000
    config.max_checkpoints_to_keep = 3
    config.async_checkpointing = True
    config.profile = False

    config.data = pipeline.default_config(image_size=512, preset="artfr")

    # The frozen tokenizer: its workdir ('' = <workdir>/stage1) and the config it was trained with
    # (checked against the checkpoint; used to train it when train_if_missing is set).
    config.stage1 = ml_collections.ConfigDict(
        dict(workdir="", train_if_missing=False, config=_stage1_config(None))
    )
    config.init_from = ""  # a stage-II workdir whose params start this run (fine-tuning)

    config.model = ml_collections.ConfigDict(
        dict(
            width=768,
            depth=17,  # 8 in + mid + 8 out (U-ViT-M shape; the paper does not state it)
            num_heads=12,
            mlp_dim=3072,
            condition_mode="prefix",  # 'prefix' | 'concat' | 'cross_attention' (Table 3)
            long_skips=True,  # Table 2 "Skip connection"
            use_transformer=True,  # Table 2 "AR module"; off = nearest-code lookup of f_l
            dropout_rate=0.1,  # MaskGIT's / BERT's value; the paper does not state one
            remat="none",  # the LQ encoder's blocks: or "matmuls", "full" (layers.remat_mode)
            transformer_remat="none",  # the transformer's blocks
            # One precision and kernel policy for the LQ encoder, the transformer and the frozen
            # tokenizer (models/factory.py); the CPU variants compute in float32.
            dtype="bfloat16",
            param_dtype="float32",
            kernels="auto",  # 'auto' | 'xla' | 'cpu' (models/kernels.py)
            init_lq_encoder_from_stage1=True,
        )
    )
    config.loss = ml_collections.ConfigDict(
        dict(
            feature_weight=1.0,  # Eq. 5 (Table 2 "Feature loss")
            token_weight=1.0,  # Eq. 6
            mask_schedule="cosine",  # gamma(r) = cos(pi/2 r)
        )
    )
    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=2e-4,
            schedule="cosine",
            end_learning_rate=2e-5,
            warmup_steps=0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip=0.0,
            ema_decay=0.0,
        )
    )
    config.sampling = ml_collections.ConfigDict(
        dict(steps=8, temperature=0.0, choice_temperature=0.0, schedule="cosine")
    )
    # Validation images: config.data.eval_folder. LPIPS is reported at eval when lpips_weights
    # (or loss.lpips_weights) names a converted file.
    config.eval = ml_collections.ConfigDict(dict(num_images=64, batch_size=8, lpips_weights=""))
    # After training, restore this many held-out faces into samples/restored/ (0 = off).
    config.final_restore = ml_collections.ConfigDict(dict(num_images=0))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2**14))

    if size in ("smoke", "demo"):
        config.data = pipeline.default_config(image_size=64, preset="artfr")
        config.stage1.config = _stage1_config("smoke")
        config.stage1.train_if_missing = True
        config.batch_size = 8
        config.num_train_steps = 300
        config.log_every = 25
        config.eval_every = 100
        config.checkpoint_every = 100
        # A narrow transformer: 256 LQ + 256 HQ tokens (64 px, f=4) at width 128.
        config.model.update(
            width=128, depth=5, num_heads=4, mlp_dim=512, dropout_rate=0.0, dtype="float32"
        )
        config.optimizer.update(
            learning_rate=1e-3, end_learning_rate=2e-5, warmup_steps=20, b2=0.99
        )
        config.eval.update(num_images=16, batch_size=8)
    if size == "demo":
        # 32-px faces so that both stages and the restoration fit in 10-14 minutes on 2 CPU cores.
        # The paper's blur and downscale ranges are set for 512-px faces and erase a 32-px face
        # (r up to 30), so they are scaled down; noise takes App. B's levels {25, 50, 75, 100}.
        config.data = pipeline.default_config(image_size=32, preset="artfr")
        config.data.degradation.update(
            blur_sigma=(0.1, 1.5),
            downscale_range=(1.0, 2.5),
            noise_levels=(25.0, 50.0, 75.0, 100.0),
            noise_range=(25.0, 100.0),
        )
        config.stage1.config.data = pipeline.default_config(image_size=32, preset="none")
        config.stage1.config.update(num_train_steps=800, eval_every=200, checkpoint_every=200)
        # 64 LQ + 64 HQ tokens (32 px, f=4) at width 256. The MLP is 2x the width, not 4x: on a
        # slow 2-core machine (AVX2 only) the demo took 15 min 20 s with 1024 and 13 min 34 s with
        # 512, restoring 18.35 -> 20.06 and 18.35 -> 19.69 dB.
        config.model.update(width=256, depth=7, num_heads=4, mlp_dim=512)
        config.num_train_steps = 600
        config.eval_every = 300
        config.checkpoint_every = 300
        config.final_restore.num_images = 32
    elif size == "tiny":
        config.data = pipeline.default_config(image_size=32, preset="artfr")
        config.data.num_workers = 0
        config.stage1.config = _stage1_config("tiny")
        config.stage1.train_if_missing = True
        config.batch_size = 8
        config.num_train_steps = 4
        config.log_every = 2
        config.eval_every = 4
        config.checkpoint_every = 2
        config.async_checkpointing = False
        config.model.update(
            width=32, depth=3, num_heads=4, mlp_dim=64, dropout_rate=0.0, dtype="float32"
        )
        config.eval.update(num_images=4, batch_size=4)
        config.mesh.update(data=1, fsdp=1, min_shard_size=256)

    if tasks:
        task = tasks[0]
        config.data.degradation = degradations.degradation_preset(task)
        if task in ("inpainting", "colorization"):
            config.num_train_steps = 20_000 if size in ("", "paper") else config.num_train_steps
        elif task == "sr" and size in ("", "paper"):
            config.num_train_steps = 200_000
    return config
