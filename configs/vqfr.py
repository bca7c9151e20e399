r"""VQFR stage II: restoration with a fixed HQ codebook and a parallel decoder (VQFR Sec. 3-4).

Paper values by default (the release's train_vqfr_v1_B16_200K): 512 px, batch 16, degradation
preset ``vqfr``, Adam 1e-5 with betas (0.5, 0.9) for the network and the four discriminators,
200k steps; losses lambda_pix = lambda_code = lambda_per = 1, style weight 2000,
lambda_global = lambda_local = 0.5; the texture branch's GAN terms from the start and the main
branch's from step 5000; bfloat16 compute, float32 parameters (``config.model.dtype``; the
variants: float32). Stage I is VQFR's codebook model (``configs/vqgan.py:vqfr``), trained
into ``<workdir>/stage1`` first when ``stage1.train_if_missing`` (the variants) or named by
``stage1.workdir``:

    python -m artfr_jax.main --config=configs/vqgan.py:vqfr --workdir=runs/vqfr_codebook \
        --config.loss.lpips_weights=weights/lpips_vgg.msgpack
    python -m artfr_jax.main --config=configs/vqfr.py --workdir=runs/vqfr \
        --config.stage1.workdir=runs/vqfr_codebook --config.loss.lpips_weights=weights/lpips_vgg.msgpack
    python -m artfr_jax.restore --workdir=runs/vqfr --input=faces/ --output=restored/ [--texture]

Variants: ``smoke`` (64 px, both stages on CPU, batch 4; the perceptual/style terms only when
``loss.lpips_weights`` is given, so an L1 term on the main branch stands in for them, and the GAN
terms start at step 100 of 150 with weight 0.1), ``tiny`` (the tests').

``init_from`` starts the network from a VQFR workdir or from official weights converted by
``python -m artfr_jax.convert.vqfr --arch=vqfr_v1`` instead of from the stage-I model.
"""

import ml_collections

from artfr_jax.data import pipeline
from artfr_jax.utils import config_files


def _stage1_config(variant: str | None) -> ml_collections.ConfigDict:
    return config_files.sibling_config(__file__, "vqgan.py", variant)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "paper", "smoke", "tiny"):
        raise ValueError(f"configs/vqfr.py: unknown variant {arg!r} (expected: smoke, tiny)")
    config = ml_collections.ConfigDict()
    config.trainer = "vqfr"
    config.seed = 0
    config.distributed = False
    config.init_from = ""  # network start: a VQFR workdir or a converted vqfr_v1.msgpack
    config.batch_size = 16
    config.num_train_steps = 200_000
    config.log_every = 100
    config.eval_every = 5_000
    config.checkpoint_every = 5_000
    config.max_checkpoints_to_keep = 3
    config.async_checkpointing = True
    config.profile = False

    config.data = pipeline.default_config(image_size=512, preset="vqfr")
    config.stage1 = ml_collections.ConfigDict(
        dict(workdir="", train_if_missing=False, config=_stage1_config("vqfr"))
    )
    # Fields of VQFRv1 beyond the stage-I model's (which it copies).
    # remat="full": recompute residual blocks and texture warping modules in the backward pass (less
    # activation memory for one extra forward pass; the paper step at batch 1: temp 19.1 -> 11.2 GiB);
    # "matmuls" recomputes only their norms and activations.
    # The precision and kernel policy of every network of the stage (models/factory.py): the
    # network, the four discriminators, LPIPS and the frozen codebook model. CPU variants: float32.
    config.model = ml_collections.ConfigDict(
        dict(
            cond_channels=32,
            deformable_groups=4,
            remat="none",
            dtype="bfloat16",
            param_dtype="float32",
            kernels="auto",
        )
    )
    config.global_discriminator = ml_collections.ConfigDict(
        dict(arch="swagan", out_size=512, channel_multiplier=2)
    )
    config.local_discriminator = ml_collections.ConfigDict(
        dict(arch="patchgan", base_features=64, num_layers=3, norm="group")
    )
    config.loss = ml_collections.ConfigDict(
        dict(
            pixel_weight=1.0,  # L1 on the texture branch
            main_pixel_weight=0.0,  # the release trains the main branch without a pixel loss
            code_weight=1.0,
            perceptual="required",  # 'required' | 'if_available' | 'off'
            perceptual_weight=1.0,
            style_weight=2000.0,
            lpips_weights="",
            global_weight=0.5,
            local_weight=0.5,
            gan_start=0,
            main_gan_start=5_000,
            r1_weight=10.0,
            r1_every=16,
        )
    )
    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-5,
            disc_learning_rate=1e-5,
            schedule="constant",
            end_learning_rate=0.0,
            warmup_steps=0,
            b1=0.5,
            b2=0.9,
            eps=1e-8,
            ema_decay=0.0,
        )
    )
    config.eval = ml_collections.ConfigDict(dict(num_images=64, batch_size=8, lpips_weights=""))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2**14))

    if arg in ("smoke", "tiny"):
        config.model.dtype = "float32"
    if arg == "smoke":
        config.stage1.update(train_if_missing=True, config=_stage1_config("vqfr_smoke"))
        config.data = pipeline.default_config(image_size=64, preset="vqfr")
        config.batch_size = 4
        config.num_train_steps = 150
        config.log_every = 25
        config.eval_every = 75
        config.checkpoint_every = 75
        config.global_discriminator.update(out_size=64, channel_multiplier=1, max_channels=64)
        config.local_discriminator.update(base_features=32, num_layers=2)
        # Without LPIPS weights the main branch would have only GAN terms: an L1 term stands in for
        # the perceptual loss; both branches' GAN terms start after 100 reconstruction steps, at
        # 0.1 so that they stay about as small next to the L1 terms (~0.2) as the paper's 0.5 is
        # next to its perceptual + style terms.
        config.loss.update(
            perceptual="if_available",
            main_pixel_weight=1.0,
            gan_start=100,
            main_gan_start=100,
            global_weight=0.1,
            local_weight=0.1,
        )
        config.optimizer.update(learning_rate=5e-4, disc_learning_rate=1e-4)
        config.eval.update(num_images=16, batch_size=8)
    elif arg == "tiny":
        config.stage1.update(train_if_missing=True, config=_stage1_config("vqfr_tiny"))
        config.data = pipeline.default_config(image_size=32, preset="vqfr")
        config.data.num_workers = 0
        config.batch_size = 8
        config.num_train_steps = 6
        config.log_every = 2
        config.eval_every = 3
        config.checkpoint_every = 2
        config.async_checkpointing = False
        config.global_discriminator.update(out_size=32, channel_multiplier=1, max_channels=16)
        config.local_discriminator.update(base_features=8, num_layers=2)
        config.loss.update(perceptual="if_available", main_gan_start=3)
        config.eval.update(num_images=6, batch_size=4)
        config.mesh.update(data=1, fsdp=1, min_shard_size=256)
    return config
