"""The same identities on CUDA (skipped without a GPU). Inputs are drawn on the CPU, then moved."""

from __future__ import annotations

import pytest
import torch

import drm
from cnn_equiv import comparison_report, to_cnn
from tests.architectures import ARCHITECTURES, TINY_ARCHITECTURES, build, images

pytestmark = pytest.mark.gpu

GPU_FLOAT64_TOL = 1e-9  # cuDNN may pick other summation orders than the CPU
GPU_FLOAT32_TOL = 1e-4  # TF32 may be enabled for convolutions on Ampere and later


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_max_sum_equals_the_cnn_on_cuda(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=71).cuda()
    x = images(model, 8, seed=72)
    scores, latents = drm.max_sum(model, x)
    torch.testing.assert_close(scores, to_cnn(model)(x), atol=GPU_FLOAT64_TOL, rtol=0)
    cpu_scores, _ = drm.max_sum(model.cpu(), x.cpu())
    torch.testing.assert_close(scores.cpu(), cpu_scores, atol=GPU_FLOAT64_TOL, rtol=0)
    model.cuda()
    offset = drm.logit_offset(model, x)
    for c in range(model.num_classes):
        classes = torch.full((8,), c, dtype=torch.long, device="cuda")
        lj = drm.log_joint(model, x, classes, latents)
        torch.testing.assert_close(lj + offset, scores[:, c], atol=GPU_FLOAT64_TOL, rtol=0)


def test_float32_on_cuda() -> None:
    model = drm.DeepRenderingModel.from_config(ARCHITECTURES["lenet"]).cuda()
    x = torch.randn(16, 1, 28, 28).cuda()
    scores, _ = drm.max_sum(model, x)
    torch.testing.assert_close(scores, to_cnn(model)(x), atol=GPU_FLOAT32_TOL, rtol=0)


@pytest.mark.parametrize("name", ["padding-stride", "overlapping-leaky"])
def test_exact_map_on_cuda_matches_the_cpu(name: str) -> None:
    model = build(TINY_ARCHITECTURES[name], seed=73, nonnegative=True)
    x = images(model, 4, seed=74)
    cpu, _ = drm.exact_map(model, x)
    gpu, _ = drm.exact_map(model.cuda(), x.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=GPU_FLOAT64_TOL, rtol=0)
    report = comparison_report(model, x.cuda())
    assert report.inference_gap is not None
    assert float(report.inference_gap.abs().max()) <= GPU_FLOAT64_TOL
