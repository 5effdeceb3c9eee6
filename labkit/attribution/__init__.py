"""Attribution methods: which input pixels (or which parts of a layer) a model's output for a
class depends on. Every method explains the target class's logit (pre-softmax), takes
``(model, x, target, **options)`` with images ``B x C x H x W`` in [0, 1] and per-image
targets, and returns a detached tensor on the model's device, leaving the model as it was. A
model in train mode is evaluated in eval mode for the call, with a warning (dropout would make
the attributions random and batch-norm would update its statistics), then put back.

Methods that evaluate the model many times (SmoothGrad, integrated gradients, occlusion, the
deletion / insertion curves) take ``batch_size``, the model evaluations per forward pass, which
bounds memory. ``None`` sizes it for the device: on a CPU 2**16 input values but at least 2
images (2 images of 3 x 224 x 224, 83 Fashion-MNIST images), as bigger batches run slower per
image once activations outgrow the caches; on a GPU 2**22 values (27 images of 3 x 224 x 224,
about 2.3 GB for EfficientNet-Lite0).

Modules by family: ``gradients`` (gradient, gradient x input, SmoothGrad, integrated
gradients), ``perturbation`` (occlusion), ``cam`` (guided backprop, Grad-CAM, guided Grad-CAM),
``lrp`` (layer-wise relevance propagation), ``evaluation`` (heatmaps, sanity check,
deletion / insertion curves), ``metrics`` (ROAD, infidelity, max-sensitivity, sparseness,
complexity, random logit: ``from labkit.attribution import metrics``). :data:`METHODS` lists every
method with its heatmap reduction and options (:class:`Method`).
"""
from .cam import guided_backprop, guided_gradcam, gradcam
from .evaluation import (Curve, SanityCheck, deletion_curve, insertion_curve, sanity_check, spearman,
                         to_heatmap)
from .gradients import (completeness_gap, gradient, gradient_x_input, integrated_gradients, path_points,
                        smoothgrad)
from .lrp import AlphaBeta, Composite, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus, fold_batchnorm, lrp
from .perturbation import occlusion
from ._common import Method, Option
from .cam import METHODS as _CAM
from .gradients import METHODS as _GRADIENTS
from .lrp import METHODS as _LRP
from .perturbation import METHODS as _PERTURBATION

# Every attribution method, by function name: what the explorer offers, the tests and device
# checks run and the benchmarks time. A new method is one more ``Method`` row in its family's
# module; a new family, one more line here.
METHODS: dict[str, Method] = {m.name: m for m in (*_GRADIENTS, *_PERTURBATION, *_CAM, *_LRP)}
from . import metrics  # noqa: E402  (after evaluation and gradients, which it uses)

__all__ = ["gradient", "gradient_x_input", "smoothgrad", "integrated_gradients", "completeness_gap",
           "path_points", "occlusion", "guided_backprop", "gradcam", "guided_gradcam",
           "lrp", "Rule", "Epsilon", "Gamma", "AlphaBeta", "ZPlus", "ZBox", "Flat", "WSquare", "Composite",
           "fold_batchnorm",
           "to_heatmap", "sanity_check", "SanityCheck", "spearman", "deletion_curve",
           "insertion_curve", "Curve", "METHODS", "Method", "Option"]
