"""Breaking the CNN, then asking the rendering model what it sees in the broken images.

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
latents.

The probabilistic view then reads each image (`drm_view`): the max-sum scores, the log-joint of
the MAP configuration, how well the rendering of the predicted class explains the pixels, and how
far greedy bottom-up inference is from the best configuration (the inference gap, E4: a lower
bound by top-down coordinate ascent, `drm.refine.refine_latents`, on any model; exact by
enumeration, `drm.exact_map`, on tiny ones). `detection_auc` and `detection_report` measure how
well each of those statistics separates adversarial from clean images (ROC AUC).

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
    Hanley, McNeil, The Meaning and Use of the Area under a ROC Curve, Radiology 143, 1982.
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnn_equiv._checks import check_count, check_nonnegative, dtype_device
from cnn_equiv.cnn import input_shape_of
from drm.inference import latents_or_max_sum, max_sum
from drm.model import (
    DeepRenderingModel,
    Latents,
    check_classes,
    check_images,
    gaussian_log_joint,
    logit_offset,
    render,
    rendering_terms,
)
from drm.reference import DEFAULT_MAX_CONFIGURATIONS, exact_map, num_configurations
from drm.refine import refine_latents

# A pixel range (low, high) that every image is clamped to, or None for no clamping.
PixelRange = tuple[float, float] | None
# An attack for `detection_report`: (model, x (B, C0, H, W), y (B,)) -> adversarial x.
Attack = Callable[[DeepRenderingModel, Tensor, Tensor], Tensor]

# Layers whose training mode changes what a torch classifier computes (batch statistics, random
# masks): an attack on them would attack a random function.
_TRAINING_DEPENDENT = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

# Each statistic of `drm_view` used for detection, with the sign that makes "larger = more
# suspicious": a low log-joint, a large reconstruction error, a large inference gap, a low
# confidence are what one expects of an image the model does not explain.
DETECTION_STATISTICS: dict[str, float] = {
    "log_joint": -1.0,
    "reconstruction_error": 1.0,
    "scaled_reconstruction_error": 1.0,
    "gap_lower_bound": 1.0,
    "max_softmax": -1.0,
}


# --- argument checks ---------------------------------------------------------------------------


def _check_classifier(classifier: object) -> nn.Module:
    if not isinstance(classifier, nn.Module):
        raise TypeError(
            "classifier must be a DeepRenderingModel or a torch nn.Module mapping images to "
            f"logits, got {type(classifier).__name__}"
        )
    if not isinstance(classifier, DeepRenderingModel):
        for name, module in classifier.named_modules():
            if isinstance(module, _TRAINING_DEPENDENT) and module.training:
                raise ValueError(
                    f"classifier layer {name or '<root>'} ({type(module).__name__}) is in "
                    "training mode, where its output is random or depends on the batch; call "
                    "classifier.eval() first"
                )
    return classifier


def _check_batch(classifier: nn.Module, x: object, name: str = "x") -> Tensor:
    if isinstance(classifier, DeepRenderingModel):
        return check_images(classifier, x, name)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_labels(labels: object, batch: int, name: str) -> Tensor:
    """(B,) int64; the range is checked against the logits in `_loss_gradient`."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.long:
        raise TypeError(f"{name} must be an int64 tensor, got dtype {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(labels.shape)}")
    return labels


def _check_range(clamp: object, x: Tensor | None = None) -> PixelRange:
    """A valid pixel range; the clean images `x` must already lie inside it."""
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"clamp must be None or a pair (low, high), got {clamp!r}")
    low, high = (float(v) for v in clamp)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"clamp must be finite with low < high, got {clamp!r}")
    if x is not None and x.numel():
        lowest, highest = float(x.detach().min()), float(x.detach().max())
        if lowest < low or highest > high:
            raise ValueError(
                f"the images span [{lowest:.4g}, {highest:.4g}], outside clamp=({low}, {high}): "
                "pass the images' pixel range as clamp, or clamp=None"
            )
    return (low, high)


def _attack_labels(y: Tensor | None, target: Tensor | None, batch: int) -> tuple[Tensor, bool]:
    """The labels whose cross-entropy the attack raises (y) or lowers (target)."""
    if y is None and target is None:
        raise ValueError("give the true labels y (untargeted attack) or a target (targeted)")
    if y is not None:
        y = _check_labels(y, batch, "y")
    if target is not None:
        return _check_labels(target, batch, "target"), True
    assert y is not None
    return y, False


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
    classifier = _check_classifier(classifier)
    x = _check_batch(classifier, x)
    epsilon = check_nonnegative(epsilon, "epsilon")
    clamp = _check_range(clamp, x)
    labels, targeted = _attack_labels(y, target, x.shape[0])
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
    classifier = _check_classifier(classifier)
    x = _check_batch(classifier, x)
    epsilon = check_nonnegative(epsilon, "epsilon")
    step = check_nonnegative(step, "step", positive=True)
    steps = check_count(steps, "steps")
    clamp = _check_range(clamp, x)
    labels, targeted = _attack_labels(y, target, x.shape[0])
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
        mu = render(model, target, latents).detach()
        norm = mu.flatten(1).norm(dim=1)  # (B,)
        scale = torch.where(norm > 0, 1 / norm.clamp_min(torch.finfo(mu.dtype).tiny), 0)
        return mu * scale.view(-1, 1, 1, 1)


def _alphas(alpha: float | Tensor, x: Tensor) -> Tensor:
    """alpha as a (B,) tensor of x's dtype and device, checked >= 0 and finite."""
    if isinstance(alpha, Tensor):
        if alpha.ndim == 0:
            alpha = alpha.expand(x.shape[0])
        if alpha.shape != (x.shape[0],):
            raise ValueError(f"alpha must be a number or ({x.shape[0]},), got {tuple(alpha.shape)}")
        values = alpha.detach().to(x.device, x.dtype)
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError("alpha must be finite and >= 0")
        return values
    return x.new_full((x.shape[0],), check_nonnegative(alpha, "alpha"))


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
    clamp = _check_range(clamp, x)
    direction = template_direction(model, x, target, latents)
    return _clamped(x.detach() + _alphas(alpha, x).view(-1, 1, 1, 1) * direction, clamp)


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
    clamp = _check_range(clamp, x)
    tol = check_nonnegative(tol, "tol", positive=True)
    direction = template_direction(model, x, target, latents)
    with torch.no_grad():
        if alpha_max is None:
            hi = (2 * x.detach().flatten(1).norm(dim=1)).clamp_min(1.0)
        else:
            hi = _alphas(alpha_max, x)
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
    classifier = _check_classifier(classifier)
    steps = check_count(steps, "steps", minimum=0)
    step_size = check_nonnegative(step_size, "step_size", positive=True)
    l2 = check_nonnegative(l2, "l2")
    clamp = _check_range(clamp)
    shape = input_shape_of(
        classifier,
        input_shape,
        "input_shape is required for a classifier without .input_shape",
        attribute=True,
    )
    if not isinstance(target, Tensor) or target.ndim != 1 or target.shape[0] == 0:
        raise ValueError("target must be a non-empty (B,) int64 tensor of classes")
    target = _check_labels(target, target.shape[0], "target")
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


# --- what the rendering model sees -------------------------------------------------------------


@dataclass(frozen=True)
class DRMView:
    """How the DRM sees a batch of B images (every tensor detached).

    Attributes:
        scores: (B, C) max-sum scores, the CNN's logits.
        predicted: (B,) the arg-max class.
        classes: (B,) the class each image is explained as (default `predicted`).
        max_softmax: (B,) the largest softmax probability of the scores.
        log_joint: (B,) log p(x, c, z*) + log Z at the CNN's latents z* for `classes`
            (`drm.log_joint`; equals score_c - `drm.logit_offset(x)`, E1).
        rendering: (B, C0, H, W) mu(c, z*) = sigma^2 h^(0) (`drm.render`).
        reconstruction_error: (B,) ||x - mu(c, z*)||^2. Its scale follows sigma^2: the CNN fixes
            h^(0) (the input gradient, E6) but not sigma^2 (eq. 17), which `to_drm` chooses.
        render_scale: (B,) s* = <x, mu> / ||mu||^2, the least-squares scale of the rendering
            (0 where mu = 0); unconstrained, so negative when x and mu point apart.
        scaled_reconstruction_error: (B,) min_s ||x - s mu||^2 = ||x||^2 - <x, mu>^2 / ||mu||^2,
            independent of sigma^2: how much of x the rendering's direction leaves unexplained.
        gap_lower_bound: (B,) score of `drm.refine.refine_latents` (top-down coordinate ascent
            from z*) minus the max-sum score: >= 0 (up to rounding) and <= the exact gap (E4).
        refine_sweeps: sweeps the refinement ran.
        exact_gap: (B,) max_z score - max-sum score for `classes` by enumeration
            (`drm.exact_map`), or None when the model is too large.
    """

    scores: Tensor
    predicted: Tensor
    classes: Tensor
    max_softmax: Tensor
    log_joint: Tensor
    rendering: Tensor
    reconstruction_error: Tensor
    render_scale: Tensor
    scaled_reconstruction_error: Tensor
    gap_lower_bound: Tensor
    refine_sweeps: int
    exact_gap: Tensor | None = None

    def statistic(self, name: str) -> Tensor:
        """One of `DETECTION_STATISTICS` by name: (B,)."""
        if name not in DETECTION_STATISTICS:
            raise ValueError(
                f"statistic must be one of {sorted(DETECTION_STATISTICS)}, got {name!r}"
            )
        value = getattr(self, name)
        assert isinstance(value, Tensor)
        return value


def drm_view(
    model: DeepRenderingModel,
    x: Tensor,
    classes: Tensor | None = None,
    *,
    exact: bool | None = None,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
    max_sweeps: int = 20,
) -> DRMView:
    """What the rendering model sees in each image of a batch.

    Args:
        x: (B, C0, H, W) images.
        classes: (B,) int64 the class to explain each image as; default the max-sum prediction.
        exact: compute the exact inference gap by enumeration; default when the model has at
            most `max_configurations` latent configurations (`drm.num_configurations`).
        max_sweeps: the refinement's sweep limit (`drm.refine.refine_latents`).

    Returns:
        A `DRMView` of (B,) tensors (and the (B, C) scores, (B, C0, H, W) renderings).
    """
    x = check_images(model, x).detach()
    max_sweeps = check_count(max_sweeps, "max_sweeps")
    with torch.no_grad():
        scores, latents = max_sum(model, x)
        scores = scores.detach()
        predicted = scores.argmax(1)
        classes = predicted if classes is None else check_classes(model, classes, x.shape[0])
        chosen = scores.gather(1, classes[:, None])[:, 0]  # (B,)
        # one top-down pass for both the rendering and the log-joint (`drm.log_joint`)
        mu, log_prior = rendering_terms(model, classes, latents)
        joint = gaussian_log_joint(model, x, mu, log_prior).detach()
        mu = mu.detach()
        flat_x, flat_mu = x.flatten(1), mu.flatten(1)  # (B, D)
        error = ((flat_x - flat_mu) ** 2).sum(1)
        energy = (flat_mu**2).sum(1)
        inner = (flat_x * flat_mu).sum(1)
        scale = torch.where(energy > 0, inner / energy.clamp_min(torch.finfo(x.dtype).tiny), 0)
        # ||x - s mu||^2 directly (not ||x||^2 - <x, mu>^2 / ||mu||^2: no cancellation)
        scaled_error = ((flat_x - scale[:, None] * flat_mu) ** 2).sum(1)
        _, refined, sweeps = refine_latents(model, x, classes, latents, max_sweeps=max_sweeps)
        gap_bound = refined.detach() - chosen
        exact_gap = None
        total = num_configurations(model)
        if exact if exact is not None else total <= max_configurations:
            best, _ = exact_map(model, x, max_configurations=max(total, max_configurations))
            best_c = best.gather(1, classes[:, None])[:, 0]
            exact_gap = (best_c + logit_offset(model, x) - chosen).detach()
    return DRMView(
        scores=scores,
        predicted=predicted,
        classes=classes,
        max_softmax=torch.softmax(scores, 1).max(1).values,
        log_joint=joint,
        rendering=mu,
        reconstruction_error=error,
        render_scale=scale,
        scaled_reconstruction_error=scaled_error,
        gap_lower_bound=gap_bound,
        refine_sweeps=sweeps,
        exact_gap=exact_gap,
    )


# --- detection ---------------------------------------------------------------------------------


def _check_statistic(values: object, name: str) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.ndim != 1 or values.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    if values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got dtype {values.dtype}")
    values = values.detach().to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return values


def detection_auc(clean_scores: Tensor, adversarial_scores: Tensor) -> float:
    """ROC AUC of a statistic that is larger on adversarial images: P(adv > clean) + P(tie) / 2.

    The Mann-Whitney rank formula: with average ranks r over the pooled values (ties share their
    mean rank), AUC = (sum of the adversarial ranks - n1 (n1 + 1) / 2) / (n0 n1). 0.5 means no
    separation, 1 perfect, 0 perfect the other way round.

    Args:
        clean_scores: (n0,) the statistic on clean images.
        adversarial_scores: (n1,) the statistic on adversarial images (the positives).

    Returns:
        The AUC, a float in [0, 1].
    """
    clean = _check_statistic(clean_scores, "clean_scores")
    adversarial = _check_statistic(adversarial_scores, "adversarial_scores").to(clean.device)
    pooled = torch.cat([clean, adversarial])  # (n0 + n1,)
    _, group, counts = torch.unique(pooled, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).to(torch.float64)  # 1-based rank of each tie group's last member
    ranks = (last - (counts - 1).to(torch.float64) / 2)[group]  # average rank of every value
    n0, n1 = clean.shape[0], adversarial.shape[0]
    u = ranks[n0:].sum() - n1 * (n1 + 1) / 2
    return float(u / (n0 * n1))


def default_attacks(
    epsilon: float = 0.1, steps: int = 10, clamp: PixelRange = (0.0, 1.0)
) -> dict[str, Attack]:
    """The attacks of `detection_report`: FGSM, BIM and the minimal template attack.

    "fgsm": `fgsm` with budget epsilon; "iterative": `iterative_attack` with the same budget,
    step epsilon / 4 and `steps` steps; "template": `fool_with_template` toward the runner-up
    class with `minimal_template_alpha` (inf, i.e. unreachable, leaves the image unchanged).
    """
    epsilon = check_nonnegative(epsilon, "epsilon", positive=True)
    steps = check_count(steps, "steps")
    clamp = _check_range(clamp)

    def fgsm_attack(model: DeepRenderingModel, x: Tensor, y: Tensor) -> Tensor:
        return fgsm(model, x, y, epsilon, clamp=clamp)

    def iterative(model: DeepRenderingModel, x: Tensor, y: Tensor) -> Tensor:
        return iterative_attack(model, x, y, epsilon, epsilon / 4, steps, clamp=clamp)

    def template(model: DeepRenderingModel, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            scores, latents = max_sum(model, x)  # the clean images' inference, run once
            runner_up = scores.topk(2, dim=1).indices[:, 1]
        alpha = minimal_template_alpha(model, x, runner_up, latents=latents, clamp=clamp)
        alpha = torch.where(torch.isfinite(alpha), alpha, torch.zeros_like(alpha))
        return fool_with_template(model, x, runner_up, alpha, latents=latents, clamp=clamp)

    return {"fgsm": fgsm_attack, "iterative": iterative, "template": template}


@dataclass(frozen=True)
class DetectionReport:
    """Clean against attacked images, through the DRM's eyes.

    Attributes:
        auc: attack -> statistic -> ROC AUC of the statistic signed as in `DETECTION_STATISTICS`
            (larger = more suspicious), adversarial images as positives; nan when a set is empty.
        accuracy: "clean" and each attack -> accuracy of the CNN on the batch.
        counts: "clean" and each attack -> images in the set the AUC compares.
        views: "clean" and each attack -> the `DRMView` of all B images.
    """

    auc: dict[str, dict[str, float]]
    accuracy: dict[str, float]
    counts: dict[str, int]
    views: dict[str, DRMView]

    def to_text(self) -> str:
        """A table: one row per attack, its accuracy, set size and AUC per statistic."""
        names = list(DETECTION_STATISTICS)
        header = ["attack", "accuracy", "n"] + names
        rows = [["clean", f"{self.accuracy['clean']:.3f}", str(self.counts["clean"])]]
        rows[0] += ["" for _ in names]
        for attack, aucs in self.auc.items():
            rows.append(
                [attack, f"{self.accuracy[attack]:.3f}", str(self.counts[attack])]
                + ["n/a" if math.isnan(aucs[name]) else f"{aucs[name]:.3f}" for name in names]
            )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
            for row in [header, *rows]
        ]
        return "\n".join(line.rstrip() for line in lines)


def detection_report(
    model: DeepRenderingModel,
    x: Tensor,
    y: Tensor,
    attacks: Mapping[str, Attack] | None = None,
    *,
    only_successful: bool = True,
    max_sweeps: int = 20,
) -> DetectionReport:
    """Attack a batch, look at clean and attacked images with `drm_view`, and score detectors.

    Args:
        model: the rendering model (its CNN is attacked).
        x: (B, C0, H, W) clean images.
        y: (B,) int64 true labels.
        attacks: name -> attack(model, x, y) -> adversarial x; default `default_attacks()`.
        only_successful: compare correctly classified clean images with the attacked images that
            were correctly classified before and are misclassified after (the usual protocol);
            False compares all B clean with all B attacked images.
        max_sweeps: passed to `drm_view`.

    Returns:
        A `DetectionReport`. The exact gap is not computed (models worth attacking are too large
        to enumerate).
    """
    x = check_images(model, x).detach()
    y = check_classes(model, _check_labels(y, x.shape[0], "y"), x.shape[0])
    attacks = default_attacks() if attacks is None else attacks
    clean_view = drm_view(model, x, exact=False, max_sweeps=max_sweeps)
    correct = clean_view.predicted == y
    views = {"clean": clean_view}
    accuracy = {"clean": float(correct.double().mean())}
    counts = {"clean": int(correct.sum()) if only_successful else x.shape[0]}
    auc: dict[str, dict[str, float]] = {}
    for name, attack in attacks.items():
        if name == "clean":
            raise ValueError("'clean' is reserved for the clean images: rename that attack")
        adversarial = attack(model, x, y)
        view = drm_view(
            model,
            check_images(model, adversarial, name).detach(),
            exact=False,
            max_sweeps=max_sweeps,
        )
        wrong = view.predicted != y
        views[name] = view
        accuracy[name] = float((~wrong).double().mean())
        keep_clean = correct if only_successful else torch.ones_like(correct)
        keep_adversarial = (correct & wrong) if only_successful else torch.ones_like(correct)
        counts[name] = int(keep_adversarial.sum())
        auc[name] = {}
        for statistic, sign in DETECTION_STATISTICS.items():
            clean_values = sign * clean_view.statistic(statistic)[keep_clean]
            attacked = sign * view.statistic(statistic)[keep_adversarial]
            empty = clean_values.numel() == 0 or attacked.numel() == 0
            auc[name][statistic] = math.nan if empty else detection_auc(clean_values, attacked)
    return DetectionReport(auc=auc, accuracy=accuracy, counts=counts, views=views)


__all__ = [
    "DETECTION_STATISTICS",
    "Attack",
    "DRMView",
    "DetectionReport",
    "PixelRange",
    "default_attacks",
    "detection_auc",
    "detection_report",
    "drm_view",
    "fgsm",
    "fool_with_template",
    "fooling_images",
    "iterative_attack",
    "logits_of",
    "minimal_template_alpha",
    "template_direction",
]
