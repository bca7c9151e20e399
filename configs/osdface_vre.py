r"""OSDFace stage I: the visual representation embedder (VRE), two VQ autoencoders (Sec. 3.2).

Paper values by default (Sec. 4.1): 512 px, HQ and LQ autoencoders of base width 64, multipliers
(1, 2, 2, 2, 4, 8), 2 residual blocks per level, attention at 16 x 16 and in the bottleneck,
latent 512, codebook 1024 x 512 (256 tokens per face); L1 + LPIPS (lambda_per = 1) + PatchGAN
(lambda_dis = 0.8, the non-saturating loss of Eq. 7) + VQ (beta = 0.25); Adam 1.44e-4, batch 32;
the HQ dictionary for 50 epochs, the LQ one for 10, then 10 epochs with the association loss
(lambda_assoc = 1, Eqs. 9-11). An epoch of FFHQ (70,000 faces) at batch 32 is 2,187.5 steps:
``config.phases`` holds 109,375 HQ and 21,875 LQ steps, and the association phase runs
the remaining 21,875 of ``num_train_steps``. The paper does not say which networks
the association epochs train; both autoencoders do here (``phases.association_trains``). It does
not say when the GAN term starts either: with taming-transformers' adaptive weight it starts at
step 0 of each branch's phase here (``loss.adversarial_start``). bfloat16 compute, float32
parameters (``config.model.dtype``; the variants: float32).

    python -m artfr_jax.main --config=configs/osdface_vre.py --workdir=runs/osdface_vre \
        --config.loss.lpips_weights=weights/lpips_vgg.msgpack

Stage II (``configs/osdface.py``) takes the LQ encoder and dictionary of this workdir.

Variants: ``smoke`` (64 px, 16 x 16 tokens, the three phases in 160 steps on the CPU; LPIPS only
when ``loss.lpips_weights`` is given), ``tiny`` (the tests').
"""

import ml_collections

from artfr_jax.data import pipeline
from artfr_jax.models import osdface


def _model(**kwargs) -> ml_collections.ConfigDict:
    fields = osdface.vre_autoencoder_kwargs(**kwargs)
    fields.update(
        normalize_codes=False,
        remat="none",
        dtype="bfloat16",
        param_dtype="float32",
        kernels="auto",
    )
    return ml_collections.ConfigDict(fields)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "paper", "smoke", "tiny"):
        raise ValueError(f"configs/osdface_vre.py: unknown variant {arg!r} (expected: smoke, tiny)")
    config = ml_collections.ConfigDict()
    config.trainer = "osdface_vre"
    config.seed = 0
    config.distributed = False
    config.batch_size = 32
    # Steps of the HQ-dictionary and LQ-dictionary phases; the association phase is the rest.
    config.phases = ml_collections.ConfigDict(
        dict(hq=109_375, lq=21_875, association_trains=("hq", "lq"))
    )
    config.num_train_steps = 153_125
    config.log_every = 100
    config.eval_every = 5_000
    config.checkpoint_every = 5_000
    config.max_checkpoints_to_keep = 3
    config.async_checkpointing = True
    config.profile = False

    # Each sample is an (HQ, LQ) pair: the HQ autoencoder reconstructs HQ faces, the LQ one LQ faces.
    config.data = pipeline.default_config(image_size=512, preset="osdface")
    # One VQ autoencoder's fields (both branches share them; models/osdface.py) and the policy.
    config.model = _model()
    config.discriminator = ml_collections.ConfigDict(
        dict(base_features=64, num_layers=3, norm="group")
    )
    config.loss = ml_collections.ConfigDict(
        dict(
            pixel_loss="l1",
            pixel_weight=1.0,
            perceptual="required",  # 'required' | 'if_available' | 'off'
            perceptual_weight=1.0,
            lpips_weights="",
            adversarial_weight=0.8,
            adaptive_adversarial_weight=True,
            adversarial_start=0,  # steps into each branch's phase
            generator_loss="non_saturating",
            disc_loss="softplus",  # Eq. 7: log D(real) + log(1 - D(fake))
            association_weight=1.0,
            association_group_size=1,  # images per similarity matrix (1: Eq. 9's K x K)
        )
    )
    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=1.44e-4,
            disc_learning_rate=1.44e-4,
            schedule="constant",
            end_learning_rate=0.0,
            warmup_steps=0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip=0.0,
            ema_decay=0.0,
        )
    )
    config.eval = ml_collections.ConfigDict(dict(num_images=64, batch_size=8, lpips_weights=""))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2**14))

    if arg == "smoke":
        config.data = pipeline.default_config(image_size=64, preset="osdface")
        config.batch_size = 8
        config.phases.update(hq=80, lq=50)
        config.num_train_steps = 160
        config.log_every = 20
        config.eval_every = 80
        config.checkpoint_every = 80
        config.model = _model(
            base_channels=32,
            channel_multipliers=(1, 2, 2),
            layers_per_block=1,
            latent_channels=64,
            num_embeddings=256,
            embedding_dim=64,
            norm_num_groups=16,
        )
        config.model.dtype = "float32"
        config.discriminator.update(base_features=32, num_layers=2)
        config.loss.perceptual = "if_available"
        # The GAN term only costs fidelity in a few hundred steps (configs/vqgan.py:smoke).
        config.loss.adversarial_weight = 0.0
        config.optimizer.update(learning_rate=2e-3, disc_learning_rate=1e-3)
        config.eval.update(num_images=16, batch_size=8)
    elif arg == "tiny":
        config.data = pipeline.default_config(image_size=32, preset="osdface")
        config.data.num_workers = 0
        config.batch_size = 8
        config.phases.update(hq=2, lq=2)
        config.num_train_steps = 6
        config.log_every = 2
        config.eval_every = 3
        config.checkpoint_every = 2
        config.async_checkpointing = False
        config.model = _model(
            base_channels=8,
            channel_multipliers=(1, 2),
            layers_per_block=1,
            latent_channels=16,
            num_embeddings=32,
            embedding_dim=16,
            norm_num_groups=8,
        )
        config.model.dtype = "float32"
        config.discriminator.update(base_features=8, num_layers=2)
        config.loss.perceptual = "if_available"
        config.eval.update(num_images=6, batch_size=4)
        config.mesh.update(data=1, fsdp=1, min_shard_size=256)
    return config
