"""The sampler's inputs as the release makes them: the time-shifted sigmas and the starting noise.

**Timestep shift.** FLUX-dev shifts its flow-matching sigmas by ``σ' = e^μ / (e^μ + 1/σ − 1)``, with ``μ``
linear in a token count: 0.5 at 256 tokens, 1.15 at 4096. diffusers' ``FluxPipeline`` counts the image's
tokens, ``(H/16)·(W/16)`` (4096 at 1024²). The release's inference counts ``(W//8)·(H//8) // (16·16)``
(64 at 1024²), so it shifts far less (μ ≈ 0.4675 instead of 1.15 at 1024²). Its training uses the true count.

The shift multiplies the odds ``σ/(1 − σ)`` by ``e^μ``, so shifting by ``a`` and then by ``b`` equals one
shift by ``a + b``. ``FluxPipeline`` has no ``mu`` argument, but it takes ``sigmas`` and shifts them by its
own ``μ_flux``: passing the unshifted sigmas pre-shifted by ``μ_release − μ_flux`` makes the scheduler end on
exactly the release's sigmas, through ``FluxPipeline``'s own denoising loop.

**Noise.** The release draws the starting latents ``[B, 16, 2⌈H/16⌉, 2⌈W/16⌉]`` with
``torch.randn(..., device=device, dtype=model dtype, generator=torch.Generator(device).manual_seed(seed))``
and packs them 2×2 into tokens as diffusers does. ``FluxPipeline`` given a CPU generator draws on the CPU,
which on CUDA is a different random stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: Values of ``timestep_shift``: the release's inference shift, or diffusers' FluxPipeline's (true token count).
TIMESTEP_SHIFTS = ("release", "flux")
#: Values of ``noise``: drawn as the release does (on the device, model dtype), or by FluxPipeline from a CPU
#: generator.
NOISE_MODES = ("release", "cpu")
#: The release's linear μ: (256 tokens, 0.5) → (4096 tokens, 1.15), hard-coded in its ``get_schedule``.
RELEASE_SHIFT_POINTS = (256, 0.5, 4096, 1.15)


def _lin_mu(tokens: float, x1: float, y1: float, x2: float, y2: float) -> float:
    return y1 + (y2 - y1) / (x2 - x1) * (tokens - x1)


def release_tokens(height: int, width: int) -> int:
    """The token count the release's inference feeds to its time shift: ``(W//8)·(H//8) // 256``."""
    return (int(width) // 8) * (int(height) // 8) // (16 * 16)


def release_mu(height: int, width: int) -> float:
    """The release's μ for an ``height`` × ``width`` image (0.4675 at 1024²)."""
    return _lin_mu(release_tokens(height, width), *RELEASE_SHIFT_POINTS)


def flux_mu(height: int, width: int, scheduler_config: Any) -> float:
    """FluxPipeline's μ: the image token count ``(H//16)·(W//16)`` on the scheduler's line (1.15 at 1024²)."""
    cfg = scheduler_config
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d: getattr(cfg, k, d))
    tokens = (int(height) // 16) * (int(width) // 16)
    return _lin_mu(tokens, get("base_image_seq_len", 256), get("base_shift", 0.5),
                   get("max_image_seq_len", 4096), get("max_shift", 1.15))


def scheduler_mu(height: int, width: int, scheduler_config: Any) -> float:
    """The μ the scheduler applies inside FluxPipeline: :func:`flux_mu` with dynamic shifting, else
    ``ln(shift)`` (a fixed ``shift·σ / (1 + (shift − 1)·σ)`` also multiplies the odds, by ``shift``)."""
    cfg = scheduler_config
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d: getattr(cfg, k, d))
    if get("use_dynamic_shifting", False):
        return flux_mu(height, width, cfg)
    return math.log(float(get("shift", 1.0)))


def time_shift(mu: float, sigmas: np.ndarray | Sequence[float]) -> np.ndarray:
    """FLUX's exponential time shift ``e^μ / (e^μ + 1/σ − 1)`` (float64; σ = 0 stays 0)."""
    s = np.asarray(sigmas, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(s > 0, math.exp(mu) / (math.exp(mu) + 1.0 / s - 1.0), 0.0)


def base_sigmas(num_inference_steps: int) -> np.ndarray:
    """The unshifted sigmas FluxPipeline starts from: ``linspace(1, 1/N, N)`` (= the release's
    ``linspace(1, 0, N + 1)`` without its final 0)."""
    return np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)


def release_sigmas(height: int, width: int, num_inference_steps: int) -> np.ndarray:
    """The release's shifted sigmas (without the final 0), float64 — for docs and comparisons."""
    return time_shift(release_mu(height, width), base_sigmas(num_inference_steps))


def check_shift_scheduler(scheduler: Any) -> None:
    """``timestep_shift="release"`` needs a flow-matching scheduler whose own shift multiplies the odds (FLUX's
    exponential dynamic shift, or a fixed ``shift``) and changes nothing else."""
    cfg = scheduler.config
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    problems = []
    if get("use_dynamic_shifting", False) and get("time_shift_type", "exponential") != "exponential":
        problems.append(f"time_shift_type is {get('time_shift_type')!r}")
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                "use_flow_sigmas", "invert_sigmas"):
        if get(key, None):
            problems.append(f"{key} is set")
    if problems:
        raise ValueError(f"timestep_shift='release' reproduces FLUX-dev's dynamic time shift, but the scheduler "
                         f"({type(scheduler).__name__}) differs: {'; '.join(problems)}. Use timestep_shift='flux'.")


def pipeline_sigmas(timestep_shift: str, height: int, width: int, num_inference_steps: int, scheduler: Any,
                    sigmas: Sequence[float] | None = None) -> list[float] | None:
    """What to pass as ``FluxPipeline(sigmas=...)`` so its scheduler ends on ``timestep_shift``'s sigmas.

    ``"flux"``: ``sigmas`` unchanged (``None`` → FluxPipeline's own). ``"release"``: the unshifted sigmas
    (``sigmas`` or ``linspace(1, 1/N, N)``) pre-shifted by ``μ_release − μ_flux``; the scheduler's shift by
    ``μ_flux`` then lands on the release's shift by ``μ_release``.
    """
    if timestep_shift not in TIMESTEP_SHIFTS:
        raise ValueError(f"`timestep_shift` must be one of {', '.join(TIMESTEP_SHIFTS)}, got {timestep_shift!r}")
    if timestep_shift == "flux":
        return None if sigmas is None else list(sigmas)
    check_shift_scheduler(scheduler)
    base = base_sigmas(num_inference_steps) if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    delta = release_mu(height, width) - scheduler_mu(height, width, scheduler.config)
    return time_shift(delta, base).tolist()


def release_latents(batch: int, channels: int, height: int, width: int, generator: Any, device: Any,
                    dtype: torch.dtype) -> torch.Tensor:
    """The starting noise as the release draws it, packed into FluxPipeline's tokens ``[B, (H/16)(W/16), 4C]``.

    ``torch.randn([B, C, 2⌈H/16⌉, 2⌈W/16⌉], generator, device=<the generator's device>, dtype)`` — with the
    release's ``torch.Generator(device).manual_seed(seed)`` on the execution device, this is its noise — then
    moved to ``device``. A list of generators draws one image each.
    """
    h, w = 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)
    gens = generator if isinstance(generator, list) else [generator]
    if len(gens) not in (1, batch):
        raise ValueError(f"{len(gens)} generators for {batch} images")
    if len(gens) == 1:
        parts = [torch.randn((batch, channels, h, w), generator=gens[0], device=gens[0].device, dtype=dtype)]
    else:
        parts = [torch.randn((1, channels, h, w), generator=g, device=g.device, dtype=dtype) for g in gens]
    x = torch.cat([p.to(device) for p in parts])
    # pack 2×2 patches: b c (h ph) (w pw) -> b (h w) (c ph pw), as the release's prepare and FluxPipeline do
    x = x.view(batch, channels, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(batch, (h // 2) * (w // 2), channels * 4)
