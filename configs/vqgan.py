r"""ART-FR stage I: VQGAN tokenizer on HQ faces (Sec. 3.1, Sec. 4.1, App. A.1).

Paper values by default: 512 px, f=32 (16x16 tokens), codebook 1024 x 256, batch 24, Adam 8e-5,
500k steps, lambda_G = 0.8, LPIPS perceptual loss (needs converted weights, see README); bfloat16
compute and float32 parameters for every network (``config.model.dtype``; the variants: float32).

    python -m artfr_jax.main --config=configs/vqgan.py --workdir=runs/vqgan \
        --config.loss.lpips_weights=weights/lpips_vgg.msgpack

Variants (``--config=configs/vqgan.py:smoke``; ``vqfr``, ``vqfr_smoke``, ``vqfr_tiny``: VQFR's
codebook model, see :func:`vqfr_config`):
  smoke  CPU check: 64 px, narrow 3-level model (f=4) with l2-normalised codes, 500 steps, no
         GAN term, perceptual term only if ``loss.lpips_weights`` is given.
  tiny   the tests' config: 32 px, two levels, 6 steps, one device.
"""

import ml_collections

from artfr_jax.data import pipeline


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.trainer = "vqgan"
    config.seed = 0
    config.distributed = False  # jax.distributed.initialize() for multi-host jobs

    config.batch_size = 24  # global
    config.num_train_steps = 500_000
    config.log_every = 100
    config.eval_every = 5_000
    config.checkpoint_every = 5_000
    config.max_checkpoints_to_keep = 3
    config.async_checkpointing = True
    config.profile = False  # a TensorBoard profile of 5 steps after step 10

    # Stage I sees HQ images only: no degradation work in the pipeline.
    config.data = pipeline.default_config(image_size=512, preset="none")

    config.model = ml_collections.ConfigDict(
        dict(
            block_out_channels=(64, 128, 128, 256, 256, 512),
            layers_per_block=2,
            attention_levels=(5,),  # the 16x16 level
            mid_attention=True,
            latent_channels=256,
            num_embeddings=1024,
            embedding_dim=256,
            norm_num_groups=32,
            beta=0.25,
            normalize_codes=False,
            remat="none",  # or "matmuls", "full" (models/layers.remat_mode)
            # One precision and kernel policy for every network of the stage, the discriminator
            # and LPIPS included (models/factory.py): bfloat16 compute on accelerators, float32
            # parameters; the CPU variants compute in float32.
            dtype="bfloat16",
            param_dtype="float32",
            kernels="auto",  # 'auto' | 'xla' | 'cpu' (models/kernels.py)
        )
    )
    config.discriminator = ml_collections.ConfigDict(
        dict(base_features=64, num_layers=3, norm="group")
    )
    config.loss = ml_collections.ConfigDict(
        dict(
            pixel_weight=1.0,
            perceptual="required",  # 'required' | 'if_available' | 'off'
            perceptual_weight=1.0,
            lpips_weights="",  # python -m artfr_jax.convert.lpips_vgg --vgg16=... --output=...
            adversarial_weight=0.8,  # lambda_G
            adaptive_adversarial_weight=True,  # taming's gradient-balanced lambda (see trainer)
            adversarial_start=30_000,
            generator_loss="hinge",
        )
    )
    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=8e-5,
            schedule="constant",  # or 'cosine' (to end_learning_rate)
            end_learning_rate=0.0,
            warmup_steps=0,
            disc_learning_rate=8e-5,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            grad_clip=0.0,
            ema_decay=0.0,
        )
    )
    # Validation images: config.data.eval_folder. LPIPS is reported at eval when lpips_weights
    # (or loss.lpips_weights) names a converted file.
    config.eval = ml_collections.ConfigDict(dict(num_images=64, batch_size=8, lpips_weights=""))
    # Parameters with at least min_shard_size elements are split on fsdp (largest divisible dim).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2**14))

    if arg == "smoke":
        config.data = pipeline.default_config(image_size=64, preset="none")
        config.batch_size = 8
        config.num_train_steps = 500
        config.log_every = 25
        config.eval_every = 50
        config.checkpoint_every = 100
        # f=4 (16x16 tokens at 64 px) and l2-normalised codes: a model this small and this short
        # collapses onto a few codes with the paper's lookup (measured perplexity ~6 of 256).
        config.model.update(
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            attention_levels=(),
            latent_channels=64,
            num_embeddings=256,
            embedding_dim=16,
            norm_num_groups=16,
            normalize_codes=True,
            dtype="float32",
        )
        config.discriminator.update(base_features=32, num_layers=2)
        config.loss.perceptual = "if_available"
        # The GAN term needs a converged reconstruction first (the paper starts it at 30k steps);
        # in a few hundred steps it only costs fidelity. The tests run it on the tiny config.
        config.loss.adversarial_weight = 0.0
        config.optimizer.update(
            learning_rate=2e-3,
            disc_learning_rate=1e-3,
            schedule="cosine",
            end_learning_rate=5e-5,
            warmup_steps=20,
        )
        config.eval.update(num_images=16, batch_size=8)
    elif arg == "tiny":  # tests: seconds per step on one CPU core
        config.data = pipeline.default_config(image_size=32, preset="none")
        config.data.num_workers = 0
        config.batch_size = 8
        config.num_train_steps = 6
        config.log_every = 2
        config.eval_every = 3
        config.checkpoint_every = 2
        config.async_checkpointing = False
        config.model.update(
            block_out_channels=(16, 32),
            layers_per_block=1,
            attention_levels=(1,),
            latent_channels=16,
            num_embeddings=32,
            embedding_dim=8,
            norm_num_groups=8,
            dtype="float32",
        )
        config.discriminator.update(base_features=8, num_layers=2)
        config.loss.perceptual = "if_available"
        config.loss.adversarial_start = 2
        config.eval.update(num_images=6, batch_size=4)
        config.mesh.update(data=1, fsdp=1, min_shard_size=256)
    elif arg in ("vqfr", "vqfr_smoke", "vqfr_tiny"):
        return vqfr_config(arg)
    elif arg not in (None, ""):
        raise ValueError(
            f"configs/vqgan.py: unknown variant {arg!r} (expected: smoke, tiny, vqfr, vqfr_smoke, "
            "vqfr_tiny)"
        )
    return config


def vqfr_config(arg: str) -> ml_collections.ConfigDict:
    """VQFR's codebook model (VQFR Sec. 3.1, 4.1; the release's train_vqgan_v1_B16_800K):
    512 px, f = 32, 1024 x 256 codebook, batch 16, Adam 1e-4 (0.9, 0.96) halved at 500k and 650k,
    800k steps; L1 + LPIPS + SWAGAN global discriminator (softplus, R1 = 10 every 16 steps) from
    step 50k; no quantisation before step 10k; k-means re-estimation every 2k steps until 30k from
    a 16384-vector reservoir. ``vqfr_smoke`` / ``vqfr_tiny`` shrink it for CPU and tests."""
    config = get_config()
    config.batch_size = 16
    config.num_train_steps = 800_000
    config.model = ml_collections.ConfigDict(
        dict(
            arch="vqfr_v1",
            base_channels=128,
            channel_multipliers=(1, 1, 2, 2, 2, 4),
            resolution_scale_rates=(1, 2, 2, 2, 2, 2),
            encoder_num_blocks=2,
            decoder_num_blocks=3,
            num_embeddings=1024,
            embedding_dim=256,
            beta=0.25,
            norm_groups=32,
            dtype="bfloat16",  # the policy, as in get_config
            param_dtype="float32",
            kernels="auto",
        )
    )
    config.discriminator = ml_collections.ConfigDict(
        dict(arch="swagan", out_size=512, channel_multiplier=2)
    )
    config.loss.update(
        pixel_loss="l1",
        adversarial_weight=1.0,
        adaptive_adversarial_weight=False,
        adversarial_start=50_000,
        generator_loss="non_saturating",
        disc_loss="softplus",
        r1_weight=10.0,
        r1_every=16,
    )
    config.codebook = ml_collections.ConfigDict(
        dict(
            kmeans=True,
            reservoir_size=16384,
            every=2000,
            max_steps=30_000,
            warmup_steps=10_000,
            iters=30,
        )
    )
    config.optimizer.update(
        learning_rate=1e-4,
        disc_learning_rate=1e-4,
        b1=0.9,
        b2=0.96,
        schedule="multistep",
        milestones=(500_000, 650_000),
        decay_factor=0.5,
    )
    if arg == "vqfr_smoke":  # 64 px on CPU: two levels of f = 2 each, narrow
        config.data = pipeline.default_config(image_size=64, preset="none")
        config.batch_size = 8
        config.num_train_steps = 200
        config.log_every = 25
        config.eval_every = 100
        config.checkpoint_every = 100
        config.model.update(
            base_channels=32,
            channel_multipliers=(1, 2, 2),
            resolution_scale_rates=(1, 2, 2),
            encoder_num_blocks=1,
            decoder_num_blocks=1,
            num_embeddings=128,
            embedding_dim=32,
            norm_groups=8,
            dtype="float32",
        )
        config.discriminator.update(out_size=64, channel_multiplier=1, max_channels=64)
        config.loss.update(perceptual="if_available", adversarial_start=150)
        config.codebook.update(reservoir_size=2048, every=40, max_steps=120, warmup_steps=40)
        config.optimizer.update(learning_rate=1e-3, disc_learning_rate=1e-4, milestones=(170,))
        config.eval.update(num_images=16, batch_size=8)
    elif arg == "vqfr_tiny":  # tests
        config.data = pipeline.default_config(image_size=32, preset="none")
        config.data.num_workers = 0
        config.batch_size = 8
        config.num_train_steps = 6
        config.log_every = 2
        config.eval_every = 3
        config.checkpoint_every = 2
        config.async_checkpointing = False
        config.model.update(
            base_channels=8,
            channel_multipliers=(1, 2),
            resolution_scale_rates=(1, 2),
            encoder_num_blocks=1,
            decoder_num_blocks=1,
            num_embeddings=16,
            embedding_dim=8,
            norm_groups=4,
            dtype="float32",
        )
        config.discriminator.update(out_size=32, channel_multiplier=1, max_channels=16)
        config.loss.update(perceptual="if_available", adversarial_start=2)
        config.codebook.update(reservoir_size=256, every=2, max_steps=5, warmup_steps=1, iters=5)
        config.optimizer.update(milestones=(4,))
        config.eval.update(num_images=6, batch_size=4)
        config.mesh.update(data=1, fsdp=1, min_shard_size=256)
    return config
