"""labkit.explore: the view for given settings is exactly what the labkit functions return for
them, and the widgets, driven programmatically, show it (predictions, figure, status)."""
import io

import matplotlib.image
import pytest
import torch

from labkit import attacks, attribution, data
from labkit.explore import (LRP_RULES, METHODS, Settings, compute_view, explore, figure,
                            occlusion_window, prediction_text)

CLASSES = list(data.FASHION_CLASSES)


@pytest.fixture(scope="module")
def batch():
    return data.fashion_mnist("test").tensors(range(6))


@pytest.fixture
def explorer(fmnist_cnn, fmnist_cnn_robust, batch):
    x, y = batch
    return explore(fmnist_cnn, x, y, CLASSES, robust=fmnist_cnn_robust)


def expected_heatmap(model, x, target, settings):
    """The attribution the settings name, called directly (not through the explorer)."""
    calls = {
        "gradient": lambda: attribution.gradient(model, x, target),
        "gradient × input": lambda: attribution.gradient_x_input(model, x, target),
        "SmoothGrad": lambda: attribution.smoothgrad(
            model, x, target, n_samples=settings.n_samples, sigma=settings.sigma,
            generator=torch.Generator().manual_seed(0), progress=False),
        "integrated gradients": lambda: attribution.integrated_gradients(model, x, target, progress=False),
        "occlusion": lambda: attribution.occlusion(model, x, target, window=4, stride=2, progress=False),
        "guided backprop": lambda: attribution.guided_backprop(model, x, target),
        "Grad-CAM": lambda: attribution.gradcam(model, x, target, layer=settings.layer),
        "guided Grad-CAM": lambda: attribution.guided_gradcam(model, x, target, layer=settings.layer),
        "LRP": lambda: attribution.lrp(model, x, target, composite="epsilon_gamma_box"),
    }
    reduce = "max_abs" if settings.method in ("gradient", "SmoothGrad", "guided backprop", "guided Grad-CAM") \
        else "sum"
    return attribution.to_heatmap(calls[settings.method](), reduce)[0]


@pytest.mark.parametrize("method", list(METHODS))
def test_view_is_the_labkit_attribution_of_the_attacked_image(fmnist_cnn, batch, method):
    x, y = batch
    settings = Settings(image=2, method=method, eps=0.05, n_samples=8, sigma=0.2, layer="conv4")
    (view,) = compute_view({"model": fmnist_cnn}, x, settings, y)
    x_adv = attacks.fgsm(fmnist_cnn, x[2:3], y[2:3], 0.05)
    probabilities = fmnist_cnn(x_adv).softmax(1)[0].detach()
    assert torch.equal(view.image, x_adv)
    torch.testing.assert_close(view.probabilities, probabilities)
    assert view.target == view.prediction == int(probabilities.argmax())
    torch.testing.assert_close(view.heatmap, expected_heatmap(fmnist_cnn, x_adv, view.target, settings))


def test_pgd_target_and_no_labels(fmnist_cnn, batch):
    x, _ = batch
    settings = Settings(image=1, attack="PGD", eps=0.1, target=7)
    (view,) = compute_view({"model": fmnist_cnn}, x, settings)  # no labels: away from the prediction
    clean_prediction = fmnist_cnn(x[1:2]).argmax(1)
    x_adv = attacks.pgd(fmnist_cnn, x[1:2], clean_prediction, 0.1, steps=10)
    assert torch.equal(view.image, x_adv)
    assert view.target == 7
    torch.testing.assert_close(view.heatmap, attribution.gradient(fmnist_cnn, x_adv, 7).abs().amax(1)[0])


def test_every_registered_method_is_offered_with_lrps_own_choices():
    assert {m.name for m in METHODS.values()} == set(attribution.METHODS)
    from labkit.attribution.lrp import NAMED
    assert LRP_RULES == tuple(NAMED) and "zbox" not in LRP_RULES and "epsilon_gamma_box" in LRP_RULES


def test_occlusion_window_scales_with_the_image():
    assert occlusion_window(torch.zeros(1, 1, 28, 28)) == 4
    assert occlusion_window(torch.zeros(1, 3, 224, 224)) == 32


def test_progress_is_reported_up_to_the_end(fmnist_cnn, fmnist_cnn_robust, batch):
    steps = []
    compute_view({"a": fmnist_cnn, "b": fmnist_cnn_robust}, batch[0], Settings(), batch[1],
                 progress=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_settings_refuse_unknown_choices():
    with pytest.raises(ValueError, match="method must be one of"):
        Settings(method="saliency")
    with pytest.raises(ValueError, match="attack must be one of"):
        Settings(attack="CW")
    with pytest.raises(ValueError, match="rule must be one of"):
        Settings(rule="z")


def test_default_panel_shows_both_models_clean(explorer, fmnist_cnn, fmnist_cnn_robust, batch):
    x, _ = batch
    assert explorer.settings() == Settings(layer="relu5")
    for label, name, model in zip(explorer.predictions, ("standard", "robust"),
                                  (fmnist_cnn, fmnist_cnn_robust)):
        probabilities = model(x[:1]).softmax(1).detach()
        assert label.value == f"{name}: {CLASSES[int(probabilities.argmax())]} " \
                              f"{probabilities.max().item():.0%}"
    assert explorer.image.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_moving_eps_changes_predictions_and_figure(explorer, fmnist_cnn, fmnist_cnn_robust, batch):
    x, y = batch
    before_labels, before_png = [p.value for p in explorer.predictions], explorer.image.value
    explorer.controls["attack"].value = "PGD"
    explorer.controls["eps"].value = 0.2
    explorer.wait()
    assert explorer.status.value == ""
    expected = compute_view({"standard": fmnist_cnn, "robust": fmnist_cnn_robust}, x,
                            explorer.settings(), y)
    assert [p.value for p in explorer.predictions] == [prediction_text(v, CLASSES) for v in expected]
    assert [p.value for p in explorer.predictions] != before_labels  # PGD at 0.2 fools the standard model
    assert explorer.image.value != before_png
    for shown, computed in zip(explorer.view, expected):
        assert torch.equal(shown.image, computed.image)
        torch.testing.assert_close(shown.heatmap, computed.heatmap)


@pytest.mark.parametrize("method, control, value", [
    ("Grad-CAM", "layer", "conv2"),
    ("LRP", "rule", "zplus"),
    ("SmoothGrad", "sigma", 0.3),
    ("gradient × input", "target", 3),
    ("occlusion", "image", 4),
])
def test_each_control_reaches_the_computation(explorer, fmnist_cnn, batch, method, control, value):
    x, y = batch
    explorer.controls["method"].value = method
    explorer.controls[control].value = value
    explorer.wait()
    settings = explorer.settings()
    assert getattr(settings, control) == (value if control != "target" else 3)
    x_image = x[settings.image:settings.image + 1]
    target = explorer.view[0].target
    if control == "target":
        assert target == 3
    expected = {
        "layer": lambda: attribution.gradcam(fmnist_cnn, x_image, target, layer="conv2"),
        "rule": lambda: attribution.lrp(fmnist_cnn, x_image, target, rule="zplus"),
        "sigma": lambda: attribution.smoothgrad(fmnist_cnn, x_image, target, n_samples=20, sigma=0.3,
                                                generator=torch.Generator().manual_seed(0),
                                                progress=False),
        "target": lambda: attribution.gradient_x_input(fmnist_cnn, x_image, 3),
        "image": lambda: attribution.occlusion(fmnist_cnn, x_image, target, window=4, stride=2,
                                               progress=False),
    }[control]()
    reduce = "max_abs" if method == "SmoothGrad" else "sum"
    torch.testing.assert_close(explorer.view[0].heatmap, attribution.to_heatmap(expected, reduce)[0])


def test_only_the_chosen_methods_options_are_visible(explorer):
    def visible():
        return {n for n in ("n_samples", "sigma", "layer", "rule")
                if explorer.controls[n].layout.display != "none"}
    assert visible() == set()
    explorer.controls["method"].value = "SmoothGrad"
    assert visible() == {"n_samples", "sigma"}
    explorer.controls["method"].value = "LRP"
    assert visible() == {"rule"}
    explorer.wait()


def test_changes_made_while_busy_end_on_the_last_settings(explorer, fmnist_cnn, fmnist_cnn_robust, batch):
    x, y = batch
    for rule in LRP_RULES[:4]:
        explorer.controls["method"].value = "LRP"
        explorer.controls["rule"].value = rule
    explorer.controls["image"].value = 5
    explorer.wait()
    expected = compute_view({"standard": fmnist_cnn, "robust": fmnist_cnn_robust}, x,
                            Settings(image=5, method="LRP", rule=LRP_RULES[3], layer="conv5"), y)
    for shown, computed in zip(explorer.view, expected):
        torch.testing.assert_close(shown.heatmap, computed.heatmap)


def test_an_error_is_shown_in_the_panel(fmnist_cnn, batch):
    panel = explore(fmnist_cnn, batch[0], batch[1], CLASSES, layers=["conv5", "no_such_layer"])
    panel.controls["method"].value = "Grad-CAM"
    panel.controls["layer"].value = "no_such_layer"
    panel.wait()
    assert panel.status.value.startswith("ValueError: the model has no layer named 'no_such_layer'")
    panel.controls["layer"].value = "conv5"
    panel.wait()
    assert panel.status.value == ""


def test_static_fallback_is_a_png_of_the_default_view(explorer, fmnist_cnn, fmnist_cnn_robust, batch):
    explorer.controls["eps"].value = 0.1  # the fallback stays the default view
    explorer.wait()
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert isinstance(bundle["image/png"], bytes)  # IPython base64-encodes bytes, not memoryviews
    picture = matplotlib.image.imread(io.BytesIO(bundle["image/png"]), format="png")
    views = compute_view({"standard": fmnist_cnn, "robust": fmnist_cnn_robust}, batch[0],
                         Settings(layer="conv5"), batch[1])
    drawn = figure(views, CLASSES, "gradient")
    width, height = drawn.get_size_inches() * drawn.dpi
    assert picture.shape[:2] == (round(height), round(width))
    text = bundle["text/plain"]
    assert "gradient, eps = 0" in text and prediction_text(views[1], CLASSES) in text
    assert "0x" not in text and explorer.model_id not in text  # the same on every run (nbval)


def test_bad_input_is_refused(fmnist_cnn, batch):
    x, y = batch
    with pytest.raises(ValueError, match="classes must name the model's 10 classes"):
        explore(fmnist_cnn, x, y, CLASSES[:9])
    with pytest.raises(ValueError, match="labels must give one class per image"):
        explore(fmnist_cnn, x, y[:3], CLASSES)
    with pytest.raises(ValueError, match="eps_max"):
        explore(fmnist_cnn, x, eps_max=2)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        explore(fmnist_cnn, x.numpy())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        explore(fmnist_cnn, x, robust="fmnist-cnn-robust")


def test_model_is_left_as_it_was(fmnist_cnn, batch):
    before = [(n, p.requires_grad, p.grad) for n, p in fmnist_cnn.named_parameters()]
    panel = explore(fmnist_cnn, batch[0], batch[1], CLASSES)
    for method in METHODS:
        panel.controls["method"].value = method
        panel.wait()
    assert [(n, p.requires_grad, p.grad) for n, p in fmnist_cnn.named_parameters()] == before
    assert not fmnist_cnn.training
    assert all(not getattr(m, d) for m in fmnist_cnn.modules()
               for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))


def test_each_view_carries_a_line_of_metrics_of_its_map(fmnist_cnn, batch):
    """The line under the heatmap is labkit.attribution.metrics.summary of the view's map."""
    x, _ = batch
    view = compute_view({"standard": fmnist_cnn}, x, Settings(image=1))[0]
    assert view.metrics == attribution.metrics.summary(fmnist_cnn, view.image, view.target, view.heatmap[None])
    assert "ROAD MoRF" in view.metrics and "\n" not in view.metrics
