"""Starting points for shallow EM: k-means and the models it or the class means give.

This module holds:

* `kmeans`: batched Lloyd iterations from a k-means++ start (the usual initialiser).
* `init_from_kmeans` / `init_from_class_means`: a `drm.shallow.ShallowRenderingModel` started
  from k-means centres (unsupervised) or from the per-class means (supervised), the models that
  `drm.shallow_em.ShallowEM` then trains (and re-exports these names).

References:
    Arthur, Vassilvitskii, k-means++: The Advantages of Careful Seeding, SODA 2007.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from drm.checks import check_count, check_positive
from drm.shallow import ShallowRenderingModel

__all__ = ["init_from_class_means", "init_from_kmeans", "kmeans"]

_STAT = torch.float64  # the statistics of the start are computed in float64


def _check_points(x: object, name: str = "x") -> Tensor:
    """A finite floating (N, C0, H, W) tensor with N >= 1."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C0, H, W), got {tuple(x.shape)}")
    if x.shape[0] < 1 or x[0].numel() == 0:
        raise ValueError(f"{name} must hold at least one non-empty image, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _sq_distances(points: Tensor, centers: Tensor) -> Tensor:
    """(N, K) squared Euclidean distances, ||p||^2 - 2 <p, c> + ||c||^2 clamped at 0."""
    p2 = points.pow(2).sum(1, keepdim=True)  # (N, 1)
    c2 = centers.pow(2).sum(1)[None, :]  # (1, K)
    return (p2 - 2 * points @ centers.T + c2).clamp(min=0.0)


def _kmeans(
    x: Tensor, k: int, iterations: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """k-means on flattened points; returns centers (K, D), assignment (N,), sq. distance (N,)."""
    points = x.flatten(1)  # (N, D)
    n = points.shape[0]
    device = points.device
    # k-means++ seeding: a loop over the k centres, each draw vectorised over the points
    first = int(torch.randint(n, (1,), generator=generator, device=device))
    centers = points[first : first + 1].clone()  # (1, D)
    nearest = _sq_distances(points, centers)[:, 0]  # (N,)
    for _ in range(1, k):
        total = float(nearest.sum())
        weights = nearest if total > 0 else torch.ones_like(nearest)  # all points coincide
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centers = torch.cat([centers, points[pick : pick + 1]])
        nearest = torch.minimum(nearest, _sq_distances(points, points[pick : pick + 1])[:, 0])
    dist = _sq_distances(points, centers)
    best, assign = dist.min(dim=1)  # (N,), (N,)
    for _ in range(iterations):
        counts = torch.bincount(assign, minlength=k).to(points.dtype)  # (K,)
        sums = torch.zeros_like(centers).index_add_(0, assign, points)  # (K, D)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp(min=1)[:, None])
        if bool(empty.any()):
            # re-seed each empty cluster at one of the worst-explained points (distinct ones)
            worst = best.argsort(descending=True)[: int(empty.sum())]
            centers[empty] = points[worst]
        dist = _sq_distances(points, centers)
        best, new_assign = dist.min(dim=1)
        if bool((new_assign == assign).all()) and not bool(empty.any()):
            break
        assign = new_assign
    return centers, assign, best


def kmeans(
    x: Tensor, k: int, iterations: int = 50, generator: torch.Generator | None = None
) -> Tensor:
    """k-means (Lloyd) from a k-means++ start, vectorised over the points.

    A cluster that becomes empty is re-seeded at the point farthest from its centre. Stops early
    once the assignment no longer changes.

    Args:
        x: (N, C0, H, W) floating points (images), N >= k.
        k: number of clusters, >= 1.
        iterations: maximum number of Lloyd iterations, >= 0.
        generator: optional torch.Generator on x's device, for reproducibility.

    Returns:
        (k, C0, H, W) centres, in x's dtype.

    Raises:
        TypeError, ValueError: invalid arguments.
    """
    x = _check_points(x)
    k = check_count(k, "k", 1)
    iterations = check_count(iterations, "iterations", 0)
    if k > x.shape[0]:
        raise ValueError(f"k = {k} clusters need at least k points, got N = {x.shape[0]}")
    centers, _, _ = _kmeans(x, k, iterations, generator)
    return centers.view(k, *x.shape[1:])


def _check_template_size(
    template_size: Sequence[int] | None, translation: str, image: tuple[int, int]
) -> tuple[int, int]:
    if template_size is None:
        return image
    if (
        isinstance(template_size, (str, bytes))
        or not isinstance(template_size, Sequence)
        or len(template_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in template_size)
    ):
        raise TypeError(f"template_size must be a pair of ints (h, w), got {template_size!r}")
    h, w = int(template_size[0]), int(template_size[1])
    if not (1 <= h <= image[0] and 1 <= w <= image[1]):
        raise ValueError(f"template_size {(h, w)} must lie within the image size {image}")
    if translation != "interior" and (h, w) != image:
        raise ValueError(
            f"translation={translation!r} needs image-sized templates {image}, got {(h, w)}"
        )
    return (h, w)


def _model_from_clusters(
    x: Tensor,
    centers: Tensor,
    assign: Tensor,
    sq_dist: Tensor,
    template_size: Sequence[int] | None,
    translation: str,
    switch_prior_on: float | None,
    min_variance: float,
) -> ShallowRenderingModel:
    """A model whose templates are the (centre-cropped) cluster centres."""
    num_classes = centers.shape[0]
    _, c0, height, width = x.shape
    h, w = _check_template_size(template_size, translation, (int(height), int(width)))
    top, left = (height - h) // 2, (width - w) // 2
    templates = centers.view(num_classes, c0, height, width)[:, :, top : top + h, left : left + w]
    counts = torch.bincount(assign, minlength=num_classes).to(_STAT)
    prior = (counts + 1.0) / (counts.sum() + num_classes)  # add-one: no class starts at zero
    sigma2 = max(float(sq_dist.to(_STAT).mean()) / (c0 * height * width), min_variance)
    return ShallowRenderingModel(
        templates.contiguous(),
        (int(c0), int(height), int(width)),
        translation=translation,
        prior_logits=prior.log().to(x.dtype),
        sigma2=sigma2,
        switch_prior_on=switch_prior_on,
    )


def init_from_kmeans(
    x: Tensor,
    num_classes: int,
    *,
    translation: str = "interior",
    template_size: Sequence[int] | None = None,
    switch_prior_on: float | None = None,
    iterations: int = 50,
    min_variance: float = 1e-6,
    generator: torch.Generator | None = None,
) -> ShallowRenderingModel:
    """A `ShallowRenderingModel` started from k-means on the raw images (unsupervised start).

    Templates: the k-means centres, centre-cropped to `template_size` for "interior" (the crop
    is the template at the central placement); class prior: the cluster sizes (add-one
    smoothed); sigma^2: the mean within-cluster squared distance per pixel (floored at
    `min_variance`). k-means ignores the translation nuisance, which EM then takes into account.

    Args:
        x: (N, C0, H, W) images; the model takes their dtype and device.
        num_classes: C, >= 1 and <= N.
        translation: "circular", "interior" or "none".
        template_size: (h, w) for "interior" (default: the image size, G = 1).
        switch_prior_on: the initial pi_on, or None for a model without a switch.
        iterations: maximum Lloyd iterations.
        min_variance: floor of the initial sigma^2.
        generator: optional torch.Generator, for reproducibility.

    Returns:
        The initial model.
    """
    x = _check_points(x)
    num_classes = check_count(num_classes, "num_classes", 1)
    iterations = check_count(iterations, "iterations", 0)
    min_variance = check_positive(min_variance, "min_variance")
    if num_classes > x.shape[0]:
        raise ValueError(
            f"num_classes = {num_classes} needs at least as many images, got N = {x.shape[0]}"
        )
    centers, assign, sq_dist = _kmeans(x, num_classes, iterations, generator)
    return _model_from_clusters(
        x, centers, assign, sq_dist, template_size, translation, switch_prior_on, min_variance
    )


def init_from_class_means(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    translation: str = "interior",
    template_size: Sequence[int] | None = None,
    switch_prior_on: float | None = None,
    min_variance: float = 1e-6,
) -> ShallowRenderingModel:
    """A `ShallowRenderingModel` started from the per-class mean images (supervised start).

    As `init_from_kmeans`, with the labels as the clusters; a class with no image starts from the
    overall mean image.

    Args:
        x: (N, C0, H, W) images.
        y: (N,) long labels in [0, num_classes).
        num_classes: C, >= 1.
        translation, template_size, switch_prior_on, min_variance: as in `init_from_kmeans`.

    Returns:
        The initial model.
    """
    x = _check_points(x)
    num_classes = check_count(num_classes, "num_classes", 1)
    min_variance = check_positive(min_variance, "min_variance")
    if not isinstance(y, Tensor) or y.dtype != torch.long:
        raise TypeError("y must be a torch.Tensor of dtype torch.int64 (long)")
    if tuple(y.shape) != (x.shape[0],):
        raise ValueError(f"y must have shape (N,) = ({x.shape[0]},), got {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(
            f"y must lie in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]"
        )
    points = x.flatten(1)  # (N, D)
    counts = torch.bincount(y, minlength=num_classes).to(points.dtype)  # (C,)
    sums = torch.zeros(num_classes, points.shape[1], dtype=points.dtype, device=points.device)
    sums.index_add_(0, y, points)
    centers = torch.where(
        (counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], points.mean(0)[None, :]
    )  # (C, D)
    sq_dist = (points - centers[y]).pow(2).sum(1)  # (N,)
    return _model_from_clusters(
        x, centers, y, sq_dist, template_size, translation, switch_prior_on, min_variance
    )
