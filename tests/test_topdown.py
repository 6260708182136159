"""E6: the top-down rendering at the CNN's latents is the input gradient of the logit, and
Zeiler's deconvnet and guided backpropagation are the same pass with other switch rules.

Oracles: autograd through the torch CNN `to_cnn(model)`; for deconvnet and guided backprop,
autograd with backward hooks on the torch ReLU layers that apply the published rules.
"""

from __future__ import annotations

import pytest
import torch

import drm
from cnn_equiv import to_cnn
from tests.architectures import ARCHITECTURES, build, hooked_gradient, images

GRADIENT_TOL = 1e-10  # float64; the rendering and autograd run the same adjoint ops


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("rule", ["drm", "deconvnet", "guided"])
def test_e6_top_down_pass_is_the_hooked_input_gradient(name: str, rule: str) -> None:
    model = build(ARCHITECTURES[name], seed=21)
    x = images(model, 3, seed=22)
    _, latents = drm.max_sum(model, x)
    cnn = to_cnn(model)
    for c in range(model.num_classes):
        classes = torch.full((3,), c, dtype=torch.long)
        signal = drm.top_down(model, classes, latents, rule=rule)[0].detach()
        expected = hooked_gradient(cnn, x, len(cnn) - 1, classes, rule)
        torch.testing.assert_close(signal, expected, atol=GRADIENT_TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_e6_render_over_sigma2_is_the_logit_gradient(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=23, sigma2=0.37)
    x = images(model, 2, seed=24)
    scores, latents = drm.max_sum(model, x)
    predicted = scores.argmax(1)
    rendered = drm.render(model, predicted, latents).detach()
    x_grad = x.clone().requires_grad_()
    logits = to_cnn(model)(x_grad)
    (grad,) = torch.autograd.grad(logits.gather(1, predicted[:, None]).sum(), x_grad)
    torch.testing.assert_close(rendered / 0.37, grad, atol=GRADIENT_TOL, rtol=0)


def test_rules_differ_where_they_should() -> None:
    """The three rules are not the same function (else the tests above could not tell)."""
    model = build(ARCHITECTURES["lenet"], seed=25)
    x = images(model, 2, seed=26)
    _, latents = drm.max_sum(model, x)
    classes = torch.zeros(2, dtype=torch.long)
    maps = {
        r: drm.top_down(model, classes, latents, rule=r)[0] for r in ("drm", "deconvnet", "guided")
    }
    assert not torch.allclose(maps["drm"], maps["deconvnet"])
    assert not torch.allclose(maps["drm"], maps["guided"])
    assert not torch.allclose(maps["deconvnet"], maps["guided"])


def test_unknown_rule_is_a_clear_error() -> None:
    model = build(ARCHITECTURES["lenet"])
    _, latents = drm.max_sum(model, images(model, 1))
    with pytest.raises(ValueError, match="rule must be one of"):
        drm.top_down(model, torch.zeros(1, dtype=torch.long), latents, rule="saliency")  # type: ignore[arg-type]
