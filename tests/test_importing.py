"""Importing the CNNs people write: any traceable nn.Module, functional calls, reused modules,
adaptive and global pooling, a final log_softmax, and model-zoo shapes (AlexNet, VGG-11,
VGG-11-BN, the PyTorch MNIST example), each against the network itself as the oracle.

The zoo modules (tests/zoo.py) have torchvision's structure (a class with `features`,
`avgpool`, `classifier` and a forward that calls `torch.flatten`) and fewer channels (4 to 32
instead of 64 to 512, dense widths 64 instead of 4096), at the 224x224 input, in float64, so that a
2-core CPU runs each test in about a second.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import drm
from cnn_equiv import record_latents, to_cnn, to_drm
from tests.zoo import AlexNetShaped, MnistExampleNet, VGGShaped

IDENTITY_TOL = 1e-10  # float64: the DRM and the network compute the same sums in other orders


def _randomise_batchnorm(net: nn.Module, seed: int) -> None:
    """Running statistics and affine parameters away from the identity, so folding is tested."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
            module.running_var.copy_(torch.rand(n, generator=generator, dtype=torch.float64) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator, dtype=torch.float64) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator, dtype=torch.float64))


def _ready(net: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = net.double()
    # torch initialises every layer; scale the last so the logits spread over a few units
    with torch.no_grad():
        _randomise_batchnorm(net, seed)
    return net.eval()


ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int], bool]] = {
    # name: (network, input shape, ends with log_softmax)
    "mnist-example": (MnistExampleNet, (1, 28, 28), True),
    "alexnet": (AlexNetShaped, (3, 224, 224), False),
    "vgg11": (lambda: VGGShaped(batch_norm=False), (3, 224, 224), False),
    "vgg11-bn": (lambda: VGGShaped(batch_norm=True), (3, 224, 224), False),
    # global average pooling at 64x64: 2x2 features averaged to 1x1 (a 2x2 AvgPool level)
    "vgg11-global": (lambda: VGGShaped(batch_norm=True, pool=1), (3, 64, 64), False),
}


def _images(shape: tuple[int, int, int], batch: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *shape), generator=generator, dtype=torch.float64)


def _latents_of(model: drm.DeepRenderingModel, latents: list[Tensor | None], kind: type
                ) -> list[Tensor]:  # fmt: skip
    found = [z for lv, z in zip(model.levels, latents, strict=True) if isinstance(lv, kind)]
    assert all(z is not None for z in found)
    return [z for z in found if z is not None]


def assert_same_network(net: nn.Module, shape: tuple[int, int, int], log_softmax: bool) -> None:
    """max_sum(to_drm(net)) is net's forward pass, with net's latents, and to_cnn inverts it."""
    model = to_drm(net, input_shape=shape)
    x = _images(shape, 4, seed=1)
    with torch.no_grad():
        out = net(x)
        scores, latents = drm.max_sum(model, x)
    seen = record_latents(net, x)  # the network's own ReLU masks and pool indices
    final = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]  # the class scores
    shift = torch.logsumexp(final.bias, 0)  # eq. (12): the constant of the class prior
    if log_softmax:
        # the log_softmax is dropped: equal up to a per-image constant ...
        difference = out - scores
        spread = (difference - difference[:, :1]).abs().max()
        assert float(spread) < IDENTITY_TOL
        # ... so the softmax, the arg max and the loss are the network's
        torch.testing.assert_close(scores.log_softmax(1), out, atol=IDENTITY_TOL, rtol=0)
        y = torch.arange(4) % out.shape[1]
        torch.testing.assert_close(F.cross_entropy(scores, y), F.nll_loss(out, y),
                                   atol=IDENTITY_TOL, rtol=0)  # fmt: skip
    else:
        torch.testing.assert_close(scores + shift, out, atol=IDENTITY_TOL, rtol=0)
    switches = _latents_of(model, latents, drm.Switch)
    pools = _latents_of(model, latents, drm.MaxPool)
    assert len(switches) == len(seen.switches) and len(pools) == len(seen.translations)
    assert all(torch.equal(a, b) for a, b in zip(switches, seen.switches, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(pools, seen.translations, strict=True))
    with torch.no_grad():  # to_cnn gives back the network, its last bias as the DRM keeps it
        again = to_cnn(model)(x)
    torch.testing.assert_close(again, scores, atol=IDENTITY_TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_zoo_shapes_import_exactly(name: str) -> None:
    build, shape, log_softmax = ZOO[name]
    assert_same_network(_ready(build(), seed=2), shape, log_softmax)


def test_adaptive_pooling_becomes_the_pooling_it_equals() -> None:
    """Identity when the sizes match, an equal-window pool when they divide, else refused."""
    alexnet = to_drm(_ready(AlexNetShaped(), 3), input_shape=(3, 224, 224))
    assert not any(isinstance(lv, drm.AvgPool) for lv in alexnet.levels)  # 6x6 -> 6x6
    vgg = to_drm(_ready(VGGShaped(batch_norm=False, pool=1), 3), input_shape=(3, 64, 64))
    pools = [lv for lv in vgg.levels if isinstance(lv, drm.AvgPool)]
    assert len(pools) == 1 and pools[0].spec.kernel_size == (2, 2)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
                        nn.Flatten(), nn.Linear(8, 3))  # fmt: skip
    assert_same_network(_ready(net, 4), (1, 8, 8), False)
    with pytest.raises(ValueError, match=r"module avgpool: adaptive pooling of 3x3 to 6x6"):
        to_drm(_ready(AlexNetShaped(), 3), input_shape=(3, 128, 128))  # 3x3 features


class FunctionalNet(nn.Module):
    """Every functional form: F.leaky_relu, x.relu(), F.avg_pool2d, F.max_pool2d with stride,
    x.view(x.size(0), -1), a reshape, F.dropout, F.adaptive_avg_pool2d, LogSoftmax module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6 * 3 * 3, 8)
        self.out = nn.Linear(8, 5)
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = F.avg_pool2d(x, 2)
        x = self.conv2(x).relu()
        x = F.max_pool2d(x, kernel_size=2, stride=1)
        x = F.adaptive_avg_pool2d(x, (3, 3))
        x = x.view(x.size(0), -1)
        x = F.dropout(x, 0.5, self.training)
        x = F.relu(self.fc(x).reshape(x.shape[0], -1))
        return self.log_softmax(self.out(x))


def test_functional_calls_import_exactly() -> None:
    assert_same_network(_ready(FunctionalNet(), 5), (1, 12, 12), True)


def test_reused_modules_are_each_use() -> None:
    """Regression: one ReLU and one MaxPool2d object used twice (named_children saw them once)."""
    relu, pool = nn.ReLU(), nn.MaxPool2d(2)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), relu, pool, nn.Conv2d(3, 4, 3, padding=1),
                        relu, pool, nn.Flatten(), nn.Linear(16, 3))  # fmt: skip
    model = to_drm(_ready(net, 6), input_shape=(1, 8, 8))
    assert sum(isinstance(lv, drm.Switch) for lv in model.levels) == 2
    assert sum(isinstance(lv, drm.MaxPool) for lv in model.levels) == 2
    assert_same_network(net, (1, 8, 8), False)


class TiedNet(nn.Module):
    """One Linear applied twice (weight tying) between a conv and the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(F.relu(self.conv(x)), 1)
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.head(x)


def test_a_shared_layer_is_two_levels_with_the_same_weights() -> None:
    net = _ready(TiedNet(), 7)
    model = to_drm(net, input_shape=(1, 4, 4))
    dense = [lv for lv in model.levels if type(lv) is drm.Dense]
    assert len(dense) == 2 and torch.equal(dense[0].weight, dense[1].weight)
    assert dense[0].weight.data_ptr() != dense[1].weight.data_ptr()  # copies, not shared
    assert_same_network(net, (1, 4, 4), False)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)) + x, 1))


class Concatenation(Residual):
    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.cat([self.conv(x), x], 1)[:, :1].flatten(1))


class SigmoidNet(Residual):
    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.sigmoid(self.conv(x)).flatten(1))


class Untraceable(Residual):
    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow
            x = -x
        return self.fc(self.conv(x).flatten(1))


class DirectWeight(Residual):
    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.conv2d(x, self.conv.weight, padding=1).flatten(1))


class EarlyLogSoftmax(Residual):
    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.log_softmax(self.conv(x).flatten(1), dim=1))


class Unflattening(Residual):
    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).view(-1, 4, 4).flatten(1))


def _line_of(cls: type, text: str) -> str:
    """'test_importing.py:N' of the first source line of `cls` containing `text`."""
    lines, first = inspect.getsourcelines(cls)
    return f"test_importing.py:{first + next(i for i, s in enumerate(lines) if text in s)}"


REFUSED = {
    "residual addition": (Residual, r"call add\(\) \({line}\): .*not a single chain", "+ x"),
    "concatenation": (Concatenation, r"call cat\(\) \({line}\)", "torch.cat"),
    "sigmoid": (SigmoidNet, r"call sigmoid\(\) \({line}\): not an operation", "sigmoid"),
    "untraceable": (Untraceable, r"torch.fx cannot trace Untraceable", None),
    "parameter used directly": (DirectWeight, r"get_attr conv.weight", None),
    "early log_softmax": (EarlyLogSoftmax, r"log_softmax is accepted only as the last", None),
    "reshape to an image": (Unflattening, r"reshapes \(batch, 1, 4, 4\) to \(batch, 4, 4\)", None),
    "gelu module": (lambda: nn.Sequential(nn.Conv2d(1, 1, 3), nn.GELU(), nn.Flatten(),
                                          nn.Linear(4, 2)), r"unsupported layer 1 \(GELU\)",
                    None),
    "tanh module": (lambda: nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Linear(16, 2)),
                    r"unsupported layer 1 \(Tanh\)", None),
    "batchnorm after relu": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(),
                                                   nn.BatchNorm2d(2), nn.Flatten(),
                                                   nn.Linear(8, 2)).eval(),
                             r"2 \(BatchNorm2d\) must directly follow a Conv2d or Linear", None),
    "train-mode batchnorm": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2),
                                                   nn.Flatten(), nn.Linear(8, 2)).train(),
                             r"1 \(BatchNorm2d\) is in training mode", None),
    "reflect padding": (lambda: nn.Sequential(nn.Conv2d(1, 1, 3, padding=1,
                                                        padding_mode="reflect"),
                                              nn.Flatten(), nn.Linear(16, 2)),
                        r"padding_mode='reflect'", None),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_has_no_drm_is_refused_naming_the_node(name: str) -> None:
    build, message, source_text = REFUSED[name]
    if source_text is not None:
        assert isinstance(build, type)
        message = message.format(line=_line_of(build, source_text))
    net = build()
    if not any(isinstance(m, nn.BatchNorm2d) and m.training for m in net.modules()):
        net = net.eval()
    with pytest.raises(ValueError, match=message) as err:
        to_drm(net.double(), input_shape=(1, 4, 4))
    assert str(err.value).startswith("to_drm: ") and "\n" not in str(err.value)


def test_batchnorm1d_after_linear_is_folded() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(),
                        nn.Linear(6, 3))  # fmt: skip
    model = to_drm(_ready(net, 8), input_shape=(1, 4, 4))
    assert [type(lv).__name__ for lv in model.levels] == ["Flatten", "Dense", "Switch", "Classes"]
    assert_same_network(net, (1, 4, 4), False)


def test_importing_leaves_the_network_and_the_random_state_alone() -> None:
    """to_drm runs the network once for the shapes: no RNG draw (train-mode dropout), no
    parameter or buffer change."""
    net = _ready(MnistExampleNet(), 9).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = torch.get_rng_state()
    to_drm(net, input_shape=(1, 28, 28))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
