"""The test metrics of a run, computed after every epoch (each rank on its shard, summed).

`evaluate`: accuracy, and the cross-entropy of the max-sum scores (deep) or the mean log p(x)
(shallow); `diagnostics`: the generative view of a deep model; `generative_accuracy`: its
generative classifier on a whole set (`generative_accuracy_of_run`: of a run's final model);
`cluster_labels`: the label each cluster of an unsupervised shallow model stands for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import drm
from drm import distributed
from drm.checkpoint import load_checkpoint
from drm.inference import generative_scores
from drm.refine import inference_gap_lower_bound
from drm.shallow import ShallowRenderingModel
from experiments.training.data import data_name, load_data
from experiments.training.rundir import CHECKPOINT

DIAGNOSTIC_IMAGES = 500  # test images on which deep runs report the generative classifier and gap
GAP_SWEEPS = 5  # refinement sweeps of the inference-gap bound (more: tighter, slower)


def cluster_labels(model: ShallowRenderingModel, x: Tensor, y: Tensor, batch: int) -> Tensor:
    """The majority training label of each component of an unsupervised model: (C,).

    With several ranks each counts the votes of its shard of x, and the counts are summed.
    """
    x, y = distributed.shard(x), distributed.shard(y)
    with torch.no_grad():
        assigned = [model.map_classes(x[i : i + batch]) for i in range(0, len(x), batch)]
    votes = torch.zeros(model.num_classes, model.num_classes, dtype=torch.long)
    if assigned:
        found = torch.cat(assigned).cpu()
        votes.index_put_((found, y.cpu()), torch.ones_like(found), accumulate=True)
    return distributed.all_reduce_(votes).argmax(1).to(x.device)


def evaluate(
    model: Any, x: Tensor, y: Tensor, batch: int = 1000, relabel: Tensor | None = None
) -> dict[str, float]:
    """Test metrics: accuracy, and the cross-entropy (deep) or the mean log p(x) (shallow).

    One pass per batch gives both numbers (the deep accuracy from the same max-sum scores as the
    loss); this is the library's one accuracy. With several ranks each evaluates its shard of the
    test set, and the sums are summed.

    Args:
        relabel: (C,) the label each component stands for (unsupervised models), else identity.
    """
    n = max(1, x.shape[0])
    x, y = distributed.shard(x), distributed.shard(y)
    correct, total = 0, 0.0
    key = "test_log_likelihood" if isinstance(model, ShallowRenderingModel) else "test_loss"
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            if isinstance(model, ShallowRenderingModel):
                predicted = model.map_classes(xb)
                if relabel is not None:
                    predicted = relabel[predicted]
                total += float(model.log_likelihood(xb).sum())
            else:
                # max-sum scores are the CNN's logits up to a class-independent constant (E2)
                scores = drm.max_sum(model, xb)[0]
                predicted = scores.argmax(1)
                total += float(F.cross_entropy(scores, yb, reduction="sum"))
            correct += int((predicted == yb).sum())
    if distributed.world_size() > 1:
        sums = distributed.all_reduce_floats({"correct": correct, "total": total})
        correct, total = round(sums["correct"]), sums["total"]
    return {"test_accuracy": correct / n, key: total / n}


def generative_accuracy(
    model: drm.DeepRenderingModel | ShallowRenderingModel, x: Tensor, y: Tensor, batch: int = 1000
) -> float:
    """The accuracy of arg max_c log p(x, c, z*) (`generative_scores`) on all of x: (N, ...)."""
    if not isinstance(model, drm.DeepRenderingModel):
        raise TypeError(f"the generative classifier reads a deep model, got {type(model).__name__}")
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            correct += int((generative_scores(model, xb).argmax(1) == yb).sum())
    return correct / x.shape[0]


def generative_accuracy_of_run(directory: Path, data: str) -> float:
    """The generative classifier of a run directory's final model on the whole test set of
    `data` (mnist, digits or PATH.npz)."""
    model = load_checkpoint(directory / CHECKPOINT).model
    test = load_data(data_name(data), None, None)
    return generative_accuracy(model, test.x_test, test.y_test)


def diagnostics(
    model: drm.DeepRenderingModel, x: Tensor, y: Tensor, batch: int = 1000
) -> dict[str, float]:
    """The generative view of a deep model on the first DIAGNOSTIC_IMAGES test images.

    test_generative_accuracy: the arg-max over c of log p(x, c, z*) under the factorized prior
    (`drm.inference.generative_scores`); test_inference_gap: the mean certified lower bound on
    the inference gap at the predicted class (`drm.refine.inference_gap_lower_bound`), 0 when
    max-sum is the exact MAP. With several ranks each takes its shard, and the sums are summed.
    """
    n = min(DIAGNOSTIC_IMAGES, x.shape[0])
    x, y = distributed.shard(x[:n]), distributed.shard(y[:n])
    correct, gap = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            correct += float((generative_scores(model, xb).argmax(1) == yb).sum())
            gap += float(inference_gap_lower_bound(model, xb, max_sweeps=GAP_SWEEPS).sum())
    if distributed.world_size() > 1:
        sums = distributed.all_reduce_floats({"correct": correct, "gap": gap})
        correct, gap = sums["correct"], sums["gap"]
    return {"test_generative_accuracy": correct / n, "test_inference_gap": gap / n}
