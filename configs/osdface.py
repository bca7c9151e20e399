r"""OSDFace stage II: one-step diffusion restoration with a visual prompt (Sec. 3.1, 3.3, 4.1).

Paper values by default: SD-2.1-base's UNet and VAE (``model.sd_weights``: a diffusers folder of
SD-2.1-base, or the ``OUT`` of ``python -m artfr_jax.convert.diffusers_sd --input=FOLDER
--output=OUT``, i.e. ``OUT_unet.msgpack`` + ``OUT_vae.msgpack``), one UNet call at T_L = 399 with
the visual prompt of the stage-I VRE (``configs/osdface_vre.py``), LoRA rank 16 (alpha 16) on the
UNet and the prompt projection trained; AdamW 1e-4 for generator and discriminator, batch 2,
150k steps, 512 px, the ``osdface`` degradation preset. bfloat16 compute; the frozen SD weights
are kept in bfloat16 (``model.frozen_param_dtype``), LoRA and heads in float32.

    python -m artfr_jax.main --config=configs/osdface.py --workdir=runs/osdface \
        --config.stage1.workdir=runs/osdface_vre --config.model.sd_weights=weights/sd21base \
        --config.loss.dists_weights=weights/dists.msgpack \
        --config.loss.arcface_weights=weights/arcface_iresnet50.msgpack
    python -m artfr_jax.restore --workdir=runs/osdface --input=faces/ --output=restored/

Choices where the paper is silent (fields): the loss weights of Eq. 12 (``loss.*_weight``: MSE 1,
EA-DISTS 1, identity 0.1, GAN 0.05, the ratios OSEDiff and DFOSD use between their pixel,
perceptual and GAN terms); the LoRA targets (``model.lora_targets``: every attention projection,
feed-forward and resnet/sampler conv of the UNet, as OSEDiff's); the latent discriminator
(DFOSD's: the frozen UNet's down and mid blocks with their own LoRA, same rank, and a small head,
``discriminator.*``), noised at ``t ~ U[0, 1000)`` and given the LQ face's prompt; the VAE latent
of the LQ face is a posterior sample, that of the HQ face for the discriminator its mean.
Without ``loss.dists_weights`` / ``loss.arcface_weights`` the EA-DISTS / identity terms are off,
with a log line saying so.

Variants: ``smoke`` (64 px, a small UNet and VAE from random init, both stages on the CPU),
``tiny`` (the tests'). A random-init UNet and VAE are written to ``WORKDIR/base_weights`` so that
restoration and resumed runs use the same ones.
"""

import ml_collections

from artfr_jax.data import pipeline
from artfr_jax.utils import config_files

# Module names (PEFT suffix semantics) the UNet's LoRA targets.
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "conv",
    "conv_in",
    "conv_out",
    "time_emb_proj",
)


def _stage1_config(variant: str | None) -> ml_collections.ConfigDict:
    return config_files.sibling_config(__file__, "osdface_vre.py", variant)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "paper", "smoke", "tiny"):
        raise ValueError(f"configs/osdface.py: unknown variant {arg!r} (expected: smoke, tiny)")
    config = ml_collections.ConfigDict()
    config.trainer = "osdface"
    config.seed = 0
    config.distributed = False
    config.batch_size = 2
    config.num_train_steps = 150_000
    config.log_every = 100
    config.eval_every = 5_000
    config.checkpoint_every = 5_000
    config.max_checkpoints_to_keep = 3
    config.async_checkpointing = True
    config.profile = False

    config.data = pipeline.default_config(image_size=512, preset="osdface")
    config.stage1 = ml_collections.ConfigDict(
        dict(workdir="", train_if_missing=False, config=_stage1_config(None))
    )
    config.model = ml_collections.ConfigDict(
        dict(
            init="pretrained",  # 'pretrained' (model.sd_weights) | 'random' (model.unet/vae)
            sd_weights="",
            # UNet / VAE fields for init='random' (models/unet.py, models/vae.py); ignored when
            # pretrained (the weights' own config is used).
            unet=ml_collections.ConfigDict(),
            vae=ml_collections.ConfigDict(),
            timestep=399,  # T_L of Eq. 5
            lora_rank=16,
            lora_alpha=16.0,
            lora_targets=LORA_TARGETS,
            prompt_hidden=256,  # the projection's hidden width (512 -> 256 -> 1024)
            remat="none",  # or "matmuls", "full" (models/layers.remat_mode)
            dtype="bfloat16",
            param_dtype="float32",  # LoRA, projection, discriminator head
            frozen_param_dtype="bfloat16",  # the frozen SD UNet and VAE
            kernels="auto",
        )
    )
    config.discriminator = ml_collections.ConfigDict(
        dict(lora_rank=16, lora_alpha=16.0, head_features=256, t_min=0, t_max=1000)
    )
    config.loss = ml_collections.ConfigDict(
        dict(
            mse_weight=1.0,
            ea_dists_weight=1.0,  # lambda_per
            dists_weights="",  # python -m artfr_jax.convert.dists ...
            identity_weight=0.1,  # lambda_ID
            arcface_arch="iresnet50",
            arcface_weights="",  # python -m artfr_jax.convert.arcface ...
            gan_weight=0.05,  # lambda_dis
            gan_start=0,
        )
    )
    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-4,
            disc_learning_rate=1e-4,
            schedule="constant",
            end_learning_rate=0.0,
            warmup_steps=0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-2,  # torch.optim.AdamW's default
            grad_clip=1.0,
            ema_decay=0.0,
        )
    )
    config.eval = ml_collections.ConfigDict(dict(num_images=64, batch_size=4, lpips_weights=""))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2**14))

    if arg in ("smoke", "tiny"):
        config.model.update(
            init="random", dtype="float32", frozen_param_dtype="float32", prompt_hidden=64
        )
    if arg == "smoke":
        config.stage1.update(train_if_missing=True, config=_stage1_config("smoke"))
        config.data = pipeline.default_config(image_size=64, preset="osdface")
        config.batch_size = 4
        config.num_train_steps = 120
        config.log_every = 20
        config.eval_every = 60
        config.checkpoint_every = 60
        config.model.unet = ml_collections.ConfigDict(
            dict(
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(64, 128),
                layers_per_block=1,
                attention_head_dim=(2, 4),
                cross_attention_dim=128,
                norm_num_groups=16,
            )
        )
        config.model.vae = ml_collections.ConfigDict(
            dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16)
        )
        config.model.update(lora_rank=8, lora_alpha=8.0)
        config.discriminator.update(lora_rank=8, lora_alpha=8.0, head_features=64)
        config.optimizer.update(learning_rate=2e-3, disc_learning_rate=1e-4)
        config.eval.update(num_images=16, batch_size=8)
    elif arg == "tiny":
        config.stage1.update(train_if_missing=True, config=_stage1_config("tiny"))
        config.data = pipeline.default_config(image_size=32, preset="osdface")
        config.data.num_workers = 0
        config.batch_size = 8
        config.num_train_steps = 6
        config.log_every = 2
        config.eval_every = 3
        config.checkpoint_every = 2
        config.async_checkpointing = False
        config.model.prompt_hidden = 16
        config.model.unet = ml_collections.ConfigDict(
            dict(
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(16, 32),
                layers_per_block=1,
                attention_head_dim=(1, 2),
                cross_attention_dim=16,
                norm_num_groups=8,
            )
        )
        config.model.vae = ml_collections.ConfigDict(
            dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
        )
        config.model.update(lora_rank=4, lora_alpha=4.0)
        config.discriminator.update(lora_rank=4, lora_alpha=4.0, head_features=8)
        config.eval.update(num_images=6, batch_size=4)
        config.mesh.update(data=1, fsdp=1, min_shard_size=256)
    return config
