"""Semi-supervised learning through the rendering path (the Deep Rendering Mixture Model).

A few labelled and many unlabelled images train one DRM. Each step is one round of EM:

* E-step: bottom-up max-sum (`drm.max_sum`, the CNN's forward pass) gives the scores s(x) (the
  CNN logits) and the latents z* (ReLU masks, pool indices). The class c^ of an image is its label
  where known, else the predicted class argmax_c s_c(x).
* M-step: one gradient step on a weighted sum of named terms with z* and c^ frozen (`LossWeights`
  names them and holds their weights; each term is a function of `drm.semisupervised_terms`
  with its formula, re-exported here):

      cross_entropy        labelled images   -log softmax(s(x))_y                       (DRMM, NRM)
      reconstruction       every image       -log N(x; mu(c^, z*), sigma^2 I)           (DRMM, NRM)
      entropy              every image       H(softmax(s(x)))                           (DRMM, NRM)
      nonnegativity        every image       sum_l mean relu(-g_l)^2                    (DRMM, NRM)
      class_balance        the batch         KL(mean_n softmax(s(x_n)) || u), u uniform  (ours)
      path_normalization   every image       |log pi_c^ - log pi_c0| + sum_l mean |b_l (g_l - g0_l)|
                                                                                         (NRM)
      min_cross_entropy    labelled images   -log softmax(s_min(x))_y                   (NRM)
      consistency          unlabelled        KL(q(x) || softmax(s(T x))), T a random translation
                                                                                        (ours)
      generative_cross_entropy  labelled    -log softmax_c(log p(x, c, z*))_y          (ours)

  mu(c^, z*) is the top-down rendering of the class at the max-sum latents (`drm.render`), g_l the
  top-down signal arriving at latent level l. The reconstruction is the Gaussian part of the
  log-joint under the factorized prior (`drm.model.factorized_log_joint`: its latent-prior part
  has no gradient, z* being discrete). The non-negativity penalty pushes the model towards E3's
  condition, under which max-sum is the exact MAP; `drm.refine.inference_gap_lower_bound`
  measures how far it is. s_min(x) are the scores of bottom-up min-sum (`drm.inference.min_sum`:
  the same network with min(0, u) for ReLU and min-pooling); with the same weight as the
  cross-entropy, the two are the NRM's max-min cross-entropy (up to a factor 2). It costs a
  second forward and backward pass, so it is computed only when weighted; so are the path
  normalisation (a reference pass and a comparison at every level) and `consistency`:
  the DRM's translation nuisance says that the class does not depend on where the image sits, so
  the posterior of a translated image T x (each unlabelled image shifted by up to `max_shift`
  pixels, zeros filling in) is asked to match the image's own, q(x) = softmax(s(x)) held fixed
  (the Pi-model / stochastic-transformation regulariser), or with a `teacher` the posterior of
  the untranslated image under that model (the moving average of the iterates: mean teacher).
  With `deformation` > 0, T also rotates, scales, shears and elastically displaces the image
  (`deform`; Simard, Steinkraus, Platt 2003): a class does not depend on a digit's slant or the
  curl of a stroke either. Each image's transformation is a pseudo-random function of its pixels
  and of the step number (`content_shifts`, `content_uniforms`), so a data-parallel shard
  transforms its images as one process would, and a resumed run as an uninterrupted one.
  `generative_cross_entropy` is the conditional likelihood of the generative classifier itself
  (`drm.inference.generative_scores`: log p(x, c, z*) under the factorized prior, every class
  rendered through the same z*): -log p(y | x, z*). With the reconstruction it is hybrid
  generative-discriminative training (Bishop and Lasserre 2007): the class-separating term that
  generative EM lacks, on the model's own posterior rather than on the CNN's scores. It renders
  every class (C top-down passes over the labelled images), so it too is computed only when
  weighted.

What the authors' public code does (read for this module; docs/semisupervised.md has the detail):
the DRMM's "KL" term is -sum_c gamma_c log(C gamma_c) = H(gamma) - log C with gamma the softmax,
i.e. per-image entropy minimisation (our `entropy`, up to the constant), and neither code has a
term on the latent priors; its sign cost is our `nonnegativity`. `class_balance` is our addition:
the class latent's batch-averaged posterior held to the uniform distribution (the class
frequencies of the balanced labelled subset; `balance_target="prior"` uses the learned prior pi
instead, which a collapsing run drags along), which stops entropy minimisation from collapsing
the unlabelled images onto few classes (the marginal-entropy term of regularised information
maximisation). The NRM's path normalisation compares the CNN prior's bias
terms on the image's configuration with those of a reference configuration (c0, z0), max-sum's on
an all-zero image; the authors render the reference from a vector of ones (every class at once),
we render it from its own class c0, so that both sides are configurations of the prior.

References:
    Nguyen, Liu, Perez, Baraniuk, Patel, Semi-Supervised Learning with the Deep Rendering
    Mixture Model, arXiv:1612.01942 (2016).
    Ho, Nguyen, Patel et al., Neural Rendering Model, arXiv:1811.02657 (2018).
    Grandvalet, Bengio, Semi-supervised Learning by Entropy Minimization, NIPS 2004.
    Krause, Perona, Gomes, Discriminative Clustering by Regularized Information Maximization,
    NIPS 2010.
    Sajjadi, Javanmardi, Tasdizen, Regularization With Stochastic Transformations and
    Perturbations for Deep Semi-Supervised Learning, NIPS 2016.
    Laine, Aila, Temporal Ensembling for Semi-Supervised Learning, ICLR 2017 (the Pi-model).
    Simard, Steinkraus, Platt, Best Practices for Convolutional Neural Networks Applied to
    Visual Document Analysis, ICDAR 2003 (elastic deformations).
    Bishop, Lasserre, Generative or Discriminative? Getting the Best of Both Worlds, Bayesian
    Statistics 8 (2007).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from drm import semisupervised_terms
from drm.checks import check_images, check_partial_labels
from drm.deep_model import select_latents
from drm.distributed import Reduce, reduce_together
from drm.em import OptimizerName, make_optimizer, sum_gradients
from drm.inference import generative_scores, walk_up
from drm.model import DeepRenderingModel, Latents, propagate_down
from drm.semisupervised_terms import (
    UNLABELLED,
    class_balance_term,
    consistency_term,
    content_shifts,
    cross_entropy_term,
    deform,
    entropy_term,
    generative_cross_entropy_term,
    nonnegativity_term,
    path_normalization_term,
    reconstruction_term,
    translate,
)


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The weight of each term of the semi-supervised loss (0 switches a term off).

    The defaults were chosen by measurement on MNIST with 100 labels (docs/semisupervised.md).
    """

    cross_entropy: float = 1.0  # labelled images: -log p(y | x, z*)
    # every image: -log N(x; mu(c^, z*), sigma^2 I); at 0.1 the CNN is as accurate as without
    # it and the generative classifier is kept; at 1 the CNN lost 0.5 points
    reconstruction: float = 0.1
    entropy: float = 2.0  # every image: entropy of p(c | x, z*)
    nonnegativity: float = 1000.0  # every image: squared negative part of the top-down signals
    class_balance: float = 2.0  # the batch: KL(mean posterior || uniform, or class prior)
    path_normalization: float = 0.0  # every image: the NRM's path normalisation
    min_cross_entropy: float = 0.0  # labelled images: the NRM's min branch, -log p_min(y | x)
    consistency: float = 3.0  # unlabelled images: KL(posterior || posterior of a translation)
    generative_cross_entropy: float = 0.0  # labelled images: -log p(y | x, z*), factorized prior

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"the weight of {field.name} must be finite and >= 0, got {value}")

    def items(self) -> list[tuple[str, float]]:
        """(term name, weight) pairs in the order of the fields."""
        return [(f.name, float(getattr(self, f.name))) for f in dataclasses.fields(self)]


TERMS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LossWeights))
# Terms that cost a pass of their own: computed (and reported) only when weighted.
ON_DEMAND = ("path_normalization", "min_cross_entropy", "consistency", "generative_cross_entropy")
# Terms that are a mean over the images of the batch (the others: a mean over its labelled
# images, or a function of the whole batch).
PER_IMAGE_TERMS = ("reconstruction", "entropy", "nonnegativity")
BALANCE_TARGETS = ("prior", "uniform")  # what the class_balance term pulls toward
CLASS_GUESSES = ("cnn", "generative")  # whose arg max the E-step takes for an unlabelled image
CONSISTENCY_TARGETS = ("self", "average")  # whose posterior the consistency term matches


# --- the trainer -------------------------------------------------------------------------------


class SemiSupervisedEM:
    """Semi-supervised EM on the DRM: max-sum E-step, one gradient M-step on the weighted terms.

    The loop shape of `drm.em.Trainer`: `step(x, y)` with y = UNLABELLED (-1) for unlabelled
    images, `end_epoch()` (the epoch's mean of every term), `current_model()`.

    Args:
        model: the DRM, trained in place.
        weights: the weight of each term; with every weight but cross_entropy at 0 a step is a
            discriminative EM (= SGD) step on the batch's labelled images.
        optimizer, lr: the M-step's optimizer.
        max_shift: the consistency term's largest translation, in pixels.
        deformation: 0, the consistency term moves each image by whole pixels (`translate`);
            > 0, it also rotates, scales, shears and elastically displaces it, with this
            strength (`deform`; 1: up to 15 degrees, 10%, 0.15 shear, 1.5-pixel elastic field).
        seed: the consistency term's translations (with the step number).
        balance_target: "uniform" (the class_balance term pulls the batch's mean posterior
            toward the uniform distribution) or "prior" (toward the learned class prior pi).
        class_guess: how the E-step guesses an unlabelled image's class c^: "cnn", the arg max
            of the max-sum scores (the MAP class under the CNN prior), or "generative", the
            arg max of log p(x, c, z*) under the factorized prior (`generative_scores`, C
            top-down passes): the hard E-step of the model that the generative classifier and
            `generative_cross_entropy` read.
        teacher: the consistency term's target model: None, the image's own posterior under
            the model being trained (the Pi-model); a model (the moving average of the
            iterates, `drm.averaging`), its posterior on the untranslated image (the mean
            teacher, Tarvainen and Valpola 2017). Not trained here; it may be set later.
        reduce: sums a tensor over the data-parallel processes (`drm.distributed.all_reduce_`);
            None: one process. Each process holds a shard of the global batch; the counts of
            images and labels and the batch's summed posterior are summed first (one
            collective), every term is then normalised by the global counts, and the gradients
            are summed before the step, so every process takes the whole batch's step.
    """

    def __init__(
        self,
        model: DeepRenderingModel,
        weights: LossWeights | None = None,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        reduce: Reduce | None = None,
        max_shift: int = 2,
        deformation: float = 0.0,
        seed: int = 0,
        balance_target: str = "uniform",
        class_guess: str = "cnn",
        teacher: DeepRenderingModel | None = None,
    ) -> None:
        if not isinstance(max_shift, int) or max_shift < 1:
            raise ValueError(f"max_shift must be an int >= 1, got {max_shift!r}")
        if not (isinstance(deformation, (int, float)) and 0 <= deformation < math.inf):
            raise ValueError(f"deformation must be a finite number >= 0, got {deformation!r}")
        if balance_target not in BALANCE_TARGETS:
            raise ValueError(f"balance_target must be 'prior' or 'uniform', got {balance_target!r}")
        if class_guess not in CLASS_GUESSES:
            raise ValueError(f"class_guess must be 'cnn' or 'generative', got {class_guess!r}")
        self.class_guess = class_guess
        # the class_balance term's target: the model's (learned) class prior pi, or the uniform
        # distribution (the class frequencies of a balanced labelled subset), which a prior
        # drifting toward one class cannot follow
        self.balance_target = balance_target
        self.model = model
        self.teacher = teacher  # checked against the model
        self.max_shift = max_shift
        self.deformation = float(deformation)
        self.seed = seed
        self.steps = 0  # steps taken: with the seed, it draws the consistency translations
        self.weights = weights if weights is not None else LossWeights()
        self.optimizer = make_optimizer(model.parameters(), optimizer, lr)
        self.reduce = reduce
        self._reset_sums()

    @property
    def teacher(self) -> DeepRenderingModel | None:
        """The consistency term's target model (None: the model's own posterior)."""
        return self._teacher

    @teacher.setter
    def teacher(self, teacher: DeepRenderingModel | None) -> None:
        # a teacher of other classes, images or precision would give targets of another model
        if teacher is not None:
            model = self.model
            if not isinstance(teacher, DeepRenderingModel):
                name = type(teacher).__name__
                raise TypeError(f"teacher must be a DeepRenderingModel, got {name}")
            ours = (model.num_classes, model.input_shape, model.class_log_prior.dtype)
            theirs = (teacher.num_classes, teacher.input_shape, teacher.class_log_prior.dtype)
            if theirs != ours:
                raise ValueError(
                    f"the teacher's (classes, image shape, dtype) {theirs} differ from the "
                    f"model's {ours}"
                )
        self._teacher = teacher

    def _reset_sums(self) -> None:
        # the terms computed (min_cross_entropy only when weighted), then the loss
        names = [t for t in TERMS if t not in ON_DEMAND or getattr(self.weights, t) > 0]
        self._sums = dict.fromkeys((*names, "loss"), 0.0)
        self._images = 0.0

    def check_batch(self, x: Tensor, y: Tensor) -> None:
        """Raise a clear error unless x (B, C0, H, W) and y (B,) (labels or -1) fit the model."""
        check_images(self.model, x)
        check_partial_labels(self.model, y, x.shape[0], UNLABELLED)

    def e_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Latents, Tensor]:
        """(scores (B, C), latents z*, classes c^ (B,): label, else guess) of checked images."""
        scores, latents, _ = walk_up(self.model, x)
        guess = scores.detach().argmax(1)
        unlabelled = y < 0
        if self.class_guess == "generative" and bool(unlabelled.any()):
            kept = select_latents(latents, unlabelled)
            with torch.no_grad():
                guess[unlabelled] = generative_scores(self.model, x[unlabelled], kept).argmax(1)
        classes = torch.where(y >= 0, y, guess)
        return scores, latents, classes

    def terms(
        self, x: Tensor, y: Tensor, counts: tuple[float, float] | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Every term on the batch, and the loss whose gradient the M-step follows.

        Args:
            x: (B, C0, H, W) images; y: (B,) labels, UNLABELLED (-1) where unknown.
            counts: (images, labelled images) of the global batch when this batch is one
                process's shard of it (then `reduce` must be set); None: the batch is whole.

        Returns:
            terms: name -> this batch's part of the global batch's term (unweighted, detached
                where its weight is 0; the ON_DEMAND terms only when weighted); over the
                processes the parts add up to the term.
            loss: sum of weight * term, differentiable; over the processes the gradients add up
                to the global batch's.
        """
        return self._terms(check_images(self.model, x), y, counts)

    def _terms(
        self, x: Tensor, y: Tensor, counts: tuple[float, float] | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:  # `terms` for checked images
        model = self.model
        scores, latents, classes = self.e_step(x, y)
        local_images, local_labelled = x.shape[0], int((y >= 0).sum())
        images, labelled = (local_images, local_labelled) if counts is None else counts
        # A mean over this batch times its share of the global count: the parts add up.
        image_share = local_images / images if images else 0.0
        label_share = local_labelled / labelled if labelled else 0.0
        # The batch's mean posterior: this batch's images carry the gradient, the other shards'
        # are constants (summed in), so the shards' gradients add up to the global batch's.
        posterior_sum = scores.softmax(1).sum(0)  # (C,)
        others = torch.zeros_like(posterior_sum)
        if counts is not None:
            assert self.reduce is not None
            mine = posterior_sum.detach()
            others = self.reduce(mine.clone()) - mine
        mean_posterior = (posterior_sum + others) / max(images, 1)
        target = model.class_log_prior.detach()
        if self.balance_target == "uniform":
            target = torch.full_like(target, -math.log(model.num_classes))
        balance = class_balance_term(mean_posterior, target)
        # The rendering terms are always reported; their graph is built only when one of them
        # is weighted (the top-down pass and its backward are most of a step's extra cost).
        grad = torch.is_grad_enabled()
        if local_images:
            with torch.set_grad_enabled(grad and self._rendering_weighted()):
                signals = propagate_down(model, classes, latents)
                mu = model.sigma2 * signals[0]
                parts = {
                    "reconstruction": reconstruction_term(model, x, mu),
                    "nonnegativity": nonnegativity_term(model, signals),
                }
            if self.weights.path_normalization > 0:
                parts["path_normalization"] = self._path_normalization(classes, signals)
            parts["entropy"] = entropy_term(scores)
        else:  # an empty shard (data-parallel): its parts are zero
            names = [*PER_IMAGE_TERMS] + ["path_normalization"] * (
                self.weights.path_normalization > 0
            )
            parts = dict.fromkeys(names, scores.sum() * 0.0)
        values = {"cross_entropy": cross_entropy_term(scores, y) * label_share}
        values.update({name: part * image_share for name, part in parts.items()})
        if self.weights.min_cross_entropy > 0:
            min_scores = walk_up(model, x, minimize=True).output
            values["min_cross_entropy"] = cross_entropy_term(min_scores, y) * label_share
        if self.weights.consistency > 0:
            values["consistency"] = self._consistency(x, y, scores, counts)
        if self.weights.generative_cross_entropy > 0:
            values["generative_cross_entropy"] = (
                self._generative_cross_entropy(x, y, latents) * label_share
            )
        values["class_balance"] = balance  # the global value: counted once below
        weights = dict(self.weights.items())
        loss = sum(
            (w * values[name] for name, w in weights.items() if w > 0), start=scores.new_zeros(())
        )  # every weighted term is in `values`
        values["class_balance"] = balance * image_share
        return {k: (v if weights[k] > 0 else v.detach()) for k, v in values.items()}, loss

    def _consistency(
        self, x: Tensor, y: Tensor, scores: Tensor, counts: tuple[float, float] | None
    ) -> Tensor:
        """This batch's part of the consistency term over the global batch's unlabelled images."""
        offset = self.translation_offset()
        unlabelled = y < 0
        local = int(unlabelled.sum())
        total = local if counts is None else counts[0] - counts[1]
        if local == 0:
            return scores.sum() * 0.0
        images = x[unlabelled]
        if self.deformation > 0:
            shifted = deform(images, offset, self.max_shift, self.deformation)
        else:
            shifted = translate(images, content_shifts(images, offset, self.max_shift))
        if self.teacher is None:
            target = scores[unlabelled].detach().softmax(1)
        else:
            with torch.no_grad():
                target = walk_up(self.teacher, images).output.softmax(1)
        return consistency_term(target, walk_up(self.model, shifted).output) * (local / total)

    def _generative_cross_entropy(self, x: Tensor, y: Tensor, latents: Latents) -> Tensor:
        """The generative posterior's cross-entropy over this batch's labelled images."""
        labelled = y >= 0
        if not bool(labelled.any()):
            return x.sum() * 0.0
        kept = select_latents(latents, labelled)
        generative = generative_scores(self.model, x[labelled], kept)  # (L, C)
        return generative_cross_entropy_term(generative, y[labelled])

    def translation_offset(self) -> int:
        """The pseudo-random number of this step that, with each image, picks its translation."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps)
        return int(torch.randint(0, 2**20, (), generator=generator))

    def _rendering_weighted(self) -> bool:
        """Whether a weighted term needs the rendering's gradient."""
        w = self.weights
        return w.reconstruction > 0 or w.nonnegativity > 0 or w.path_normalization > 0

    def _path_normalization(self, classes: Tensor, signals: list[Tensor]) -> Tensor:
        model = self.model
        zero = torch.zeros(1, *model.input_shape, dtype=model.dtype, device=model.device)
        reference_scores, reference_latents, _ = walk_up(model, zero)
        reference_class = reference_scores.detach().argmax(1)
        reference_signals = propagate_down(model, reference_class, reference_latents)
        return path_normalization_term(model, classes, signals, reference_class, reference_signals)

    def step(self, x: Tensor, y: Tensor, *, share: float = 1.0) -> float:
        """One EM round on the batch: E-step, then one M-step on the weighted terms.

        Returns the batch's mean loss; for a shard (data-parallel), its part of the global
        batch's loss divided by `share` (b / B), so that sum over shards of loss * b / B is the
        global batch's loss.
        """
        self.check_batch(x, y)
        if x.shape[0] == 0 and self.reduce is None:
            raise ValueError("x must hold at least one image, got an empty batch")
        counts = None
        if self.reduce is not None:
            local = torch.tensor(
                [float(x.shape[0]), float((y >= 0).sum())], dtype=torch.float64, device=x.device
            )
            summed = self.reduce(local)
            counts = (float(summed[0]), float(summed[1]))
        values, loss = self._terms(x, y, counts)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.reduce is not None:
            sum_gradients(list(self.model.parameters()), self.reduce)
        self.optimizer.step()
        self.steps += 1
        images = float(x.shape[0]) if counts is None else counts[0]
        part = sum(w * float(values[name].detach()) for name, w in self.weights.items() if w > 0)
        for name, value in values.items():
            self._sums[name] += float(value.detach()) * images
        self._sums["loss"] += part * images
        self._images += images
        return part / share if x.shape[0] and share > 0 else 0.0

    def end_epoch(self) -> dict[str, float]:
        """The epoch's mean of every term and of the loss (over the steps, by batch size)."""
        names = list(self._sums)
        sums = torch.tensor([self._sums[k] for k in names], dtype=torch.float64)
        if self.reduce is not None:
            (sums,) = reduce_together([sums], self.reduce)
        summary = {}
        if self._images:
            summary = {
                name: float(value) / self._images
                for name, value in zip(names, sums.tolist(), strict=True)
            }
        self._reset_sums()
        return summary

    def current_model(self) -> DeepRenderingModel:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


__all__ = [  # the trainer, and the terms it re-exports
    "BALANCE_TARGETS",
    "CLASS_GUESSES",
    "PER_IMAGE_TERMS",
    "TERMS",
    "LossWeights",
    "SemiSupervisedEM",
    *semisupervised_terms.__all__,
]
