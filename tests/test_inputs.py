"""Bad input gets a clear error that names what is wrong, never silent garbage."""

from __future__ import annotations

import math

import pytest
import torch

import drm
from tests.architectures import ARCHITECTURES, TINY_ARCHITECTURES, build, images


@pytest.fixture
def model() -> drm.DeepRenderingModel:
    return build(ARCHITECTURES["lenet"])


def _bad_images() -> dict[str, tuple[object, type, str]]:
    good = torch.zeros(2, 1, 28, 28, dtype=torch.float64)
    nan = good.clone()
    nan[0, 0, 3, 4] = math.nan
    inf = good.clone()
    inf[1, 0, 0, 0] = math.inf
    return {
        "numpy": (good.numpy(), TypeError, "must be a torch.Tensor"),
        "integer": (good.long(), TypeError, "floating-point tensor"),
        "float32": (good.float(), TypeError, "dtype torch.float32 but the model is torch.float64"),
        "no-batch": (good[0], ValueError, r"shape \(B, 1, 28, 28\), got \(1, 28, 28\)"),
        "channels": (
            torch.zeros(2, 3, 28, 28, dtype=torch.float64),
            ValueError,
            "has 3 channels but the model expects 1",
        ),
        "size": (
            torch.zeros(2, 1, 27, 28, dtype=torch.float64),
            ValueError,
            r"got \(2, 1, 27, 28\)",
        ),
        "nan": (nan, ValueError, "NaN or inf"),
        "inf": (inf, ValueError, "NaN or inf"),
    }


@pytest.mark.parametrize("case", sorted(_bad_images()))
def test_bad_images_are_rejected_by_every_entry_point(
    model: drm.DeepRenderingModel, case: str
) -> None:
    x, error, message = _bad_images()[case]
    _, latents = drm.max_sum(model, images(model, 2))
    classes = torch.zeros(2, dtype=torch.long)
    with pytest.raises(error, match=message):
        drm.max_sum(model, x)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        drm.log_joint(model, x, classes, latents)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        drm.logit_offset(model, x)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        drm.frozen_scores(model, x, latents)  # type: ignore[arg-type]


def test_bad_classes(model: drm.DeepRenderingModel) -> None:
    x = images(model, 2)
    _, latents = drm.max_sum(model, x)
    with pytest.raises(ValueError, match=r"class index out of range.*\[0, 10\).*\[0, 10\]"):
        drm.render(model, torch.tensor([0, 10]), latents)
    with pytest.raises(ValueError, match="out of range"):
        drm.log_joint(model, x, torch.tensor([-1, 0]), latents)
    with pytest.raises(TypeError, match="int64"):
        drm.render(model, torch.tensor([0.0, 1.0]), latents)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        drm.log_joint(model, x, torch.tensor([0, 1, 2]), latents)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        drm.render(model, [0, 1], latents)  # type: ignore[arg-type]


def test_bad_latents(model: drm.DeepRenderingModel) -> None:
    x = images(model, 2)
    _, latents = drm.max_sum(model, x)
    classes = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="one entry per level"):
        drm.render(model, classes, latents[:-1])
    swapped = list(latents)
    swapped[1] = latents[1].float()  # type: ignore[union-attr]
    with pytest.raises(TypeError, match=r"latents\[1\]: a Switch latent must be a bool"):
        drm.render(model, classes, tuple(swapped))
    wrong_batch = tuple(None if z is None else z[:1] for z in latents)
    with pytest.raises(ValueError, match=r"latents\[1\]: a Switch latent must have shape"):
        drm.render(model, classes, wrong_batch)
    outside = list(latents)
    pool = latents[2].clone()  # type: ignore[union-attr]
    pool[0, 0, 0, 0] = 5 * 24 + 5  # a cell of another window
    outside[2] = pool
    with pytest.raises(ValueError, match=r"latents\[2\].*outside its pooling window"):
        drm.render(model, classes, tuple(outside))
    extra = list(latents)
    extra[0] = latents[1]
    with pytest.raises(ValueError, match=r"latents\[0\] must be None"):
        drm.render(model, classes, tuple(extra))


def test_exact_map_and_sample_arguments() -> None:
    tiny = build(TINY_ARCHITECTURES["groups"])
    with pytest.raises(ValueError, match="4096 latent configurations"):
        drm.exact_map(tiny, images(tiny, 1), max_configurations=10)
    with pytest.raises(ValueError, match="prior must be 'factorized' or 'cnn'"):
        drm.sample(tiny, 3, prior="uniform")
    with pytest.raises(ValueError, match="n must be a positive int"):
        drm.sample(tiny, 0)
    big = build(ARCHITECTURES["lenet"])
    with pytest.raises(ValueError, match="above max_configurations"):
        drm.sample(big, 2, prior="cnn")


def test_model_and_config_construction_errors() -> None:
    with pytest.raises(ValueError, match="negative_slope must be <= 1"):
        drm.SwitchSpec(1.5)
    with pytest.raises(ValueError, match="prior_on must lie in"):
        drm.SwitchSpec(prior_on=1.0)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        drm.ConvSpec(2, (1, 2, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stride must be >= 1"):
        drm.ConvSpec(2, 3, stride=0)
    with pytest.raises(ValueError, match="at most half of kernel_size"):
        drm.MaxPoolSpec(2, padding=2)
    with pytest.raises(ValueError, match="end the levels with FlattenSpec or DenseSpec"):
        drm.DeepRenderingModel.from_config(drm.ModelConfig((1, 4, 4), 2, (drm.ConvSpec(1, 2),)))
    with pytest.raises(ValueError, match=r"levels\[0\] \(ConvSpec\): Conv kernel .* does not fit"):
        drm.DeepRenderingModel.from_config(
            drm.ModelConfig((1, 4, 4), 2, (drm.ConvSpec(1, 5), drm.FlattenSpec()))
        )
    with pytest.raises(ValueError, match="sigma2 must be finite and > 0"):
        drm.ModelConfig((1, 4, 4), 2, (drm.FlattenSpec(),), sigma2=-1.0)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        drm.ModelConfig((1, 4, 4), 1, (drm.FlattenSpec(),))
    with pytest.raises(ValueError, match="the last level must be Classes"):
        drm.DeepRenderingModel((1, 4, 4), [drm.Flatten()])
    classes = drm.Classes(torch.zeros(2, 16), torch.zeros(2))
    with pytest.raises(ValueError, match=r"levels\[0\] \(Classes\): Classes expects flat inputs"):
        drm.DeepRenderingModel((1, 4, 4), [classes])
    with pytest.raises(ValueError, match="malformed model config"):
        drm.ModelConfig.from_dict({"levels": []})


def test_the_model_is_not_called_like_a_cnn(model: drm.DeepRenderingModel) -> None:
    with pytest.raises(TypeError, match="drm.max_sum"):
        model(images(model, 1))


def test_config_round_trips_through_a_dict() -> None:
    for config in list(ARCHITECTURES.values()) + list(TINY_ARCHITECTURES.values()):
        assert drm.ModelConfig.from_dict(config.to_dict()) == config


def test_every_check_lives_in_drm_checks(model: drm.DeepRenderingModel) -> None:
    """One module of checks (`drm.checks`); the model class below it, re-exported above it."""
    import importlib.util

    from drm import checks, deep_model
    from drm.semisupervised import UNLABELLED, SemiSupervisedEM

    assert drm.DeepRenderingModel is drm.model.DeepRenderingModel is deep_model.DeepRenderingModel
    assert importlib.util.find_spec("cnn_equiv._checks") is None
    # the two count checks keep their callers' messages
    with pytest.raises(ValueError, match=r"^k must be >= 1, got 0$"):
        checks.check_count(0, "k", 1)
    with pytest.raises(ValueError, match=r"^steps must be an int >= 1, got 0$"):
        checks.check_int_at_least(0, "steps")
    with pytest.raises(ValueError, match=r"^input_shape must be \(C, H, W\) with positive sizes"):
        checks.check_input_shape((1, 0, 2))
    # labels or UNLABELLED, checked once at the semi-supervised trainer's door
    classes = model.num_classes
    y = torch.tensor([0, UNLABELLED, classes - 1])
    assert checks.check_partial_labels(model, y, 3, UNLABELLED) is y
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {classes}\) or be -1"):
        checks.check_partial_labels(model, torch.tensor([classes]), 1, UNLABELLED)
    with pytest.raises(TypeError, match="y must be an int64 tensor of labels, -1 for unlabelled"):
        checks.check_partial_labels(model, y.double(), 3, UNLABELLED)
    with pytest.raises(ValueError, match=r"y must have shape \(2,\), got \(1,\)"):
        SemiSupervisedEM(model).step(images(model, 2), torch.tensor([0]))
