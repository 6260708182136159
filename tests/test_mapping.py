"""E8: the parameter mapping round-trips, for the DRM and for user-built torch CNNs.

Oracles: the original model's parameters (DRM -> CNN -> DRM) and the original CNN's logits
(CNN -> DRM -> CNN), up to the class-independent constant logsumexp(final bias) of eq. (12).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import drm
from cnn_equiv import EquivalentCNN, to_cnn, to_drm
from tests.architectures import ARCHITECTURES, build, images

ROUND_TRIP_TOL = 1e-10  # float64; BatchNorm folding reassociates a few products
FLOAT32_TOL = 1e-5  # the same identity in float32 (logits ~ 1, single-precision rounding)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_to_drm_of_to_cnn_reproduces_the_model(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=31, sigma2=0.25)
    back = to_drm(to_cnn(model), sigma2=0.25)
    assert back.config == model.config
    assert back.input_shape == model.input_shape
    for (name_a, a), (name_b, b) in zip(
        model.named_parameters(), back.named_parameters(), strict=True
    ):
        assert name_a == name_b
        if name_a.endswith(f"{len(model.levels) - 1}.bias"):
            continue  # prior logits: equal up to a constant, compared through log pi below
        assert torch.equal(a, b), name_a
    torch.testing.assert_close(
        back.class_log_prior, model.class_log_prior, atol=ROUND_TRIP_TOL, rtol=0
    )
    # the copies share no storage with the CNN or the model
    assert all(
        p.data_ptr() != q.data_ptr()
        for p, q in zip(model.parameters(), back.parameters(), strict=True)
    )


def _batchnorm(features: int, dims: int, generator: torch.Generator) -> nn.Module:
    norm = nn.BatchNorm2d(features) if dims == 2 else nn.BatchNorm1d(features)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(features, generator=generator))
        norm.running_var.copy_(torch.rand(features, generator=generator) + 0.5)
        norm.weight.copy_(torch.randn(features, generator=generator))
        norm.bias.copy_(torch.randn(features, generator=generator))
    return norm


def _cnn_zoo(generator: torch.Generator) -> dict[str, tuple[nn.Sequential, tuple[int, int, int]]]:
    """Torch CNNs built the way users build them, covering every supported layer."""
    g = generator
    return {
        "lenet-bn-dropout": (
            nn.Sequential(
                nn.Conv2d(1, 6, 5, padding=2),
                nn.BatchNorm2d(6),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(6, 16, 5),
                _batchnorm(16, 2, g),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Dropout(0.5),
                nn.Linear(16 * 5 * 5, 32),
                _batchnorm(32, 1, g),
                nn.LeakyReLU(0.1),
                nn.Dropout(),
                nn.Linear(32, 10),
            ),
            (1, 28, 28),
        ),
        "stride-dilation-groups-nobias": (
            nn.Sequential(
                nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, dilation=2, groups=2, padding="same"),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                nn.Flatten(),
                nn.Linear(4 * 4 * 4, 5),
            ),
            (2, 11, 12),
        ),
        "avgpool-variants": (
            nn.Sequential(
                nn.Conv2d(3, 4, 3),
                nn.ReLU(),
                nn.AvgPool2d(2, 1),
                nn.Conv2d(4, 4, 2, padding="valid"),
                nn.LeakyReLU(0.2),
                nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                nn.AvgPool2d(2, divisor_override=3),
                nn.Flatten(),
                nn.Linear(16, 3, bias=False),
            ),
            (3, 12, 12),
        ),
        "nested-sequential": (
            nn.Sequential(
                nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2, 1, dilation=2)),
                nn.Identity(),
                nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 4)),
            ),
            (1, 8, 8),
        ),
        "pool-before-relu-and-linear-chain": (
            nn.Sequential(
                nn.Conv2d(1, 3, 3),
                nn.MaxPool2d(2),
                nn.ReLU(),
                nn.Conv2d(3, 2, 1),
                nn.Flatten(),
                nn.Linear(2 * 3 * 3, 5),
                nn.Linear(5, 3),
            ),
            (1, 8, 8),
        ),
    }


ZOO_NAMES = sorted(_cnn_zoo(torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_to_cnn_of_to_drm_reproduces_the_logits(name: str) -> None:
    torch.manual_seed(32)
    cnn, shape = _cnn_zoo(torch.Generator().manual_seed(33))[name]
    cnn = cnn.double().eval()
    model = to_drm(cnn, input_shape=shape)
    x = images(model, 4, seed=34)
    with torch.no_grad():
        expected = cnn(x)
        final = [m for m in cnn.modules() if isinstance(m, nn.Linear)][-1]
        bias = final.bias if final.bias is not None else torch.zeros(final.out_features)
        shift = torch.logsumexp(bias.double(), 0)  # eq. (12)
        torch.testing.assert_close(to_cnn(model)(x) + shift, expected, atol=ROUND_TRIP_TOL, rtol=0)
        torch.testing.assert_close(
            drm.max_sum(model, x)[0] + shift, expected, atol=ROUND_TRIP_TOL, rtol=0
        )
        torch.testing.assert_close(
            torch.softmax(to_cnn(model)(x), 1),
            torch.softmax(expected, 1),
            atol=ROUND_TRIP_TOL,
            rtol=0,
        )


def test_equivalent_cnn_carries_its_input_shape_and_runs_in_float32() -> None:
    model = drm.DeepRenderingModel.from_config(ARCHITECTURES["lenet"])  # float32
    cnn = to_cnn(model)
    assert isinstance(cnn, EquivalentCNN) and cnn.input_shape == (1, 28, 28)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(cnn(x), drm.max_sum(model, x)[0], atol=FLOAT32_TOL, rtol=FLOAT32_TOL)
    assert to_drm(cnn).config == model.config  # no input_shape needed for an EquivalentCNN


BAD_CNNS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "sigmoid": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Sigmoid(), nn.Linear(4, 2)),
        r"unsupported layer 2 \(Sigmoid\)",
    ),
    "conv1d": (
        lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2)),
        r"unsupported layer 0 \(Conv1d\)",
    ),
    "nested-tanh": (
        lambda: nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 1, 3), nn.Tanh()), nn.Flatten(), nn.Linear(4, 2)
        ),
        r"unsupported layer 0\.1 \(Tanh\)",
    ),
    "training-bn": (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2)),
        r"1 \(BatchNorm2d\) is in training mode",
    ),
    "bn-after-relu": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2).eval(), nn.Flatten(), nn.Linear(8, 2)
        ),
        r"2 \(BatchNorm2d\) must directly follow a Conv2d or Linear",
    ),
    "bn-without-stats": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.BatchNorm2d(2, track_running_stats=False).eval(),
            nn.Flatten(),
            nn.Linear(8, 2),
        ),
        r"track_running_stats=False",
    ),
    "reflect-padding": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(32, 2)
        ),
        r"padding_mode='reflect'",
    ),
    "avgpool-ceil": (
        lambda: nn.Sequential(nn.AvgPool2d(3, ceil_mode=True), nn.Flatten(), nn.Linear(4, 2)),
        r"AvgPool2d\) with ceil_mode=True",
    ),
    "no-final-linear": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.ReLU()),
        r"must end with the nn.Linear",
    ),
    "shape-misfit": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(15, 3)),
        r"input shape \(1, 4, 4\) does not fit module 1: .*\(2x16 and 15x3\)",
    ),
    "channel-misfit": (
        lambda: nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(8, 2)),
        r"does not fit module 0: .*to have 3 channels, but got 1",
    ),
    "leaky-slope-above-one": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.LeakyReLU(2.0), nn.Linear(3, 2)),
        r"negative_slope 2.0 > 1",
    ),
    "even-same-padding": (
        lambda: nn.Sequential(nn.Conv2d(1, 1, 2, padding="same"), nn.Flatten(), nn.Linear(16, 2)),
        r"padding='same' with an even kernel",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CNNS))
def test_to_drm_rejects_what_it_cannot_map_with_an_error_naming_the_layer(name: str) -> None:
    build_cnn, message = BAD_CNNS[name]
    with pytest.raises(ValueError, match=message):
        to_drm(build_cnn(), input_shape=(1, 4, 4))


def test_to_drm_argument_errors() -> None:
    cnn = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(TypeError, match="expects an nn.Module"):
        to_drm(lambda x: x, input_shape=(1, 4, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs input_shape"):
        to_drm(cnn)
    with pytest.raises(ValueError, match="sigma2 must be finite and > 0"):
        to_drm(cnn, sigma2=0.0, input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="input_shape must be"):
        to_drm(cnn, input_shape=(16,))
    with pytest.raises(TypeError, match="expects a DeepRenderingModel"):
        to_cnn(cnn)  # type: ignore[arg-type]


def test_slicing_the_equivalent_cnn_gives_its_layers() -> None:
    model = build(ARCHITECTURES["lenet"], seed=35)
    cnn = to_cnn(model)
    head = cnn[:3]
    assert isinstance(head, nn.Sequential) and len(head) == 3
    x = images(model, 2, seed=36)
    with torch.no_grad():
        torch.testing.assert_close(cnn[3:](head(x)), cnn(x), atol=ROUND_TRIP_TOL, rtol=0)
    assert isinstance(cnn[0], nn.Conv2d)


def test_a_parameter_of_the_wrong_shape_is_refused_by_name() -> None:
    """Every copy is checked against the shape the spec and the bound input imply, not against
    the tensor's own shape: a weight resized behind a level's back is refused, never copied."""
    dense_model = build(ARCHITECTURES["dense-only"], seed=3)
    dense = dense_model.levels[1]  # Dense(8) on the flattened (1, 4, 5) image: (8, 20)
    dense.weight.data = torch.zeros(8, 21, dtype=dense.weight.dtype)
    with pytest.raises(ValueError, match=r"Dense weight has shape \(8, 21\), expected \(8, 20\)"):
        to_cnn(dense_model)
    conv_model = build(ARCHITECTURES["dilation-groups"], seed=3)
    conv = conv_model.levels[0]  # Conv(6, 3, groups=2) on 4 channels: (6, 2, 3, 3)
    conv.weight.data = torch.zeros(6, 4, 3, 3, dtype=conv.weight.dtype)
    with pytest.raises(
        ValueError, match=r"Conv weight has shape \(6, 4, 3, 3\), expected \(6, 2, 3, 3\)"
    ):
        to_cnn(conv_model)
