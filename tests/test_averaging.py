"""Parameter averaging (`drm.averaging.ParameterAverage`), float64 on tiny models.

* the average equals the explicit weighted sum of the recorded iterates (the oracle);
* training itself is unchanged: the live parameters follow the unwrapped trainer bit for bit;
* a mid-training state_dict round trip, rebuilt as a resumed run rebuilds it (the model from
  the saved average), continues to the uninterrupted run's average and iterates;
* bad decays and trainers that do not train their model in place are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch

import drm
from cnn_equiv import SGDTrainer
from drm.averaging import ParameterAverage
from drm.semisupervised import UNLABELLED, SemiSupervisedEM
from tests.architectures import TINY_ARCHITECTURES, build, images

AVERAGE_TOLERANCE = 1e-12  # float64: a few multiply-adds per step


def tiny() -> drm.DeepRenderingModel:
    return build(next(iter(TINY_ARCHITECTURES.values())), seed=3)


def batches(model: drm.DeepRenderingModel, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(count):
        x = images(model, 6, seed=10 + i)
        y = torch.randint(0, model.num_classes, (6,), generator=torch.Generator().manual_seed(i))
        y[::2] = UNLABELLED
        out.append((x, y))
    return out


def parameters(model: drm.DeepRenderingModel) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_the_average_is_the_weighted_sum_of_the_iterates(decay: float) -> None:
    model = tiny()
    start = parameters(model)
    averaged = ParameterAverage(SemiSupervisedEM(model, lr=0.01), decay)
    iterates = []
    for x, y in batches(model, 4):
        averaged.step(x, y)
        iterates.append(parameters(model))
    # theta_avg after k steps = decay^k theta_0 + sum_i (1 - decay) decay^(k - i) theta_i
    k = len(iterates)
    for index, got in enumerate(averaged.current_model().parameters()):
        expected = decay**k * start[index]
        for i, theta in enumerate(iterates, 1):
            expected = expected + (1 - decay) * decay ** (k - i) * theta[index]
        torch.testing.assert_close(got, expected, rtol=0, atol=AVERAGE_TOLERANCE)
    assert averaged.current_model() is not model
    assert not any(p.requires_grad for p in averaged.current_model().parameters())


def test_training_is_unchanged_by_averaging() -> None:
    model = tiny()
    plain = SemiSupervisedEM(copy.deepcopy(model), lr=0.01)
    wrapped = ParameterAverage(SemiSupervisedEM(model, lr=0.01), 0.9)
    for x, y in batches(model, 3):
        assert wrapped.step(x, y) == plain.step(x, y)
    for ours, theirs in zip(model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_a_resumed_average_continues_as_the_uninterrupted_one() -> None:
    data = batches(tiny(), 5)
    model = tiny()
    whole = ParameterAverage(SemiSupervisedEM(model, lr=0.01), 0.8)
    for x, y in data:
        whole.step(x, y)

    first = ParameterAverage(SemiSupervisedEM(tiny(), lr=0.01), 0.8)
    for x, y in data[:2]:
        first.step(x, y)
    saved_model = copy.deepcopy(first.current_model()).requires_grad_(True)  # the run's model
    saved_state = copy.deepcopy(first.state_dict())
    resumed = ParameterAverage(SemiSupervisedEM(saved_model, lr=0.01), 0.8)
    resumed.load_state_dict(saved_state)
    for x, y in data[2:]:
        resumed.step(x, y)
    for ours, theirs in zip(
        resumed.current_model().state_dict().values(),
        whole.current_model().state_dict().values(),
        strict=True,
    ):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(resumed.live.parameters(), model.parameters(), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 2.0, float("nan")])
def test_a_decay_outside_0_1_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="decay must be in"):
        ParameterAverage(SemiSupervisedEM(tiny()), decay)


def test_a_trainer_of_a_copy_is_refused() -> None:
    with pytest.raises(ValueError, match="does not train one deep model in place"):
        ParameterAverage(SGDTrainer(tiny()), 0.9)
