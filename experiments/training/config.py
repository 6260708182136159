"""The settings of a training run: `RunConfig`, their defaults, and which of them bind a run.

`RunConfig` is a frozen dataclass with one field per option of `python -m experiments.train`
(`--lr-decay` is `lr_decay`); `run(RunConfig(...))` (`experiments.training.loop`) trains with it,
and the run directory's config.json stores its fields under "args". Settings left None take the
defaults of their algorithm (`DEFAULTS`) when the config is made; `model`, `batch_size` and
`channels_last` stay None until the data are known (`experiments.training.loop.run` resolves
them and records the resolved values).

Resume: a run continues only with the same ESSENTIAL settings (`rundir.check_resumable`); a
setting added after runs were written compares as its LEGACY_SETTINGS value for those runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from drm.checks import check_count, check_nonnegative
from drm.m_steps import DEFAULT_ETA, M_STEPS, MStepName
from drm.semisupervised import TERMS, LossWeights


class RunError(Exception):
    """A problem with the run directory or the command (reported as one line by the CLI)."""


# Settings that change the trajectory or the metrics: a resumed run must share them.
ESSENTIAL = (
    "algo",
    "data",
    "model",
    "batch_size",
    "optimizer",
    "lr",
    "lr_decay",
    "average_decay",
    "m_steps",
    "m_step",
    "m_step_eta",
    "seed",
    "limit_train",
    "limit_test",
    "translation",
    "template_size",
    "init",
    "hard",
    "unsupervised",
    "cg_iterations",
    "em_step_size",
    "refine_sweeps",
    "amp",
    "labels",
    "labelled_indices",
    "labelled_batch_size",
    "consistency_shift",
    "consistency_deformation",
    "class_balance_target",
    "class_guess",
    "consistency_target",
    *(f"{term}_weight" for term in TERMS),
)
# Per-algorithm defaults of the settings given as None.
DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"epochs": 2, "lr": 2e-3, "lr_decay": 0.7, "average_decay": 0.0},
    "dem": {"epochs": 2, "lr": 2e-3, "lr_decay": 0.7, "m_step": "gradient", "average_decay": 0.0},
    "em": {"epochs": 2, "lr": 2e-3, "lr_decay": 0.7, "average_decay": 0.0},
    # the semi-supervised defaults, chosen by measurement (docs/semisupervised.md)
    "ssl": {
        "epochs": 25,
        "lr": 1e-3,
        "lr_decay": 0.93,
        # the moving average of the iterates: +0.06 to +0.4 points over the last iterate on three
        # label draws, and no epoch-to-epoch swings (docs/semisupervised.md)
        "average_decay": 0.999,
        "labelled_batch_size": 32,
        "consistency_shift": 2,
        "consistency_deformation": 0.0,
        # the uniform target kept two of three label draws from collapsing into one class
        "class_balance_target": "uniform",
        "class_guess": "cnn",
        "consistency_target": "self",
    },
}
# The value of a setting that runs written before it existed were made with (their
# config.json lacks the key), per algorithm: a resumed run is compared with it.
LEGACY_SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": {"average_decay": 0.0},  # before --average-decay, no run averaged its parameters
    "ssl": {
        "class_balance_target": "prior",
        "average_decay": 0.0,
        "generative_cross_entropy_weight": 0.0,
        "class_guess": "cnn",
        "consistency_target": "self",
        "consistency_deformation": 0.0,
    },
    "dem": {"m_step": "gradient", "average_decay": 0.0},  # before --m-step: gradient M-steps
    "em": {"average_decay": 0.0},
}
SSL_WEIGHTS = LossWeights()  # the default weight of each semi-supervised term
# The settings that only --algo ssl reads (None for the other algorithms).
SSL_ONLY = ("labelled_batch_size", "consistency_shift", "consistency_deformation",
            "class_balance_target", "class_guess", "consistency_target",
            *(f"{term}_weight" for term in TERMS))  # fmt: skip
# Metric keys that measure time (they differ between an uninterrupted and a resumed run).
TIMING_KEYS = ("seconds", "train_seconds", "eval_seconds", "elapsed", "images_per_second")
DIST_TIMEOUT = 120.0  # seconds; --dist-timeout
# The numeric settings and their ranges (the command line's positive_int / positive float types)
POSITIVE_INTS = ("epochs", "batch_size", "m_steps", "num_classes", "labels", "labelled_batch_size",
                 "consistency_shift", "template_size", "cg_iterations", "refine_sweeps", "threads",
                 "limit_train", "limit_test", "eval_batch_size")  # fmt: skip
POSITIVE_FLOATS = ("lr", "lr_decay", "em_step_size", "dist_timeout", "m_step_eta")
NON_NEGATIVE_FLOATS = ("consistency_deformation", *(f"{term}_weight" for term in TERMS))
MODEL_PRESETS = ("lenet", "small", "shallow")  # --model's names; anything else is a PATH.json
SMOKE_IMAGES = 256  # --smoke: the training images (at most)


def is_model_file(model: str | None) -> bool:
    """Whether `--model` names an architecture file (PATH.json) rather than a preset."""
    return model is not None and model.lower().endswith(".json")


def _choices(annotation: Any) -> list[str]:
    """The strings of a `Literal[...]` or `Literal[...] | None` annotation; [] for other types."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [c for arg in get_args(annotation) if get_origin(arg) is Literal for c in get_args(arg)]


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a training run (the options of `python -m experiments.train`).

    Made with the defaults of `algo` filled in and the combinations checked (`ValueError`
    naming the option, as the command line would).
    """

    # dem: discriminative EM; em: generative (supervised shallow EM on the shallow model)
    algo: Literal["sgd", "dem", "em", "ssl"] = "sgd"
    data: str | None = None  # mnist, digits, or PATH.npz; None: mnist (digits with smoke)
    epochs: int | None = None  # None: 2 (ssl: 25)
    out: Path | None = None  # the run directory; None only with smoke (a temporary one)
    seed: int = 0  # model init, minibatch order, the labelled draw
    device: Literal["cpu", "cuda"] = "cpu"  # under torchrun, cuda is cuda:LOCAL_RANK
    resume: bool = False  # continue the run in `out`
    overwrite: bool = False  # start again even if `out` holds a run
    # lenet, small, shallow, or PATH.json holding a drm.ModelConfig (deep; `model_file`);
    # None: lenet for images of at least 28x28, else small
    model: str | None = None
    batch_size: int | None = None  # None: 64 (16 below 10,000 training images)
    lr: float | None = None  # the first epoch's learning rate; None: 2e-3 (ssl: 1e-3)
    lr_decay: float | None = None  # lr factor per epoch; None: 0.7 (ssl: 0.93)
    # dem, ssl: the run's model is the moving average of the iterates (drm.averaging); 0: off
    average_decay: float | None = None  # None: the algorithm's default (DEFAULTS)
    optimizer: Literal["adam", "sgd"] = "adam"
    m_steps: int = 1  # DEM: gradient steps per batch
    m_step: MStepName | None = None  # DEM: the M-step design (drm.m_steps); None: gradient
    m_step_eta: float | None = None  # DEM, exact M-steps: proximal step length; None: 1.0
    num_classes: int | None = None  # the class count K; None: max label + 1 (checked)
    labels: int | None = None  # label only N training images (balanced); None: all labelled
    # PATH.json: the labelled training images' indices (a list, or a run's labelled.json)
    labelled_indices: str | None = None
    labelled_batch_size: int | None = None  # ssl: labelled images per batch (None: 32)
    consistency_shift: int | None = None  # ssl: the consistency term's largest shift (None: 2)
    consistency_deformation: float | None = None  # ssl: its deformations' strength (None: 0)
    class_balance_target: Literal["prior", "uniform"] | None = None  # ssl; None: uniform
    # ssl: an unlabelled image's class in the E-step, from the CNN's or the generative scores
    class_guess: Literal["cnn", "generative"] | None = None  # None: cnn
    # ssl: the consistency term's target, the model's own posterior or the moving average's
    consistency_target: Literal["self", "average"] | None = None  # None: self
    # ssl: the weight of each loss term (None: SSL_WEIGHTS)
    cross_entropy_weight: float | None = None
    reconstruction_weight: float | None = None
    entropy_weight: float | None = None
    nonnegativity_weight: float | None = None
    class_balance_weight: float | None = None
    path_normalization_weight: float | None = None
    min_cross_entropy_weight: float | None = None
    consistency_weight: float | None = None
    generative_cross_entropy_weight: float | None = None
    translation: Literal["none", "circular", "interior"] = "none"  # the shallow model's nuisance
    template_size: int | None = None  # shallow, interior: the template side
    init: Literal["kmeans", "class-means"] = "kmeans"  # the shallow model's start
    hard: bool = False  # shallow EM: hard (MAP) E-step
    unsupervised: bool = False  # shallow EM: ignore the labels
    cg_iterations: int = 3  # deep EM: CG steps per level and batch
    em_step_size: float = 0.5  # deep EM: step towards the CG solution
    refine_sweeps: int | None = None  # deep EM: top-down refinement sweeps; None: none
    amp: Literal["bf16"] | None = None  # sgd: bfloat16 autocast of the forward pass; None: off
    channels_last: bool | None = None  # deep model: NHWC templates; None: on for ssl + lenet
    dist_timeout: float = DIST_TIMEOUT  # torchrun: seconds before a missed collective fails
    threads: int | None = None  # torch CPU threads; None: torch's default
    limit_train: int | None = None  # the first N training images
    limit_test: int | None = None  # the first N test images
    eval_batch_size: int = 1000  # images per evaluation batch
    progress: bool = True  # a progress bar and a row per epoch on stderr
    smoke: bool = False  # digits, 256 images, 1 epoch (for the tests)

    def __post_init__(self) -> None:
        given = [name for name in SSL_ONLY if getattr(self, name) is not None]
        if self.algo not in DEFAULTS:
            raise ValueError(f"--algo must be one of {', '.join(DEFAULTS)}, got {self.algo!r}")
        if self.algo != "ssl" and given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to --algo ssl")
        if self.algo != "dem" and self.m_step is not None:
            raise ValueError("--m-step applies to --algo dem")
        filled: dict[str, Any] = {k: v for k, v in DEFAULTS[self.algo].items()
                                  if getattr(self, k) is None}  # fmt: skip
        exact = self.algo == "dem" and self.m_step not in (None, "gradient")
        if exact and self.m_step_eta is None:
            filled["m_step_eta"] = DEFAULT_ETA
        if self.algo == "ssl":
            filled |= {f"{term}_weight": weight for term, weight in SSL_WEIGHTS.items()
                       if getattr(self, f"{term}_weight") is None}  # fmt: skip
        if self.smoke:
            limit = min(self.limit_train or SMOKE_IMAGES, SMOKE_IMAGES)
            filled |= {"data": self.data or "digits", "epochs": 1, "limit_train": limit,
                       "progress": False}  # fmt: skip
        filled["data"] = filled.get("data", self.data) or "mnist"
        for name, value in filled.items():  # frozen: set once, while the config is made
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        """The values and combinations of settings that make no sense, refused by option name
        (the command line's own checks, for a config made in Python)."""
        hints = get_type_hints(RunConfig)
        for field in dataclasses.fields(self):
            value, option = getattr(self, field.name), f"--{field.name.replace('_', '-')}"
            choices = _choices(hints[field.name])
            if choices and value is not None and value not in choices:
                raise ValueError(f"{option} must be one of {choices}, got {value!r}")
            if value is None:
                continue
            if field.name in POSITIVE_INTS:
                check_count(value, option, 1)
            elif field.name in POSITIVE_FLOATS:
                check_nonnegative(value, option, positive=True)
            elif field.name in NON_NEGATIVE_FLOATS:
                check_nonnegative(value, option)
        if (
            self.model is not None
            and self.model not in MODEL_PRESETS
            and not is_model_file(self.model)
        ):
            raise ValueError(
                f"--model must be one of {', '.join(MODEL_PRESETS)} or a PATH.json holding a "
                f"drm.ModelConfig, got {self.model!r}"
            )
        if self.out is None and not self.smoke:
            raise ValueError("--out DIR is required (except with --smoke)")
        if self.labels is not None and self.labelled_indices is not None:
            raise ValueError(
                "--labels draws the labelled images and --labelled-indices names them: pass one"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.unsupervised and self.model != "shallow":
            raise ValueError("--unsupervised applies to --model shallow")
        if self.algo == "ssl" and self.model == "shallow":
            raise ValueError("--algo ssl trains a deep model: use --model lenet or small")
        if self.channels_last and self.model == "shallow":
            raise ValueError("--channels-last applies to the deep models")
        if self.refine_sweeps is not None and (self.algo != "em" or self.model == "shallow"):
            raise ValueError("--refine-sweeps applies to --algo em on a deep model")
        if self.average_decay is not None and not 0 <= self.average_decay < 1:
            raise ValueError(f"--average-decay must be in [0, 1), got {self.average_decay!r}")
        if self.average_decay and self.algo not in ("dem", "ssl"):
            raise ValueError("--average-decay applies to --algo dem and ssl")
        if self.consistency_target == "average" and not self.average_decay:
            raise ValueError("--consistency-target average needs --average-decay > 0")
        if self.amp is not None and self.algo != "sgd":
            raise ValueError("--amp applies to --algo sgd")
        exact = self.algo == "dem" and self.m_step != "gradient"
        if self.m_step_eta is not None and not exact:
            raise ValueError("--m-step-eta applies to --algo dem with an exact --m-step")
        if exact and self.m_steps != 1:
            raise ValueError("--m-steps applies to --m-step gradient")

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with `changes` (checked again)."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """The settings as config.json's "args" stores them: every field but `out`, sorted."""
        return {f.name: getattr(self, f.name) for f in sorted(dataclasses.fields(self),
                key=lambda f: f.name) if f.name != "out"}  # fmt: skip

    def loss_weights(self) -> LossWeights:
        """ssl: the weight of each term of the semi-supervised loss."""
        return LossWeights(**{term: getattr(self, f"{term}_weight") for term in TERMS})


# the --m-step choices are drm.m_steps' designs
assert _choices(get_type_hints(RunConfig)["m_step"]) == list(M_STEPS)
# a term added to LossWeights needs its --TERM-weight field above
assert {f"{term}_weight" for term in TERMS} <= {f.name for f in dataclasses.fields(RunConfig)}

__all__ = ["DEFAULTS", "ESSENTIAL", "LEGACY_SETTINGS", "MODEL_PRESETS", "SSL_WEIGHTS",
           "TIMING_KEYS", "RunConfig", "RunError", "is_model_file"]  # fmt: skip
