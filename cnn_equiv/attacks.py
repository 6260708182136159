"""Breaking the CNN: gradient attacks, fooling with a rendered template, fooling images.

The neural-net view is attacked with the lecture's recipes ("Breaking CNNs"):

    fgsm(classifier, x, y, epsilon)                  one signed-gradient step (Goodfellow 2015)
    iterative_attack(classifier, x, y, eps, step, n) projected signed-gradient steps (BIM / PGD)
    fool_with_template(model, x, target, alpha)      x + alpha * (rendered template of `target`)
    minimal_template_alpha(model, x, target)         the smallest such alpha that flips the class
    fooling_images(classifier, target, steps)        noise pushed up log softmax (Nguyen 2015)

`classifier` is a `DeepRenderingModel` (scored by `drm.max_sum`, which is its CNN's forward pass,
E2) or any torch module mapping images (B, C0, H, W) to logits (B, C). The template attack is the
lecture's "fooling a linear classifier" (x <- x + alpha w) where the weight vector w of class c is
replaced by the DRM's rendering of c with the image's own latents: by E6 that rendering is
sigma^2 times the input gradient of the logit of c, the weight vector of the CNN frozen at those
latents. What the rendering model then sees in the broken images is `cnn_equiv.detection`.

References:
    Szegedy et al., Intriguing Properties of Neural Networks, ICLR 2014.
    Goodfellow, Shlens, Szegedy, Explaining and Harnessing Adversarial Examples, ICLR 2015.
    Kurakin, Goodfellow, Bengio, Adversarial Examples in the Physical World, ICLR 2017 workshop.
    Madry, Makelov, Schmidt, Tsipras, Vladu, Towards Deep Learning Models Resistant to
    Adversarial Attacks, ICLR 2018.
    Karpathy, Breaking Linear Classifiers on ImageNet, blog post, 2015
    (http://karpathy.github.io/2015/03/30/breaking-convnets/).
    Nguyen, Yosinski, Clune, Deep Neural Networks are Easily Fooled: High Confidence Predictions
    for Unrecognizable Images, CVPR 2015.
    Simonyan, Vedaldi, Zisserman, Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps, ICLR 2014 workshop (gradient ascent, L2 penalty).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnn_equiv.cnn import input_shape_of
from drm.checks import (
    PixelRange,
    check_alphas,
    check_attack_labels,
    check_batch,
    check_classes,
    check_classifier,
    check_images,
    check_int_at_least,
    check_labels,
    check_nonnegative,
    check_pixel_range,
    dtype_device,
)
from drm.inference import latents_or_max_sum, max_sum
from drm.model import DeepRenderingModel, Latents, unchecked_rendering_terms

# --- the classifier as a function --------------------------------------------------------------


def logits_of(classifier: nn.Module, x: Tensor) -> Tensor:
    """The classifier's logits (B, C) for images x (B, C0, H, W), differentiable in x.

    A `DeepRenderingModel` is scored by `drm.max_sum` (its CNN's forward pass, E2); any other
    module is called.
    """
    if isinstance(classifier, DeepRenderingModel):
        logits = max_sum(classifier, x)[0]
    else:
        logits = classifier(x)
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"the classifier must return logits (B, C) = ({x.shape[0]}, C), got {shape}"
        )
    return logits


def _loss_gradient(classifier: nn.Module, x: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """The gradient in x of the summed cross-entropy (negated when targeted): (B, C0, H, W).

    The ascent direction of every attack: raise the loss of the true class, or lower that of the
    target.
    """
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        logits = logits_of(classifier, xg)
        if labels.numel() and (int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0):
            raise ValueError(
                f"labels must lie in [0, {logits.shape[1]}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        loss = F.cross_entropy(logits, labels.to(logits.device), reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    return -grad if targeted else grad


def _clamped(x: Tensor, clamp: PixelRange) -> Tensor:
    return x if clamp is None else x.clamp(clamp[0], clamp[1])


# --- gradient attacks --------------------------------------------------------------------------


def fgsm(
    classifier: nn.Module,
    x: Tensor,
    y: Tensor | None,
    epsilon: float,
    *,
    target: Tensor | None = None,
    clamp: PixelRange = (0.0, 1.0),
) -> Tensor:
    """The fast gradient sign method: one step of size epsilon along the loss gradient's sign.

    Untargeted: x + epsilon sign(d CE(logits, y) / dx). Targeted: x - epsilon sign(d CE(logits,
    target) / dx). Then clamped to the pixel range (which keeps it inside the L-infinity ball).

    Args:
        classifier: a `DeepRenderingModel` or a torch CNN (eval mode) returning logits (B, C).
        x: (B, C0, H, W) clean images, inside the pixel range `clamp`.
        y: (B,) int64 true labels; may be None when `target` is given (otherwise only checked).
        epsilon: the L-infinity budget, >= 0.
        target: (B,) int64 target classes for a targeted attack.
        clamp: the pixel range (low, high), or None.

    Returns:
        (B, C0, H, W) adversarial images, detached; pixels whose gradient is exactly 0 stay put.
    """
    classifier = check_classifier(classifier)
    x = check_batch(classifier, x)
    epsilon = check_nonnegative(epsilon, "epsilon")
    clamp = check_pixel_range(clamp, x)
    labels, targeted = check_attack_labels(y, target, x.shape[0])
    grad = _loss_gradient(classifier, x, labels, targeted)
    return _clamped(x.detach() + epsilon * grad.sign(), clamp)


def iterative_attack(
    classifier: nn.Module,
    x: Tensor,
    y: Tensor | None,
    epsilon: float,
    step: float,
    steps: int,
    *,
    target: Tensor | None = None,
    clamp: PixelRange = (0.0, 1.0),
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected signed-gradient ascent in the L-infinity ball: BIM, or PGD with a random start.

    x_0 = x (or x + U(-epsilon, epsilon) with `random_start`), then `steps` times
    x_{k+1} = Proj(x_k + step sign(grad)), where Proj clips to [x - epsilon, x + epsilon] and
    then to the pixel range (the exact projection onto their intersection, a box).

    Args:
        classifier, x, y, target, clamp: as for `fgsm`.
        epsilon: the L-infinity budget, >= 0.
        step: the step size, > 0 (BIM uses epsilon / steps or a little more).
        steps: number of steps, >= 1.
        random_start: start from a uniform point of the ball (Madry et al.'s PGD).
        generator: a CPU generator for the random start (drawn on the CPU, then moved).

    Returns:
        (B, C0, H, W) adversarial images, detached, with |x_adv - x| <= epsilon.
    """
    classifier = check_classifier(classifier)
    x = check_batch(classifier, x)
    epsilon = check_nonnegative(epsilon, "epsilon")
    step = check_nonnegative(step, "step", positive=True)
    steps = check_int_at_least(steps, "steps")
    clamp = check_pixel_range(clamp, x)
    labels, targeted = check_attack_labels(y, target, x.shape[0])
    clean = x.detach()
    low, high = clean - epsilon, clean + epsilon
    adversarial = clean.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float64) * 2 - 1
        adversarial = _clamped(clean + epsilon * noise.to(x.device, x.dtype), clamp)
    for _ in range(steps):
        grad = _loss_gradient(classifier, adversarial, labels, targeted)
        adversarial = adversarial + step * grad.sign()
        adversarial = _clamped(torch.minimum(torch.maximum(adversarial, low), high), clamp)
    return adversarial


# --- fooling with the rendered template of another class ---------------------------------------


def template_direction(
    model: DeepRenderingModel, x: Tensor, target: Tensor, latents: Latents | None = None
) -> Tensor:
    """The rendering of class `target` with the image's latents, scaled to unit L2 norm.

    mu(target, z*) = `drm.render(model, target, z*)` with z* the CNN's latents of x (E2): by E6
    it is sigma^2 times the input gradient of the target's logit, the weight vector of the CNN
    frozen at z*, so adding it is "fooling a linear classifier" (x <- x + alpha w) applied to the
    locally linear CNN.

    Args:
        x: (B, C0, H, W) images.
        target: (B,) int64 classes to render.
        latents: the latents to render with; default the CNN's latents of x (`drm.max_sum`).

    Returns:
        (B, C0, H, W), each image of L2 norm 1 (all zeros where the rendering is zero: then no
        amount of it changes anything).
    """
    x = check_images(model, x)
    target = check_classes(model, target, x.shape[0])
    with torch.no_grad():
        latents = latents_or_max_sum(model, x, latents)
        mu = unchecked_rendering_terms(model, target, latents)[0].detach()
        norm = mu.flatten(1).norm(dim=1)  # (B,)
        scale = torch.where(norm > 0, 1 / norm.clamp_min(torch.finfo(mu.dtype).tiny), 0)
        return mu * scale.view(-1, 1, 1, 1)


def fool_with_template(
    model: DeepRenderingModel,
    x: Tensor,
    target: Tensor,
    alpha: float | Tensor,
    *,
    latents: Latents | None = None,
    clamp: PixelRange = None,
) -> Tensor:
    """x + alpha * template: the lecture's "fooling a linear classifier" with a DRM rendering.

    Args:
        model: the rendering model (its CNN is the classifier being fooled).
        x: (B, C0, H, W) images.
        target: (B,) int64 classes whose template is added.
        alpha: the L2 norm of the added template: a number or (B,), >= 0.
        latents: the latents the template is rendered with; default the CNN's latents of x.
        clamp: clip the result to this pixel range (the clean images must lie inside), or None
            for the pure linear perturbation.

    Returns:
        (B, C0, H, W) images, detached.
    """
    x = check_images(model, x)
    clamp = check_pixel_range(clamp, x)
    direction = template_direction(model, x, target, latents)
    return _clamped(x.detach() + check_alphas(alpha, x).view(-1, 1, 1, 1) * direction, clamp)


def minimal_template_alpha(
    model: DeepRenderingModel,
    x: Tensor,
    target: Tensor,
    *,
    alpha_max: float | Tensor | None = None,
    tol: float = 1e-3,
    latents: Latents | None = None,
    clamp: PixelRange = None,
) -> Tensor:
    """The smallest alpha for which `fool_with_template` is classified as `target`, by bisection.

    The template (rendered once, with the clean image's latents) is fixed; the CNN re-infers its
    latents at every alpha. Bisection keeps lo (not `target`) and hi (`target`) per image and
    halves [lo, hi] until it is at most `tol` wide: hi is returned, a crossing point within tol of
    the boundary. For a model without switches and translations (linear logits) the set of alphas
    classified as `target` is an interval [alpha*, inf) and hi is within tol above alpha*; for a
    CNN it need not be an interval, and hi is then a crossing point, not certainly the smallest.

    Args:
        x: (B, C0, H, W) images.
        target: (B,) int64 target classes.
        alpha_max: the largest alpha tried (number or (B,)); default twice each image's L2 norm
            (at least 1): beyond it the image is more template than image.
        tol: the bisection's width, > 0.
        latents, clamp: as for `fool_with_template`.

    Returns:
        (B,) the alphas: 0 where x is already classified as `target`, inf where even alpha_max
        does not make it so.
    """
    x = check_images(model, x)
    target = check_classes(model, target, x.shape[0])
    clamp = check_pixel_range(clamp, x)
    tol = check_nonnegative(tol, "tol", positive=True)
    direction = template_direction(model, x, target, latents)
    with torch.no_grad():
        if alpha_max is None:
            hi = (2 * x.detach().flatten(1).norm(dim=1)).clamp_min(1.0)
        else:
            hi = check_alphas(alpha_max, x)
        lo = torch.zeros_like(hi)

        def is_target(alpha: Tensor) -> Tensor:
            moved = _clamped(x.detach() + alpha.view(-1, 1, 1, 1) * direction, clamp)
            return max_sum(model, moved)[0].argmax(1) == target

        already = is_target(lo)
        reachable = is_target(hi)
        widest = float(hi.max()) if hi.numel() else 0.0
        iterations = math.ceil(math.log2(widest / tol)) if widest > tol else 0
        for _ in range(iterations):
            mid = (lo + hi) / 2
            flips = is_target(mid)
            hi = torch.where(flips, mid, hi)
            lo = torch.where(flips, lo, mid)
        result = torch.where(reachable, hi, torch.full_like(hi, math.inf))
        return torch.where(already, torch.zeros_like(hi), result)


# --- fooling images ----------------------------------------------------------------------------


def fooling_images(
    classifier: nn.Module,
    target: Tensor,
    steps: int,
    *,
    step_size: float = 1.0,
    l2: float = 0.0,
    clamp: PixelRange = (0.0, 1.0),
    input_shape: tuple[int, int, int] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Images the classifier gives to `target` with high confidence, grown from uniform noise.

    Gradient ascent, `steps` times, on log softmax(logits)[target] - l2 ||x||^2 per image
    (Simonyan et al.'s class visualisation; Nguyen et al. evolve such images instead), clamped to
    the pixel range after each step. Nothing in the objective asks the image to look like a digit,
    and it does not: the classifier is confident, a human sees noise.

    Args:
        classifier: a `DeepRenderingModel` or a torch CNN (eval mode) returning logits (B, C).
        target: (B,) int64 the class of each image to make.
        steps: gradient steps, >= 0.
        step_size: > 0; the step is step_size times the gradient (not its sign).
        l2: weight of the L2 penalty, >= 0.
        clamp: the pixel range; the noise is uniform in it (in [0, 1] when None).
        input_shape: (C0, H, W); default the model's (a DRM, or a module with `input_shape`
            such as `cnn_equiv.to_cnn`'s).
        generator: a CPU generator for the starting noise (drawn on the CPU, then moved).

    Returns:
        (B, C0, H, W) images, detached, in the classifier's dtype and on its device.
    """
    classifier = check_classifier(classifier)
    steps = check_int_at_least(steps, "steps", minimum=0)
    step_size = check_nonnegative(step_size, "step_size", positive=True)
    l2 = check_nonnegative(l2, "l2")
    clamp = check_pixel_range(clamp)
    shape = input_shape_of(
        classifier,
        input_shape,
        "input_shape is required for a classifier without .input_shape",
        attribute=True,
    )
    if not isinstance(target, Tensor) or target.ndim != 1 or target.shape[0] == 0:
        raise ValueError("target must be a non-empty (B,) int64 tensor of classes")
    target = check_labels(target, target.shape[0], "target")
    dtype, device = dtype_device(classifier)
    low, high = clamp if clamp is not None else (0.0, 1.0)
    noise = torch.rand((target.shape[0], *shape), generator=generator, dtype=torch.float64)
    x = (low + (high - low) * noise).to(device, dtype)
    target = target.to(device)
    for _ in range(steps):
        with torch.enable_grad():
            xg = x.requires_grad_(True)
            logits = logits_of(classifier, xg)
            if int(target.max()) >= logits.shape[1] or int(target.min()) < 0:
                raise ValueError(f"target must lie in [0, {logits.shape[1]})")
            objective = F.log_softmax(logits, 1).gather(1, target[:, None]).sum()
            if l2 > 0:
                objective = objective - l2 * (xg**2).sum()
            (grad,) = torch.autograd.grad(objective, xg)
        x = _clamped(x.detach() + step_size * grad, clamp)
    return x.detach()


__all__ = [
    "PixelRange",
    "fgsm",
    "fool_with_template",
    "fooling_images",
    "iterative_attack",
    "logits_of",
    "minimal_template_alpha",
    "template_direction",
]
