"""The de-tokenizer: regressed (or true) ViT features -> an image, through SDXL's architecture (paper §3.1).

Three diffusers parts and one of ours, as the official `SDXLAdapter` wires them
(`src/models_ipa/adapter_modules.py`, configs `configs/detokenizer/detokenizer_sdxl_qwen_vit_*.yaml`):

- `ResamplerXL` (ours, `resampler_xl.py`): N x D features -> SDXL's conditioning, i.e. a token sequence of the
  UNet's cross-attention width (in place of the two text encoders' outputs), a pooled vector (in place of
  OpenCLIP-bigG's pooled text embedding) and the six size/crop `time_ids`. Images replace text completely.
- `UNet2DConditionModel` with `addition_embed_type="text_time"`: the SDXL UNet, sized by the preset.
- `AutoencoderKL`: frames <-> latents. `paper` reads SDXL's; `tiny` trains its own (stage 1's VAE step).
- Schedulers: `DDPMScheduler` for the ε-prediction training loss, `EulerDiscreteScheduler` for sampling, both
  with SDXL-base's noise schedule (1000 steps, scaled-linear betas 0.00085..0.012, "leading" spacing).

Classifier-free guidance takes, as the official pipeline does, the features of a blank frame as the negative
branch (`ViT(zeros)`, a mean-colour image after normalisation); they travel with the de-tokenizer.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from labkit.core.errors import LabError
from labkit.core.presets import DetokenizerPreset, get_preset
from labkit.models.resampler_xl import ResamplerXL

CONFIG = "detokenizer.json"
NEGATIVE = "negative_features.safetensors"
MODES = (
    "stage1",
    "official",
    "full",
)  # what trains: the lab's stage 1 (all but the VAE), stage 3 as released / as the paper says

# SDXL base 1.0's noise schedule (scheduler/scheduler_config.json)
SDXL_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
)


def unet_config(config: DetokenizerPreset) -> dict:
    """`UNet2DConditionModel` arguments: SDXL's layout (no attention at the top level, cross-attention below)."""
    levels = len(config.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    downsample = 2 ** (len(config.vae_channels) - 1)
    return dict(
        sample_size=config.image_size // downsample,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers,
        transformer_layers_per_block=config.transformer_layers,
        attention_head_dim=config.attention_heads,
        norm_num_groups=config.norm_groups,
        cross_attention_dim=sum(config.cross_widths),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.time_embed_dim,
        projection_class_embeddings_input_dim=6 * config.time_embed_dim + config.cross_widths[1],
    )


def vae_config(config: DetokenizerPreset) -> dict:
    levels = len(config.vae_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=config.vae_layers,
        latent_channels=config.latent_channels,
        norm_num_groups=min(32, config.vae_channels[0]),
        sample_size=config.image_size,
    )


class Detokenizer(nn.Module):
    """Resampler + UNet + VAE + schedules, with diffusers-style `save_pretrained` / `from_pretrained`."""

    def __init__(
        self,
        config: DetokenizerPreset,
        num_features: int,
        feature_dim: int,
        preset: str = "tiny",
        unet: UNet2DConditionModel | None = None,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        self.config, self.preset = config, preset
        self.feature_shape = (num_features, feature_dim)
        self.resampler = ResamplerXL(
            feature_dim,
            config.resampler_dim,
            config.resampler_depth,
            config.resampler_heads,
            config.resampler_head_dim,
            config.resampler_queries,
            config.cross_widths,
        )
        self.unet = unet if unet is not None else UNet2DConditionModel(**unet_config(config))
        self.vae = vae if vae is not None else AutoencoderKL(**vae_config(config))
        self.vae.requires_grad_(False)
        # the blank frame's features (the guidance negative); zeros until stage 1 sets them from the tokenizer
        self.register_buffer("negative_features", torch.zeros(num_features, feature_dim))
        with torch.device("cpu"):  # schedules are small tables: on the CPU even when the model is built on `meta`
            self.train_scheduler = DDPMScheduler(**SDXL_SCHEDULE)
            self.sample_scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULE)

    # ---- conditioning --------------------------------------------------------------------------------------
    def check_features(self, features: torch.Tensor, where: str = "features") -> None:
        if features.ndim != 3 or tuple(features.shape[1:]) != self.feature_shape:
            raise LabError(
                f"{where}: expected features of shape [batch, {self.feature_shape[0]}, {self.feature_shape[1]}] "
                f"for the {self.preset} de-tokenizer, got {list(features.shape)}"
            )

    def time_ids(self, batch: int, device: torch.device) -> torch.Tensor:
        """(original h, w, crop top, left, target h, w): the full, uncropped frame, as at official inference."""
        size = self.config.image_size
        return torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32, device=device).expand(batch, 6)

    def condition(self, features: torch.Tensor) -> dict:
        tokens, pooled = self.resampler(features)
        return {
            "encoder_hidden_states": tokens,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.time_ids(len(features), features.device)},
        }

    # ---- latents ---------------------------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: torch.Generator | None = None) -> torch.Tensor:
        """[-1, 1] images -> scaled latents (the posterior's mean, or a draw from it with a generator)."""
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample(sample) if sample is not None else posterior.mean
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> uint8 images [B, 3, H, W]."""
        images = self.vae.decode(latents / self.scaling_factor).sample
        return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)

    # ---- training --------------------------------------------------------------------------------------------
    def loss(self, features: torch.Tensor, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """ε-prediction MSE with timesteps uniform over the 1000 training steps (the official stage-3 loss)."""
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        steps = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = self.train_scheduler.add_noise(latents, noise, steps.to(latents.device))
        predicted = self.unet(noisy, steps.to(latents.device), **self.condition(features)).sample
        return F.mse_loss(predicted.float(), noise.float())

    def forward(self, features: torch.Tensor, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`loss`, as the module's call: a data-parallel wrapper (DDP, DeepSpeed) syncs gradients only through it."""
        return self.loss(features, latents, generator)

    def set_trainable(self, mode: str) -> list[str]:
        """Freeze everything but what `mode` trains; return the trainable parameter names.

        `official` is `SDXLAdapter.set_trainable_v2` with `full_ft=False`: the resampler and every UNet Linear
        whose name ends in `to_k` / `to_v` (self- and cross-attention). `full` and `stage1`: resampler + the whole
        UNet. SEED-X's stage-1 pre-training, which SEED-Story follows, trains the resampler and the UNet's keys and
        values of a pretrained SDXL UNet; the lab's `stage1` trains all of its from-scratch UNet, as there are no
        pretrained weights at `tiny` (docs/paper_to_code.md, stage-1 deviations).
        """
        if mode not in MODES:
            raise LabError(f"unknown de-tokenizer mode {mode!r}; choose one of {', '.join(MODES)}")
        self.requires_grad_(False)
        self.resampler.requires_grad_(True)
        if mode == "official":
            for name, module in self.unet.named_modules():
                if name.endswith(("to_k", "to_v")) and isinstance(module, nn.Linear):
                    module.requires_grad_(True)
        else:
            self.unet.requires_grad_(True)
        return [name for name, p in self.named_parameters() if p.requires_grad]

    # ---- sampling --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        features: torch.Tensor,
        steps: int = 10,
        guidance_scale: float = 3.0,
        seed: int = 42,
        batch_size: int = 64,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] uint8 from features [B, N, D]: Euler sampling, guidance against the blank frame.

        The noise comes from `seed` (the official pipeline reseeds every call): the same features and seed give
        the same images, however they are batched.
        """
        self.check_features(features)
        if steps < 1:
            raise LabError(f"steps: must be >= 1 (got {steps})")
        self.eval()
        latent_size = self.unet.config.sample_size
        shape = (len(features), self.unet.config.in_channels, latent_size, latent_size)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # all at once: batching-invariant
        chunks = list(zip(features.split(batch_size), noise.split(batch_size)))
        bar = tqdm(total=len(chunks) * steps, desc="de-tokenize", unit="step", disable=not progress)
        images = [self._sample_batch(chunk, start, steps, guidance_scale, bar) for chunk, start in chunks]
        bar.close()
        return torch.cat(images)

    def _sample_batch(
        self, features: torch.Tensor, noise: torch.Tensor, steps: int, guidance_scale: float, bar
    ) -> torch.Tensor:
        device = next(self.unet.parameters()).device
        features = features.to(device)
        scheduler = EulerDiscreteScheduler.from_config(self.sample_scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        latents = noise.to(device) * scheduler.init_noise_sigma
        guided = guidance_scale != 1.0
        if guided:
            negative = self.negative_features.to(features).expand_as(features)
            condition = self.condition(torch.cat([negative, features]))
        else:
            condition = self.condition(features)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
            prediction = self.unet(model_input, t, **condition).sample
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(prediction, t, latents).prev_sample
            bar.update(1)
        return self.decode(latents).cpu()

    # ---- save / load -----------------------------------------------------------------------------------------
    def save_pretrained(self, folder: Path | str, half: bool = False, include_vae: bool = True) -> None:
        """diffusers' layout: unet/, vae/, scheduler/ as in the SDXL repo, plus resampler/ and our config.

        `include_vae=False` leaves the VAE out (the lab's artifacts share one VAE artifact); such a folder
        loads with `from_pretrained(folder, vae=...)`.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = torch.float16 if half else torch.float32
        parts = (("unet", self.unet), ("vae", self.vae)) if include_vae else (("unet", self.unet),)
        for name, part in parts:
            _quietly(lambda: copy.deepcopy(part).to(dtype).save_pretrained(folder / name))  # the live model keeps fp32
        self.sample_scheduler.save_pretrained(folder / "scheduler")
        (folder / "resampler").mkdir(exist_ok=True)
        save_file(
            {k: v.detach().to(dtype).contiguous() for k, v in self.resampler.state_dict().items()},
            str(folder / "resampler" / "model.safetensors"),
        )
        save_file({"negative_features": self.negative_features.contiguous()}, str(folder / NEGATIVE))
        (folder / CONFIG).write_text(
            json.dumps(
                {"preset": self.preset, "feature_shape": list(self.feature_shape), "config": asdict(self.config)},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )

    @classmethod
    def from_pretrained(
        cls, folder: Path | str, preset: str | None = None, vae: AutoencoderKL | None = None
    ) -> "Detokenizer":
        """Load a saved de-tokenizer (fp32); with `preset`, refuse one built for another preset or other sizes.

        `vae` supplies the autoencoder of a folder saved without one."""
        folder = Path(folder)
        path = folder / CONFIG
        if not path.is_file():
            raise LabError(f"{path}: not found (not a saved de-tokenizer folder)")
        saved = json.loads(path.read_text(encoding="utf-8"))
        config = DetokenizerPreset(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
        if preset is not None:
            expected = get_preset(preset)
            if saved["preset"] != preset or config != expected.detokenizer:
                raise LabError(
                    f"{folder}: is a de-tokenizer for preset {saved['preset']!r}"
                    f"{'' if saved['preset'] != preset else ' with other sizes'}, not for {preset!r}; "
                    f"rebuild it: labkit train stage1 --preset {preset}"
                )
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
        if vae is None:
            if not (folder / "vae").is_dir():
                raise LabError(
                    f"{folder}: saved without its VAE (vae/); pass one: Detokenizer.from_pretrained(folder, vae=...)"
                )
            vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
        model = cls(config, *saved["feature_shape"], preset=saved["preset"], unet=unet, vae=vae)
        model.resampler.load_state_dict(
            {k: v.float() for k, v in load_file(str(folder / "resampler" / "model.safetensors")).items()}
        )
        model.negative_features.copy_(load_file(str(folder / NEGATIVE))["negative_features"])
        model.sample_scheduler = EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        return model.eval()


def _quietly(action):
    """Run `action` with diffusers' logging at errors only (its fp16-cast notice does not apply to a copy)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return action()
    finally:
        diffusers_logging.set_verbosity(verbosity)


def parameter_counts(model: Detokenizer) -> dict[str, dict[str, int]]:
    counts = {}
    for name in ("resampler", "unet", "vae"):
        params = list(getattr(model, name).parameters())
        counts[f"detokenizer.{name}"] = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }
    return counts
