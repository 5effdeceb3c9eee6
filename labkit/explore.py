"""The explorer: one panel in which a student picks an image, an attribution method, a target
class and an attack size, and sees the heatmaps and the predictions of a standard and a robust
model side by side, updated as the controls move.

The explorer is a thin layer over labkit: :func:`compute_view` turns the settings into what is
shown (attacked image, probabilities, heatmap per model) by calling :mod:`labkit.attacks` and
:mod:`labkit.attribution`, :func:`figure` draws it, and :class:`Explorer` only wires ipywidgets
to these two. Work for a new setting runs in a background thread, so the panel stays responsive
while EfficientNet-Lite0 computes (a progress bar shows how far it got); settings that change
meanwhile are computed next, the ones in between are skipped.

Without a widget frontend (nbval, nbconvert, a notebook viewer) the explorer shows a static
figure of its default view: its display bundle carries a PNG beside the widget view.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure
from torch import nn

from . import attacks, attribution, plot
from ._core import check_images, check_model, model_device, preserved
from .attribution.cam import cam_layer_name

PGD_STEPS = 10
SMOOTHGRAD_SEED = 0  # the same noise for every view, so only the student's settings change it

# What the explorer offers, by label: every method of labkit.attribution.METHODS, with the
# options (controls) and the heatmap reduction its table row gives.
METHODS: dict[str, attribution.Method] = {m.label: m for m in attribution.METHODS.values()}
ATTACKS = ("FGSM", "PGD")
# The options of all methods, each once: one control each, shown while a method that has it is chosen.
OPTIONS: dict[str, attribution.Option] = {name: option for m in METHODS.values()
                                          for name, option in m.options.items()}
LRP_RULES = tuple(OPTIONS["rule"].choices)  # lrp's own rules and composites (lrp.NAMED)


def _settings_post_init(self):
    if self.method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
    if self.attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}")
    for name, option in OPTIONS.items():
        if option.choices is not None and getattr(self, name) not in option.choices:
            raise ValueError(f"{name} must be one of {tuple(option.choices)}, got {getattr(self, name)!r}")


# The explorer's defaults; a field per method option follows them (``n_samples``, ``sigma``,
# ``layer``, ``rule``, ...), with the option's default.
Settings = dataclasses.make_dataclass(
    "Settings",
    [("image", int, 0), ("method", str, "gradient"), ("target", "int | None", None),
     ("attack", str, "FGSM"), ("eps", float, 0.0),
     *((name, Any, option.default) for name, option in OPTIONS.items())],
    namespace={"__post_init__": _settings_post_init, "__module__": __name__, "__doc__":
               """What the student picked. ``target=None`` explains the model's prediction; ``layer=None``
    is Grad-CAM's default (the model's ``gradcam_layer``); ``eps=0`` is the clean image; one field
    per method option (:data:`OPTIONS`)."""},
    frozen=True)


@dataclass(frozen=True)
class ModelView:
    """What one model shows: the image it sees (attacked when eps > 0, ``1 x C x H x W``), its
    class probabilities, the class explained, the ``H x W`` heatmap of that explanation and a
    line of its metrics (:func:`labkit.attribution.metrics.summary`)."""
    name: str
    image: torch.Tensor
    probabilities: torch.Tensor
    target: int
    heatmap: torch.Tensor
    metrics: str = ""

    @property
    def prediction(self) -> int:
        return int(self.probabilities.argmax())


def attribute(model: nn.Module, x: torch.Tensor, target: int, settings: Settings) -> torch.Tensor:
    """The attribution the settings ask for, ``B x C x H x W`` (``B x 1 x H x W`` for Grad-CAM):
    the method's function with its options from the settings (a choice stands for the keyword
    arguments it names) and :func:`view_options`."""
    method = METHODS[settings.method]
    options = view_options(method.function, x)
    for name, option in method.options.items():
        value = getattr(settings, name)
        options.update(option.choices[value] if option.choices is not None else {name: value})
    return method.function(model, x, target, **options)


def view_options(function: Callable, x: torch.Tensor) -> dict:
    """What every interactive view passes where the method takes it: no progress bar, the same
    noise on every view, and an occlusion window sized to the image."""
    takes = inspect.signature(function).parameters
    fixed = {"progress": False,
             "generator": torch.Generator(x.device).manual_seed(SMOOTHGRAD_SEED),
             "window": occlusion_window(x), "stride": max(1, occlusion_window(x) // 2)}
    return {name: value for name, value in fixed.items() if name in takes}


def occlusion_window(x: torch.Tensor) -> int:
    """A patch of 1/7 of the image side (4 pixels of 28, 32 of 224): 13 x 13 positions at half
    overlap, whatever the image size, so occlusion costs the same number of forward passes."""
    return max(1, min(x.shape[-2:]) // 7)


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Settings) -> torch.Tensor:
    """``x`` attacked as the settings say (untargeted, away from ``y``), or ``x`` when eps = 0."""
    if settings.eps == 0:
        return x
    if settings.attack == "FGSM":
        return attacks.fgsm(model, x, y, settings.eps)
    return attacks.pgd(model, x, y, settings.eps, steps=PGD_STEPS)


def compute_view(models: Mapping[str, nn.Module], images: torch.Tensor, settings: Settings,
                 labels: torch.Tensor | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[ModelView]:
    """What the explorer shows for ``settings``, one :class:`ModelView` per model (name -> model).

    For each model: the image is attacked away from its label (without labels: from the model's
    own clean prediction), the model's probabilities on the result are computed, and the target
    (``settings.target``, else the prediction) is explained by the chosen method. ``progress``
    is called with (steps done, steps in all) as the work goes on.
    """
    if not 0 <= settings.image < len(images):
        raise ValueError(f"settings.image must index the {len(images)} images, got {settings.image}")
    total, views = 2 * len(models), []
    for name, model in models.items():
        x = images[settings.image:settings.image + 1].to(model_device(model))
        y = (labels[settings.image:settings.image + 1].to(x.device) if labels is not None
             else predict(model, x).argmax(1))
        x = attack(model, x, y, settings)
        probabilities = predict(model, x)[0]
        target = int(probabilities.argmax()) if settings.target is None else settings.target
        _report(progress, 2 * len(views) + 1, total)
        attr = attribute(model, x, target, settings)
        heatmap = attribution.to_heatmap(attr, METHODS[settings.method].heatmap)[0]
        line = attribution.metrics.summary(model, x, target, heatmap[None])
        views.append(ModelView(name, x.cpu(), probabilities.cpu(), target, heatmap.cpu(), line))
        _report(progress, 2 * len(views), total)
    return views


def _report(progress, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities, ``B x classes`` (the model left as it was)."""
    with preserved(model), torch.no_grad():
        return model.eval()(x).softmax(dim=1)


def prediction_text(view: ModelView, classes: Sequence[str]) -> str:
    """``"robust: Sneaker 97%"``: the model's name, its top class and its probability."""
    return f"{view.name}: {plot.prediction_labels(view.probabilities[None], classes)[0]}"


def figure(views: Sequence[ModelView], classes: Sequence[str], method: str) -> Figure:
    """One row: for each model, the image it sees with its prediction above, then the heatmap of
    the explained class (diverging colours around 0 for signed methods)."""
    return plot.side_by_side([view.image for view in views], [view.heatmap for view in views],
                             [prediction_text(view, classes) for view in views],
                             [f"{method} for {classes[view.target]}" for view in views],
                             [view.metrics for view in views])


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=plot.DPI)
    return buffer.getvalue()


class Explorer(widgets.VBox):
    """The panel made by :func:`explore`: controls on top, predictions, status and figure below.

    ``controls`` (a dict of the widgets by :class:`Settings` field), ``predictions`` (one Label
    per model), ``image`` (the figure as a PNG) and ``view`` (the :class:`ModelView` list shown)
    are public so that tests and scripts can drive it; :meth:`wait` blocks until the views asked
    for are shown. The worker thread uses the models while the student may run other cells:
    a cell that uses the same model at that moment could see LRP's or guided backprop's hooks.
    """

    def __init__(self, models: Mapping[str, nn.Module], images: torch.Tensor, labels, classes,
                 names: Sequence[str], layers: Sequence[str], eps_max: float):
        self._models, self._images, self._labels, self._classes = dict(models), images, labels, classes
        self.controls = _controls(classes, names, layers, eps_max)
        self.predictions = [widgets.Label(layout=widgets.Layout(margin="0 2em 0 0")) for _ in models]
        self.status = widgets.Label()
        self.progress = widgets.FloatProgress(min=0, max=1, layout=widgets.Layout(visibility="hidden"))
        self.image = widgets.Image(format="png")
        self._lock, self._pending, self._worker = threading.Lock(), None, None
        default = self.settings()
        self._show(compute_view(self._models, images, default, labels), default.method)
        self._default = (bytes(self.image.value), self._summary(default, self.view))
        _show_relevant(self.controls)
        for control in self.controls.values():
            control.observe(self._changed, "value")
        super().__init__([_layout(self.controls),
                          widgets.HBox([*self.predictions, self.progress, self.status]), self.image])

    def settings(self) -> Settings:
        """The settings the controls show now."""
        values = {name: control.value for name, control in self.controls.items()}
        values["target"] = None if values["target"] < 0 else values["target"]
        return Settings(**values)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every change made so far is computed and shown (tests, scripts)."""
        while (worker := self._worker) is not None:
            worker.join(timeout)
            if worker.is_alive():  # timed out
                return

    def _changed(self, change) -> None:
        _show_relevant(self.controls)
        with self._lock:
            self._pending = self.settings()
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, daemon=True)
                self._worker.start()

    def _work(self) -> None:
        """Compute the latest settings until none are waiting (runs in the worker thread)."""
        while True:
            with self._lock:
                settings, self._pending = self._pending, None
                if settings is None:
                    self._worker = None
                    return
            self.status.value, self.progress.value = "computing…", 0.0
            self.progress.layout.visibility = "visible"
            try:
                view = compute_view(self._models, self._images, settings, self._labels,
                                    progress=self._progress)
                self._show(view, settings.method)
                self.status.value = ""
            except Exception as error:  # shown in the panel: an exception in a thread is lost
                self.status.value = f"{type(error).__name__}: {error}"
            finally:
                self.progress.layout.visibility = "hidden"

    def _progress(self, done: int, total: int) -> None:
        self.progress.value = done / total

    def _show(self, view: list[ModelView], method: str) -> None:
        self.view = view
        self.image.value = png(figure(view, self._classes, method))
        for label, model_view in zip(self.predictions, view):
            label.value = prediction_text(model_view, self._classes)

    def _summary(self, settings: Settings, view: list[ModelView]) -> str:
        predictions = ", ".join(prediction_text(v, self._classes) for v in view)
        return (f"labkit explorer ({len(self._images)} images; needs a live kernel with ipywidgets "
                f"to move the controls). Shown: image {settings.image}, {settings.method}, "
                f"eps = {settings.eps:g}: {predictions}")

    def _repr_mimebundle_(self, **kwargs):
        """The widget view for a live frontend, and a PNG of the default view for every place
        without one (nbconvert, nbval, a notebook viewer)."""
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["image/png"], bundle["text/plain"] = self._default
        return bundle


def _controls(classes: Sequence[str], names: Sequence[str], layers: Sequence[str],
              eps_max: float) -> dict[str, widgets.ValueWidget]:
    """One widget per :class:`Settings` field, showing its default."""
    default = Settings()
    wide = {"style": {"description_width": "initial"}}
    return {
        "image": widgets.Dropdown(options=[(n, i) for i, n in enumerate(names)], value=default.image,
                                  description="image", **wide),
        "method": widgets.Dropdown(options=list(METHODS), value=default.method, description="method", **wide),
        "target": widgets.Dropdown(options=[("the prediction", -1)] + [(c, i) for i, c in enumerate(classes)],
                                   value=-1, description="explain", **wide),
        "attack": widgets.Dropdown(options=list(ATTACKS), value=default.attack, description="attack",
                                   layout=widgets.Layout(width="12em"), **wide),
        "eps": widgets.FloatSlider(value=default.eps, min=0.0, max=eps_max, step=eps_max / 60,
                                   readout_format=".3f", description="ε", continuous_update=False,
                                   layout=widgets.Layout(width="28em"), **wide),
        **{name: _control(name, option, layers) for name, option in OPTIONS.items()},
    }


# how an option's name reads on its control
_DESCRIPTIONS = {"n_samples": "N", "sigma": "σ"}


def _control(name: str, option: attribution.Option, layers: Sequence[str]) -> widgets.ValueWidget:
    """The widget for one method option: a dropdown of its choices (or of the layers), else a slider."""
    common = {"description": _DESCRIPTIONS.get(name, name), "style": {"description_width": "initial"}}
    if option.layer:
        return widgets.Dropdown(options=list(layers), value=layers[-1], **common)
    if option.choices is not None:
        return widgets.Dropdown(options=list(option.choices), value=option.default, **common)
    if isinstance(option.default, int):
        return widgets.IntSlider(value=option.default, min=option.low, max=option.high,
                                 continuous_update=False, **common)
    return widgets.FloatSlider(value=option.default, min=option.low, max=option.high, step=option.step,
                               continuous_update=False, **common)


def _show_relevant(controls: dict) -> None:
    """Show the controls of the chosen method's options, hide the other options' controls."""
    wanted = METHODS[controls["method"].value].options
    for name in OPTIONS:
        controls[name].layout.display = None if name in wanted else "none"


def _layout(controls: dict) -> widgets.Widget:
    c = controls
    return widgets.VBox([widgets.HBox([c["image"], c["method"], c["target"]]),
                         widgets.HBox([c["attack"], c["eps"]]),
                         widgets.HBox([c[name] for name in OPTIONS])])


def explore(model: nn.Module, images: torch.Tensor, labels=None, classes: Sequence[str] | None = None,
            robust: nn.Module | None = None, names: Sequence[str] | None = None,
            layers: Sequence[str] | None = None, eps_max: float = 0.3) -> Explorer:
    """An interactive panel to explore attributions and attacks on ``images`` (a few dozen at most).

    ``model`` (and ``robust``, shown beside it, e.g. ``fmnist-cnn-robust``): classifiers taking
    ``B x C x H x W`` images in [0, 1]. ``labels``: the true classes (attacks move away from
    them; without labels, away from each model's clean prediction). ``classes``: the class
    names (default: the indices). ``names``: a name per image for the picker. ``layers``: the
    Grad-CAM layer choices (default: every ``nn.Conv2d`` and Grad-CAM's default layer, that one
    selected). ``eps_max``:
    the largest attack size on the slider (L-inf, in pixel values).

    Attacks: FGSM (Goodfellow et al. 2015), PGD with 10 steps (Madry et al. 2018); methods and
    their papers: :mod:`labkit.attribution`.
    """
    models = {"standard": check_model(model), "robust": check_model(robust)} if robust is not None \
        else {"model": check_model(model)}
    check_images(images, name="images")
    if not 0 < eps_max <= 1:
        raise ValueError(f"eps_max must be in (0, 1] (pixel values), got {eps_max}")
    n_classes = predict(model, images[:1].to(model_device(model))).shape[1]
    classes = [str(i) for i in range(n_classes)] if classes is None else list(classes)
    if len(classes) != n_classes:
        raise ValueError(f"classes must name the model's {n_classes} classes, got {len(classes)} names")
    if labels is not None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"labels must give one class per image ({len(images)}), got {len(labels)}")
    if names is None:
        names = [f"{i}: {classes[label]}" for i, label in enumerate(labels.tolist())] if labels is not None \
            else [f"image {i}" for i in range(len(images))]
    elif len(names) != len(images):
        raise ValueError(f"names must give one name per image ({len(images)}), got {len(names)}")
    if layers is None:  # every conv layer, then Grad-CAM's default layer, selected
        default = cam_layer_name(model)
        layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != default] + [default]
    layers = list(layers)
    if not layers:
        raise ValueError("the model has no nn.Conv2d layer for Grad-CAM; pass layers= explicitly")
    return Explorer(models, images.detach().cpu(), labels, classes, list(names), layers, eps_max)
