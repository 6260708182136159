"""The sections of the comparison report of experiments/compare_views.py, one function each.

Each `section_*(report, model(s), ...)` writes its heading, figures and tables to the
`experiments._html.Report` and returns its headline numbers (name -> float):

1. `section_projections`: the DRM rendering, saliency, deconvnet and guided backpropagation;
2. `section_class_models`: class-score maximisation against the DRM's MAP rendering;
3. `section_units`: each unit's top patches and rendered partial template;
4. `section_inversion`: feature inversion by optimisation and by rendering, level by level;
5. `section_attacks`: FGSM, an iterative attack, template and fooling images, detection AUCs;
6. `section_refinement`: the top-down refinement of the latents, its share of the exact gap;
7. `section_renderings`: what each model draws (`rendering_statistics` for its table).

`sizes` is one entry of compare_views.SIZES (image counts, optimisation steps).

References: docs/views.md (what each section shows), docs/equivalence.md (E6).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import drm
from cnn_equiv.attacks import fooling_images
from cnn_equiv.detection import (
    DETECTION_STATISTICS,
    default_attacks,
    detection_auc,
    detection_report,
    drm_view,
)
from cnn_equiv.visualize import (
    Unit,
    bottom_up_to,
    inversion_report,
    invert_by_optimization,
    invert_by_rendering,
    map_rendering,
    maximize_class_score,
    project,
    saliency,
    top_patches,
    unit_template,
)
from drm.config import tiny_patch_config
from drm.data import Dataset, load_digits
from drm.deep_model import select_latents
from drm.inference import generative_scores
from drm.refine import inference_gap_lower_bound, refine_latents
from experiments._html import Report


def first_images_per_class(data: Dataset, per_class: int) -> tuple[Tensor, Tensor]:
    """The first `per_class` test images of every class, class by class."""
    index = torch.cat([torch.nonzero(data.y_test == c)[:per_class, 0]
                       for c in range(data.num_classes)])  # fmt: skip
    return data.x_test[index], data.y_test[index]


def predicted(model: drm.DeepRenderingModel, x: Tensor) -> Tensor:
    with torch.no_grad():
        return drm.max_sum(model, x)[0].argmax(1)


def conv_levels(model: drm.DeepRenderingModel) -> list[int]:
    return [i for i, level in enumerate(model.levels) if isinstance(level, drm.Conv)]


# --- the sections -----------------------------------------------------------------------------


def section_projections(report: Report, model: drm.DeepRenderingModel, cnn: nn.Module,
                        x: Tensor) -> dict[str, float]:  # fmt: skip
    report.heading("1. Top-down projections: the DRM rendering is the input gradient")
    classes = predicted(model, x)
    maps = {rule: project(model, x, classes, rule=rule) for rule in ("drm", "deconvnet", "guided")}
    grad = saliency(cnn, x, classes)
    level = conv_levels(model)[-1]
    activity = bottom_up_to(model, x, level).flatten(1)
    unit = Unit(level, activity.argmax(1))  # each image's most active unit of the last conv
    unit_maps = project(model, x, unit, rule="drm")
    difference = float((maps["drm"] - grad).abs().max())
    rows = [[x[i], maps["drm"][i], grad[i], maps["deconvnet"][i], maps["guided"][i], unit_maps[i]]
            for i in range(x.shape[0])]  # fmt: skip
    report.grid(
        "projections", rows, [f"predicted {int(c)}" for c in classes],
        ["image", "DRM render/σ²", "saliency", "deconvnet", "guided", f"unit, level {level}"],
        "The same top-down pass with three switch rules, and autograd's input gradient. "
        f"max |DRM rendering / sigma^2 - saliency| = {difference:.2e} (E6).",
        signed=[False, True, True, True, True, True],
    )  # fmt: skip
    return {"projection_max_difference": difference}


def section_class_models(report: Report, model: drm.DeepRenderingModel, cnn: nn.Module,
                         data: Dataset, sizes: dict[str, int]) -> dict[str, float]:  # fmt: skip
    report.heading("2. Class models: class-score maximisation against the DRM's MAP rendering")
    classes = torch.arange(data.num_classes)
    generator = torch.Generator().manual_seed(0)
    ascent = maximize_class_score(cnn, classes, steps=sizes["ascent_steps"], lr=0.1, l2=0.05,
                                  shape=model.input_shape, generator=generator)  # fmt: skip
    means = torch.stack([data.x_train[data.y_train == c].mean(0) for c in classes])
    mapped = map_rendering(model, classes, steps=sizes["map_steps"], start=means.to(model.dtype))
    with torch.no_grad():
        ascent_pred = cnn(ascent.image).argmax(1)
        map_pred = predicted(model, mapped.image)
    rows = [list(ascent.image), list(mapped.image), list(means)]
    report.grid(
        "class_models", rows, ["max class score", "DRM MAP", "class mean"],
        [f"class {c}" for c in range(len(classes))],
        "Top: gradient ascent on the class score with an L2 penalty, from noise. Middle: the "
        "rendering mu(c, z) of the latents found by alternating x <- mu(c, z) and coordinate "
        "ascent over z, started from the latents of the class mean (bottom).",
        signed=[True] * len(classes), signed_rows=[True, True, False],
    )  # fmt: skip
    report.table(
        ["", "classified as its class", "final objective (mean)"],
        [["class-score maximisation", f"{int((ascent_pred == classes).sum())}/{len(classes)}",
          float(ascent.trace[-1].mean())],
         ["DRM MAP rendering", f"{int((map_pred == classes).sum())}/{len(classes)}",
          float(mapped.trace[-1].mean())]],
    )  # fmt: skip
    return {"ascent_correct": float((ascent_pred == classes).double().mean()),
            "map_correct": float((map_pred == classes).double().mean())}  # fmt: skip


def section_units(report: Report, model: drm.DeepRenderingModel, data: Dataset,
                  sizes: dict[str, int]) -> dict[str, float]:  # fmt: skip
    report.heading("3. Individual units: top patches and rendered partial templates")
    pool = data.x_test[: sizes["unit_images"]]
    rows, labels = [], []
    for level in conv_levels(model):
        channels = model.levels[level].out_shape[0]
        for channel in range(min(sizes["units_per_level"], channels)):
            top = top_patches(model, pool, level, channel, sizes["top_k"])
            template = unit_template(
                model, level, top.units[:1], select_latents(top.latents, slice(0, 1))
            )
            rows.append([*top.patches, template[0]])
            labels.append(f"level {level}, ch {channel}")
    report.grid(
        "units", rows, labels,
        [f"top {i + 1}" for i in range(sizes["top_k"])] + ["template"],
        f"The {sizes['top_k']} patches of {len(pool)} test images where each unit's bottom-up "
        "message is largest (its receptive field), and the unit's partial template: the "
        "rendering of a one-hot at the unit with the latents of its top image.",
        signed=[False] * sizes["top_k"] + [True],
    )  # fmt: skip
    return {}


def section_inversion(report: Report, model: drm.DeepRenderingModel, x: Tensor,
                      sizes: dict[str, int]) -> dict[str, float]:  # fmt: skip
    report.heading("4. Feature inversion, layer by layer")
    levels = [-1, *[i for i, lv in enumerate(model.levels)
                    if not isinstance(lv, (drm.Flatten, drm.Classes))]]  # fmt: skip
    table = inversion_report(model, x, levels, steps=sizes["inversion_steps"], lr=0.05,
                             generator=torch.Generator().manual_seed(1))  # fmt: skip
    skipped = [f"{i} ({type(lv).__name__})" for i, lv in enumerate(model.levels)
               if i not in levels]  # fmt: skip
    report.paragraph(
        "Level 'input' is the image itself (both inversions must reproduce it); level i is the "
        "output of the model's level i. Not inverted: "
        + ", ".join(skipped)
        + " (a Flatten holds the same numbers as the level before it; the class level's output "
        "is the scores)."
    )
    names = ["input" if lv == -1 else str(lv) for lv in table["level"]]
    report.table(
        ["level", "kind", "features", "rendering error", "(scale-invariant)",
         "optimisation error", "(scale-invariant)"],
        [list(r) for r in zip(names, table["kind"], table["features"],
                              table["rendering_error"], table["rendering_scale_invariant_error"],
                              table["optimization_error"],
                              table["optimization_scale_invariant_error"], strict=True)],
    )  # fmt: skip
    shown = [i for i in levels if i >= 0][:: max(1, len(levels) // 4)]
    rows = []
    for level in shown:
        rendered = invert_by_rendering(model, x[:1], level)
        target = bottom_up_to(model, x[:1], level)
        optimised = invert_by_optimization(
            model,
            target,
            level,
            steps=sizes["inversion_steps"],
            generator=torch.Generator().manual_seed(2),
        ).image
        rows.append([x[0], rendered[0], optimised[0]])
    report.grid(
        "inversion", rows, [f"level {i} ({type(model.levels[i]).__name__})" for i in shown],
        ["image", "DRM rendering", "optimisation"],
        "Reconstructions of one test image from the features of a level: the DRM's top-down "
        "rendering with the image's latents, and gradient descent on ||phi(x) - phi(x0)||^2 from "
        "noise (relative errors of all levels in the table above).",
        signed=[False, True, False],
    )  # fmt: skip
    return {f"rendering_error_level_{lv}": float(e)
            for lv, e in zip(table["level"], table["rendering_error"], strict=True)}  # fmt: skip


def section_attacks(report: Report, model: drm.DeepRenderingModel, data: Dataset,
                    sizes: dict[str, int]) -> dict[str, float]:  # fmt: skip
    report.heading("5. Breaking the CNN, and what the DRM sees")
    x, y = data.x_test[: sizes["attack_images"]], data.y_test[: sizes["attack_images"]]
    eps = 0.1
    # FGSM, BIM (step eps / 4, 10 steps) and the minimal template attack toward the runner-up
    # class, under the report's labels
    names = (f"FGSM eps={eps}", f"BIM eps={eps}, 10 steps", "other class's template")
    attacks = dict(zip(names, default_attacks(eps, 10).values(), strict=True))
    detection = detection_report(model, x, y, attacks)
    fooled = fooling_images(model, torch.arange(data.num_classes), sizes["fooling_steps"],
                            generator=torch.Generator().manual_seed(3))  # fmt: skip
    fooled_view = drm_view(model, fooled)
    clean = detection.views["clean"]
    fooling_auc = {name: detection_auc(sign * clean.statistic(name),
                                       sign * fooled_view.statistic(name))
                   for name, sign in DETECTION_STATISTICS.items()}  # fmt: skip
    examples = {name: fn(model, x[:6], y[:6]) for name, fn in attacks.items()}
    rows = [[x[i], *(adv[i] for adv in examples.values()), fooled[i]] for i in range(6)]
    labels = [f"label {int(y[i])}" for i in range(6)]
    report.grid(
        "attacks", rows, labels, ["clean", *examples.keys(), "fooling image of class i"],
        "Clean test images, their adversarial versions, and fooling images grown from noise "
        "(row i: the fooling image of class i).",
    )  # fmt: skip
    report.table(
        ["images", "CNN accuracy", "compared"],
        [[name, detection.accuracy[name], detection.counts[name]] for name in detection.accuracy]
        + [["fooling images (confidence)", float(fooled_view.max_softmax.mean()), len(fooled)]],
    )  # fmt: skip
    stats = list(DETECTION_STATISTICS)
    report.paragraph(
        "ROC AUC of each per-image statistic for telling attacked images (positives) from clean "
        "ones; each statistic is signed so that larger means more suspicious: low log-joint, high "
        "reconstruction error, large inference gap (lower bound from the refinement), low "
        "maximum softmax. 0.5 is chance."
    )
    report.table(
        ["attack", *stats],
        [[name, *(detection.auc[name][s] for s in stats)] for name in detection.auc]
        + [["fooling images", *(fooling_auc[s] for s in stats)]],
    )  # fmt: skip
    aucs = {f"auc {a} {s}": v for a, row in detection.auc.items() for s, v in row.items()}
    return {**{f"accuracy {k}": v for k, v in detection.accuracy.items()}, **aucs}


def section_refinement(report: Report, model: drm.DeepRenderingModel, data: Dataset,
                       sizes: dict[str, int]) -> dict[str, float]:  # fmt: skip
    report.heading("6. Inference beyond the CNN: refining the latents top-down")
    # a tiny model on real 4x4 digit patches, where the exact MAP is computable: each class's
    # exact inference gap and the part of it the refinement closes (drm_view)
    tiny = drm.DeepRenderingModel.from_config(tiny_patch_config(), seed=0, dtype=torch.float64)
    patches = load_digits().x_test[:32, :, 2:6, 2:6].to(torch.float64).contiguous()
    exact_gaps, lower_bounds = [], []
    for c in range(3):
        view = drm_view(tiny, patches, torch.full((32,), c), exact=True)
        assert view.exact_gap is not None  # exact=True
        exact_gaps.append(view.exact_gap)
        lower_bounds.append(view.gap_lower_bound)
    gap, closed = torch.stack(exact_gaps, 1).sum(), torch.stack(lower_bounds, 1).sum()
    # the trained model: refine every class's latents, see whether the MAP class changes
    x = data.x_test[: sizes["refine_images"]]
    with torch.no_grad():
        cnn_scores, cnn_latents = drm.max_sum(model, x)
    refined_scores = torch.stack([refine_latents(model, x, torch.full((len(x),), c), cnn_latents)[1]
                                  for c in range(model.num_classes)], 1)  # fmt: skip
    flips = refined_scores.argmax(1) != cnn_scores.argmax(1)
    changed = flips.double().mean()
    y = data.y_test[: len(x)]
    acc_cnn = (cnn_scores.argmax(1) == y).double().mean()
    acc_refined = (refined_scores.argmax(1) == y).double().mean()
    report.table(
        ["quantity", "value"],
        [["tiny model: exact inference gap, summed over 32 patches x 3 classes", float(gap)],
         ["tiny model: fraction of it the refinement closes", float(closed / gap)],
         [f"trained model: mean gain of the refined score over max-sum ({len(x)} images)",
          float((refined_scores - cnn_scores).mean())],
         ["trained model: images whose MAP class changes", float(changed)],
         ["trained model: accuracy, max-sum (the CNN)", float(acc_cnn)],
         ["trained model: accuracy, refined latents", float(acc_refined)]],
    )  # fmt: skip
    shown = torch.nonzero(flips)[:4, 0]
    if len(shown):
        cnn_class, new_class = cnn_scores.argmax(1)[shown], refined_scores.argmax(1)[shown]
        shown_latents = select_latents(cnn_latents, shown)
        new_latents = refine_latents(model, x[shown], new_class, shown_latents)[0]
        with torch.no_grad():
            before = drm.render(model, cnn_class, shown_latents)
            after = drm.render(model, new_class, new_latents)
        report.grid(
            "refinement", [[x[i], before[j], after[j]] for j, i in enumerate(shown.tolist())],
            [f"{int(a)} -> {int(b)}" for a, b in zip(cnn_class, new_class, strict=True)],
            ["image", "rendering, CNN latents", "rendering, refined"],
            "Images whose MAP class changes when the latents are refined top-down: the rendering "
            "of the CNN's class with its latents, and of the new class with the refined latents.",
            signed=[False, True, True],
        )  # fmt: skip
    return {"tiny_gap_closed": float(closed / gap), "prediction_changed": float(changed),
            "accuracy_cnn": float(acc_cnn), "accuracy_refined": float(acc_refined)}  # fmt: skip


def rendering_statistics(model: drm.DeepRenderingModel, x: Tensor, y: Tensor) -> list[float]:
    """[CNN accuracy, generative accuracy, rendering MSE per pixel, inference-gap bound]."""
    with torch.no_grad():
        scores, latents = drm.max_sum(model, x)
        mu = drm.render(model, scores.argmax(1), latents)
        generative = generative_scores(model, x, latents).argmax(1)
    gap = inference_gap_lower_bound(model, x, max_sweeps=5)
    return [float((scores.argmax(1) == y).double().mean()),
            float((generative == y).double().mean()), float(((x - mu) ** 2).mean()),
            float(gap.mean())]  # fmt: skip


def section_renderings(report: Report, models: dict[str, drm.DeepRenderingModel], data: Dataset,
                       sizes: dict[str, int]) -> dict[str, float]:  # fmt: skip
    report.heading("7. Renderings: what the model draws")
    x, y = first_images_per_class(data, 1)
    x, y = x[: sizes["rendering_images"]], y[: sizes["rendering_images"]]
    rows = [[image] for image in x]
    for model in models.values():
        with torch.no_grad():
            scores, latents = drm.max_sum(model, x)
            mu = drm.render(model, scores.argmax(1), latents)
        for row, rendered in zip(rows, mu, strict=True):
            row.append(rendered)
    names = list(models)
    report.grid(
        "renderings", rows, [f"label {int(c)}" for c in y],
        ["image", *(f"mu(c^, z*): {n}" for n in names)],
        "Each test image and the rendering mu(c^, z*) of its predicted class at the max-sum "
        "latents (the image the model would draw, up to noise), for each model. A model trained "
        "to reconstruct its images (semi-supervised, --algo ssl) draws digits; a CNN trained by "
        "cross-entropy alone draws its input gradient, which need not look like one.",
        signed=[False, *([True] * len(names))],
    )  # fmt: skip
    classes = torch.arange(data.num_classes)
    every = []
    for model in models.values():
        with torch.no_grad():
            _, latents = drm.max_sum(model, x[:1].expand(len(classes), *x.shape[1:]))
            every.append(list(drm.render(model, classes, latents)))
    report.grid(
        "renderings_every_class", every, names, [f"class {int(c)}" for c in classes],
        "Every class rendered through the latents of the first image above: the candidates the "
        "generative classifier (arg max_c log p(x, c, z*), factorized prior) compares with it.",
        signed=[True] * len(classes),
    )  # fmt: skip
    samples = []
    for model in models.values():
        with torch.no_grad():
            draw = drm.sample(model, len(classes), generator=torch.Generator().manual_seed(4))
        samples.append(list(draw.x))
    report.grid(
        "renderings_samples", samples, names, [f"draw {i + 1}" for i in range(len(classes))],
        "Ancestral samples from the factorized prior (class, every switch ON with its prior, "
        "every translation uniform, then pixel noise): the switches of a CNN's latents are "
        "far from independent, so these look like noise for either training.",
        signed=[True] * len(classes),
    )  # fmt: skip
    pool_x, pool_y = data.x_test[: sizes["rendering_pool"]], data.y_test[: sizes["rendering_pool"]]
    table = {name: rendering_statistics(model, pool_x, pool_y) for name, model in models.items()}
    report.table(
        ["model", "accuracy (CNN, max-sum)", "accuracy (generative classifier)",
         "rendering MSE per pixel", "inference-gap bound (mean)"],
        [[name, *values] for name, values in table.items()],
    )  # fmt: skip
    return {f"{key} {name}": value for name, values in table.items()
            for key, value in zip(("accuracy", "generative_accuracy", "rendering_mse",
                                   "inference_gap"), values, strict=True)}  # fmt: skip
