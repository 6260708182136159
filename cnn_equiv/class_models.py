"""Class models: the image a CNN scores highest for a class, and the DRM's most probable one.

Simonyan et al.'s class model against the DRM's *MAP rendering* of a class.
`maximize_class_score` does gradient ascent on S_c(x) - l2 ||x||^2 on the torch CNN. In the DRM
(eq. 4-5, with z_CNN(x) the max-sum latents of x)

    S_c(x) - ||x||^2 / (2 sigma^2) = log p(x, c, z_CNN(x)) + log Z + (D/2) log(2 pi sigma^2),

so with l2 = 1/(2 sigma^2) Simonyan's objective *is* the log-joint at the CNN's latents, and one
gradient step with lr = sigma^2 is exactly x <- mu(c, z_CNN(x)): the rendering of the class with
the latents the CNN reads off x. `map_rendering` does the same alternation with a better z-step:
x <- mu(c, z) (the arg-max over x of log p(x, c, z)) and z <- `drm.refine.refine_latents`
(coordinate ascent over z given x), so log p(x, c, z) never decreases; since
max_x log p(x, c, z) = log p(c, z) + const, the result is a local maximum of the CNN prior
p(c, z) over z, rendered. It starts by default from `default_latents` (every switch ON, every
pooled unit on its window's first cell).

References:
    Simonyan, Vedaldi, Zisserman, Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps, ICLR Workshop 2014.
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cnn_equiv.cnn import cnn_input_shape
from drm import sampling
from drm.checks import (
    check_classes,
    check_images,
    check_int_at_least,
    check_latents,
    check_model,
    check_nonnegative,
    check_unit_indices,
    dtype_device,
)
from drm.inference import walk_up
from drm.model import DeepRenderingModel, Latents, gaussian_log_joint, unchecked_rendering_terms
from drm.refine import coordinate_ascent


class ClassScoreMaximization(NamedTuple):
    """Result of `maximize_class_score`.

    Attributes:
        image: (B, C0, H, W) the last iterate.
        trace: (steps + 1, B) the penalised score S_c(x_t) - l2 ||x_t||^2 at every iterate.
    """

    image: Tensor
    trace: Tensor


def maximize_class_score(
    cnn: nn.Module,
    c: Tensor | int,
    steps: int = 100,
    lr: float = 0.1,
    l2: float = 0.5,
    shape: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    init_scale: float = 0.01,
    start: Tensor | None = None,
) -> ClassScoreMaximization:
    """Simonyan et al.'s class model: gradient ascent on S_c(x) - l2 ||x||^2 from small noise.

    x_{t+1} = x_t + lr * grad_x (S_c(x_t) - l2 ||x_t||^2), S_c the CNN's logit of class c. For
    the CNN of a DRM with l2 = 1/(2 sigma^2), the objective is log p(x, c, z_CNN(x)) + log Z +
    (D/2) log(2 pi sigma^2), and a step with lr = sigma^2 is x <- mu(c, z_CNN(x)) (module
    docstring). Steps can lower the objective where they cross a ReLU / pooling boundary; within
    one linear region, lr <= 1/l2 never does.

    Args:
        cnn: a torch module mapping (B, C0, H, W) images to (B, C) logits (in eval mode).
        c: the class of each image, (B,) int64, or one int (B = 1 unless `start` is given).
        steps: number of ascent steps (>= 0).
        lr: step size (> 0).
        l2: weight of the L2 penalty (>= 0).
        shape: (C0, H, W); default `cnn.input_shape` of an `EquivalentCNN`, or `start`'s.
        generator: CPU generator for the initial noise (drawn on the CPU, then moved).
        init_scale: standard deviation of the initial noise.
        start: (B, C0, H, W) the starting images instead of noise.

    Returns:
        `ClassScoreMaximization(image, trace)`.
    """
    if not isinstance(cnn, nn.Module):
        raise TypeError(f"cnn must be a torch nn.Module, got {type(cnn).__name__}")
    steps = check_int_at_least(steps, "steps", minimum=0)
    lr = check_nonnegative(lr, "lr", positive=True)
    l2 = check_nonnegative(l2, "l2")
    init_scale = check_nonnegative(init_scale, "init_scale")
    dtype, device = dtype_device(cnn)
    if start is not None:
        if not isinstance(start, Tensor) or start.ndim != 4:
            raise TypeError("start must be a (B, C0, H, W) tensor")
        x = start.detach().to(device, dtype).clone()
    else:
        dims = cnn_input_shape(cnn, shape)
        batch = c.shape[0] if isinstance(c, Tensor) and c.ndim == 1 else 1
        noise = torch.randn(batch, *dims, generator=generator, dtype=torch.float64)
        x = (init_scale * noise).to(device, dtype)
    batch = x.shape[0]
    with torch.no_grad():
        num_classes = cnn(x[:1]).shape[1]
    classes = check_unit_indices(c, num_classes, batch, device)

    def objective(image: Tensor) -> Tensor:
        score = cnn(image).gather(1, classes[:, None])[:, 0]
        return score - l2 * (image**2).flatten(1).sum(1)

    trace = []
    with torch.enable_grad():
        for _ in range(steps):
            image = x.requires_grad_(True)
            value = objective(image)
            (grad,) = torch.autograd.grad(value.sum(), image)
            trace.append(value.detach())
            x = (image + lr * grad).detach()
    with torch.no_grad():
        trace.append(objective(x))
    return ClassScoreMaximization(x, torch.stack(trace))


class MapRendering(NamedTuple):
    """Result of `map_rendering`.

    Attributes:
        image: (B, C0, H, W) mu(c, z), the most probable image given the final latents.
        latents: the final latents of B images.
        trace: (T + 1, B) log p(mu_t, c, z_t) + log Z after each improving iteration (t = 0 is
            the start); strictly increasing in t while the latents change.
        steps: T, the number of iterations that changed the latents.
        converged: True when the last iteration changed nothing (a fixed point: x = mu(c, z) and
            no level's latent can be changed alone to raise log p(x, c, z)).
    """

    image: Tensor
    latents: Latents
    trace: Tensor
    steps: int
    converged: bool


def default_latents(model: DeepRenderingModel, batch: int) -> Latents:
    """Every level's `default_latent` (every switch ON, every pooled unit on the first cell of
    its window) for `batch` images; `drm.sampling.default_latents` after a check of the model."""
    return sampling.default_latents(check_model(model), batch)


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return a is None if b is None else a is not None and torch.equal(a, b)


def map_rendering(
    model: DeepRenderingModel,
    c: Tensor | int,
    steps: int = 50,
    start: Tensor | Latents | None = None,
    max_sweeps: int = 20,
) -> MapRendering:
    """The DRM's most probable image of class c, by alternating maximisation over x and z.

    x <- mu(c, z) = argmax_x log p(x, c, z); z <- `refine_latents(model, x, c, z)` (coordinate
    ascent over the latents, level by level). Each half-step can only raise log p(x, c, z); the
    loop stops at a fixed point or after `steps` iterations. At x = mu(c, z),
    log p(x, c, z) + log Z = log pi_c + ||mu||^2 / (2 sigma^2) + sum <b, g> - (D/2) log(2 pi
    sigma^2), the CNN prior log p(c, z) up to a constant, so the result is a coordinate-wise local
    maximum over z of the CNN prior, rendered. Computed without autograd.

    Args:
        model: the rendering model.
        c: (B,) int64 classes, or one int for every image.
        steps: the most iterations to run (>= 0).
        start: where z starts: None (every switch ON, every pooled unit on its window's first
            cell), images (B, C0, H, W) (their CNN latents, `drm.max_sum`), or latents of B images.
        max_sweeps: passed to `refine_latents` for each z-step.

    Returns:
        `MapRendering(image, latents, trace, steps, converged)`.
    """
    model = check_model(model)
    steps = check_int_at_least(steps, "steps", minimum=0)
    max_sweeps = check_int_at_least(max_sweeps, "max_sweeps")
    with torch.no_grad():
        if start is None:
            batch = c.shape[0] if isinstance(c, Tensor) and c.ndim == 1 else 1
            latents = default_latents(model, batch)
        elif isinstance(start, Tensor):
            start = check_images(model, start, "start")
            batch = start.shape[0]
            latents = walk_up(model, start).latents
        elif isinstance(start, (tuple, list)):
            sizes = [z.shape[0] for z in start if isinstance(z, Tensor)]
            batch = sizes[0] if sizes else (c.shape[0] if isinstance(c, Tensor) else 1)
            latents = check_latents(model, start, batch)
        else:
            raise TypeError(f"start must be None, images or latents, got {type(start).__name__}")
        if isinstance(c, int) and not isinstance(c, bool):
            c = torch.full((batch,), c, dtype=torch.long, device=model.device)
        classes = check_classes(model, c, batch)

        def rendered(z: Latents) -> tuple[Tensor, Tensor]:
            mu, log_prior = unchecked_rendering_terms(model, classes, z)
            return mu, gaussian_log_joint(model, mu, mu, log_prior)

        mu, value = rendered(latents)
        trace = [value]
        converged = False
        done = 0
        for _ in range(steps):
            refined, _, _ = coordinate_ascent(model, mu, classes, latents, max_sweeps)
            if all(_same(a, b) for a, b in zip(refined, latents, strict=True)):
                converged = True
                break
            latents = refined
            mu, value = rendered(latents)
            trace.append(value)
            done += 1
    return MapRendering(mu, latents, torch.stack(trace), done, converged)


__all__ = [
    "ClassScoreMaximization",
    "MapRendering",
    "default_latents",
    "map_rendering",
    "maximize_class_score",
]
