"""labkit.plot: every figure is rendered to PNG (Agg) and its structure checked: axes, titles,
image extents, colormaps and their limits, labels, and that no two titles overlap."""
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402

from labkit import plot  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def render(fig):
    """Draw to PNG (as a notebook does) and return the figure's renderer for layout checks."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    canvas = FigureCanvasAgg(fig)  # labkit closes its figures in pyplot, which detaches their canvas
    canvas.draw()
    return canvas.get_renderer()


def images_of(ax):
    return [child for child in ax.get_children() if isinstance(child, AxesImage)]


def image_axes(fig):
    return [ax for ax in fig.axes if images_of(ax)]


def assert_no_overlap(boxes):
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


def batch(n=4, channels=1, size=28, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


# --- show_images -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_show_images_one_batch_with_labels(device):
    x = batch(5).to(device).requires_grad_()
    labels = [f"Ankle boot {p}%" for p in (99, 98, 97, 96, 100)]
    fig = plot.show_images(x, labels=labels)
    renderer = render(fig)
    axes = image_axes(fig)
    assert len(fig.axes) == len(axes) == 5
    assert [ax.get_title() for ax in axes] == labels
    for ax, image in zip(axes, x.detach().cpu()):
        (shown,) = images_of(ax)
        assert shown.get_extent() == [-0.5, 27.5, 27.5, -0.5]
        assert shown.get_cmap().name == plot.GREY_CMAP
        assert (shown.norm.vmin, shown.norm.vmax) == (0.0, 1.0)
        assert np.allclose(shown.get_array(), image[0].numpy())
    assert_no_overlap([ax.title.get_window_extent(renderer) for ax in axes])


def test_show_images_rows_with_row_titles_and_ragged_lengths():
    rows = [batch(6), batch(3, seed=1).numpy()]
    fig = plot.show_images(rows, titles=["robust model", "standard model"],
                           labels=[[str(i) for i in range(6)], ["a", "b", "c"]])
    renderer = render(fig)
    assert len(fig.axes) == 9  # the unused cells of the short row are removed
    grid = np.array([ax.get_subplotspec().rowspan.start for ax in fig.axes])
    assert (grid == 0).sum() == 6 and (grid == 1).sum() == 3
    first_of_row = [ax for ax in fig.axes if ax.get_subplotspec().colspan.start == 0]
    assert [ax.get_ylabel() for ax in first_of_row] == ["robust model", "standard model"]
    for ax in first_of_row:  # the row title is left of its images, not on them
        assert ax.yaxis.label.get_window_extent(renderer).x1 <= ax.get_window_extent(renderer).x0
    assert [ax.get_title() for ax in fig.axes[6:]] == ["a", "b", "c"]
    assert_no_overlap([ax.title.get_window_extent(renderer) for ax in fig.axes] +
                      [ax.yaxis.label.get_window_extent(renderer) for ax in first_of_row])


@pytest.mark.parametrize("image, shape", [(torch.rand(28, 28), (28, 28)), (torch.rand(1, 28, 28), (28, 28)),
                                          (np.random.rand(3, 16, 20), (16, 20, 3)),
                                          (torch.rand(2, 3, 16, 20), (16, 20, 3))])
def test_show_images_single_images_and_rgb(image, shape):
    fig = plot.show_images(image)
    render(fig)
    axes = image_axes(fig)
    assert len(axes) == (2 if image.ndim == 4 else 1)
    (shown,) = images_of(axes[0])
    assert shown.get_array().shape == shape
    assert shown.get_extent() == [-0.5, shape[1] - 0.5, shape[0] - 0.5, -0.5]


def test_show_images_stays_within_notebook_width():
    fig = plot.show_images(batch(30))
    render(fig)
    assert fig.get_size_inches()[0] <= plot.NOTEBOOK_WIDTH
    assert fig.dpi == plot.DPI


def test_show_images_stretches_on_request():
    x = batch(2) * 0.2 + 0.1
    fig = plot.show_images(x, vrange=None)
    for ax, image in zip(image_axes(fig), x):
        norm = images_of(ax)[0].norm
        assert np.isclose(norm.vmin, image.min()) and np.isclose(norm.vmax, image.max())


@pytest.mark.parametrize("rows, options, message", [
    (torch.rand(2, 2, 8, 8), {}, "1 \\(grey\\) or 3 \\(RGB\\)"),
    (torch.rand(2, 1, 1, 8, 8), {}, "B x C x H x W"),
    (torch.full((1, 8, 8), float("nan")), {}, "NaN"),
    (torch.rand(3, 1, 8, 8), {"labels": ["a", "b"]}, "one string per image \\(3\\)"),
    ([torch.rand(3, 1, 8, 8)], {"titles": ["a", "b"]}, "one entry per row \\(1\\)"),
    ([], {}, "rows is empty"),
])
def test_show_images_bad_input(rows, options, message):
    with pytest.raises(ValueError, match=message):
        plot.show_images(rows, **options)


def test_show_images_rejects_other_types():
    with pytest.raises(TypeError, match="torch.Tensor or a numpy array, got list"):
        plot.show_images([[0.5]])
    with pytest.raises(TypeError, match="hold numbers"):
        plot.show_images(np.array([["a"]]))


def test_prediction_labels():
    probabilities = torch.tensor([[0.1, 0.9], [0.75, 0.25]])
    assert plot.prediction_labels(probabilities, ["Sandal", "Sneaker"]) == ["Sneaker 90%", "Sandal 75%"]
    with pytest.raises(ValueError, match="B x 3"):
        plot.prediction_labels(probabilities, ["a", "b", "c"])


# --- normalize_gradient ----------------------------------------------------------------------

def test_normalize_gradient_maps_mean_and_three_std_per_image():
    g = torch.randn(3, 1, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g[1] = g[1] * 100 + 7  # another scale and offset must not matter: each image has its own
    out = plot.normalize_gradient(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    assert 0 <= out.min() and out.max() <= 1
    assert torch.allclose(out[1], plot.normalize_gradient(g[1:2] / 100 - 0.07)[0])
    for image, shown in zip(g, out):
        mean, std = image.mean(), image.std(unbiased=False)
        inside = (image - mean).abs() < 3 * std
        assert torch.allclose(shown[inside], (image[inside] - mean) / (6 * std) + 0.5)
        assert torch.all(shown[image >= mean + 3 * std] == 1) and torch.all(shown[image <= mean - 3 * std] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_gradient_keeps_type_and_device(device):
    g = torch.randn(1, 5, 5, device=device, requires_grad=True)
    out = plot.normalize_gradient(g)
    assert out.device == g.device and not out.requires_grad
    assert torch.allclose(out.mean(), torch.tensor(0.5, device=device), atol=0.05)
    array = plot.normalize_gradient(np.linspace(-1, 1, 9).reshape(3, 3))
    assert isinstance(array, np.ndarray) and array[1, 1] == pytest.approx(0.5)
    assert np.allclose(plot.normalize_gradient(np.zeros((4, 4))), 0.5)  # a constant: no contrast


# --- heatmap and overlay ---------------------------------------------------------------------

def test_signed_heatmap_is_centred_at_zero_with_colorbars():
    attr = torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(1))
    attr[2] *= 10
    fig = plot.heatmap(attr, labels=["gradient", "x * grad", "IG"])
    renderer = render(fig)
    axes = image_axes(fig)
    assert len(axes) == 3 and len(fig.axes) == 6  # one colorbar per panel
    for ax, a in zip(axes, attr):
        (shown,) = images_of(ax)
        assert shown.get_cmap().name == plot.SIGNED_CMAP
        peak = np.percentile(a.abs().numpy(), plot.CLIP_PERCENTILE)
        assert shown.norm.vmin == -shown.norm.vmax == pytest.approx(-peak)
        assert shown.get_extent() == [-0.5, 27.5, 27.5, -0.5]
    assert [ax.get_title() for ax in axes] == ["gradient", "x * grad", "IG"]
    assert_no_overlap([ax.get_tightbbox(renderer) for ax in fig.axes])


def test_unsigned_heatmap_and_same_scale():
    attr = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(2))
    fig = plot.heatmap(attr, same_scale=True)
    render(fig)
    assert len(image_axes(fig)) == 2 and len(fig.axes) == 3  # one shared colorbar
    for ax in image_axes(fig):
        shown = images_of(ax)[0]
        assert shown.get_cmap().name == plot.UNSIGNED_CMAP
        assert (shown.norm.vmin, shown.norm.vmax) == (0.0, pytest.approx(np.percentile(attr.numpy(), plot.CLIP_PERCENTILE)))
    fig = plot.heatmap(np.random.rand(7, 7) - 0.2, signed=True, colorbar=False)
    assert len(fig.axes) == 1 and images_of(fig.axes[0])[0].get_cmap().name == plot.SIGNED_CMAP


def test_one_hot_pixel_does_not_set_the_colour_scale():
    # a robust model's gradient: moderate values on the object and a few extreme pixels. With the
    # maximum as the limit every other pixel would be drawn within 1 % of zero.
    attr = torch.rand(28, 28, generator=torch.Generator().manual_seed(3)) * 0.02
    attr[3, 4] = 2.0
    shown = images_of(plot.heatmap(attr).axes[0])[0]
    assert shown.norm.vmax < 0.05
    assert (shown.norm(attr.numpy()) > 0.5).mean() > 0.3  # most of the map is visibly coloured
    sparse = torch.zeros(28, 28)
    sparse[5, 5] = 1.0  # fewer than 1 % non-zero: the maximum, not a blank panel
    assert images_of(plot.heatmap(sparse).axes[0])[0].norm.vmax == 1.0


def test_heatmap_bad_input():
    with pytest.raises(ValueError, match="negative values"):
        plot.heatmap(torch.randn(8, 8), signed=False)
    with pytest.raises(ValueError, match="to_heatmap"):
        plot.heatmap(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="one entry per map \\(2\\)"):
        plot.heatmap(torch.rand(2, 8, 8), labels=["a"])


def test_overlay_stretches_a_coarse_map_over_the_image():
    images, cam = batch(2, channels=3), torch.rand(2, 7, 7)
    fig = plot.overlay(images, cam, alpha=0.4, labels=["cat", "cup"], colorbar=True)
    render(fig)
    axes = image_axes(fig)
    assert len(axes) == 2 and len(fig.axes) == 4
    for ax, image, m in zip(axes, images, cam):
        below, above = images_of(ax)
        assert np.allclose(below.get_array(), image.permute(1, 2, 0).numpy())
        assert np.allclose(above.get_array(), m.numpy()) and above.get_alpha() == 0.4
        assert above.get_extent() == below.get_extent() == [-0.5, 27.5, 27.5, -0.5]
        assert above.get_cmap().name == plot.UNSIGNED_CMAP and above.norm.vmin == 0
    assert [ax.get_title() for ax in axes] == ["cat", "cup"]
    fig = plot.overlay(torch.rand(1, 28, 28), torch.randn(28, 28))  # one grey image, a signed map
    (ax,) = fig.axes
    assert images_of(ax)[1].norm.vmin == -images_of(ax)[1].norm.vmax
    with pytest.raises(ValueError, match="one heatmap per image: 2 images, 1 heatmaps"):
        plot.overlay(images, cam[:1])


# --- robustness_plot -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_robustness_plot_draws_one_line_per_model(device):
    curves = {"standard": ([0, 0.05, 0.1], torch.tensor([0.92, 0.3, 0.01], device=device)),
              "robust": {0.0: 0.85, 0.05: 0.8, 0.1: 0.7}}
    fig = plot.robustness_plot(curves, chance=0.1, title="PGD, L-inf")
    render(fig)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["standard", "robust", "chance"]
    assert np.allclose(lines[0].get_xdata(), [0, 0.05, 0.1]) and np.allclose(lines[1].get_ydata(), [0.85, 0.8, 0.7])
    assert np.allclose(lines[2].get_ydata(), 0.1)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["standard", "robust", "chance"]
    assert ax.get_ylim() == (0, 1.02) and ax.get_title() == "PGD, L-inf"
    assert ax.get_xlabel() == "ε" and ax.get_ylabel() == "accuracy"


def test_robustness_plot_bad_input():
    with pytest.raises(TypeError, match="non-empty dict"):
        plot.robustness_plot([([0, 1], [1, 0])])
    with pytest.raises(ValueError, match="one accuracy per eps"):
        plot.robustness_plot({"m": ([0, 1, 2], [1, 0])})


def test_robustness_plot_draws_what_robustness_curve_returns(random_cnn, fashion_test):
    from labkit.attacks import robustness_curve
    curve = robustness_curve(random_cnn, fashion_test.tensors(torch.arange(20)), "fgsm", [0.0, 0.05, 0.1],
                             progress=False)
    fig = plot.robustness_plot({"random init": curve})
    render(fig)
    (line,) = fig.axes[0].get_lines()
    assert np.allclose(line.get_xdata(), list(curve)) and np.allclose(line.get_ydata(), list(curve.values()))
