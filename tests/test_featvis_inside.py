"""labkit.featvis inside the network (issue 23): feature maps, receptive fields, top-activating
patches, a function as the ascent's objective, deep dream, Dong et al.'s consistency."""
import math

import pytest
import torch
from torch import nn

from labkit import featvis
from labkit.featvis import Channel
from test_featvis import assert_same_state, seeded, state_of


@pytest.fixture
def model(random_cnn):
    return random_cnn


@pytest.fixture
def subset(fashion_test):
    return fashion_test.tensors(torch.arange(200))


# --- feature maps and receptive fields --------------------------------------------------------

def test_feature_maps_are_the_layers_output(model, subset):
    x = subset[0][:5]
    with torch.no_grad():
        h = model.normalize(x)
        for name in ("conv1", "relu1", "conv2", "relu2", "pool1", "conv3"):
            h = getattr(model, name)(h)
    before = state_of(model)
    maps = featvis.feature_maps(model, x, "conv3")
    assert_same_state(before, state_of(model))
    assert maps.shape == (5, 64, 14, 14) and not maps.requires_grad
    torch.testing.assert_close(maps, h)


def test_receptive_fields_of_fashion_cnn(model):
    # by hand: 3x3 convs add 2 * J pixels each, a 2x2 pool adds 1 * J and doubles J
    expected = {"conv1": (3, 1, 1), "conv2": (5, 1, 2), "pool1": (6, 2, 2), "conv3": (10, 2, 4),
                "relu4": (14, 2, 6), "pool2": (16, 4, 6), "conv5": (24, 4, 10)}
    for layer, (size, stride, padding) in expected.items():
        assert featvis.receptive_field(model, layer) == (size, stride, padding), layer


def _gradient_support(model, shape, i, j):
    """The input pixels one output position depends on, from autograd."""
    x = torch.rand(1, *shape, requires_grad=True)
    out = model(x)
    (g,) = torch.autograd.grad(out[0, 0, i, j], x)
    rows, columns = g[0].abs().sum(0).nonzero(as_tuple=True)
    return rows.min().item(), columns.min().item(), rows.max().item() + 1, columns.max().item() + 1


@pytest.mark.parametrize("layers", [
    [nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 5, stride=2, padding=2), nn.AvgPool2d(2),
     nn.Conv2d(4, 2, 3, dilation=2, padding=2)],
    [nn.ZeroPad2d(1), nn.Conv2d(2, 3, 3, stride=2), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1, stride=3)],
])
def test_receptive_field_matches_the_gradients_support(layers):
    torch.manual_seed(0)
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()  # positive weights on positive images: no gradient cancels inside the field
    field = featvis.receptive_field(model, str(len(layers) - 1), image_shape=(2, 40, 40))
    with torch.no_grad():
        size = model(torch.zeros(1, 2, 40, 40)).shape[-1]
    # positions whose field lies inside the image (at the border, part of the field is padding
    # of the layers in between, which no input pixel reaches)
    inside = [i for i in range(size) if field.box(i, i)[0] >= 0 and field.box(i, i)[2] <= 40]
    assert len(inside) >= 2
    for i, j in [(inside[0], inside[-1]), (inside[-1], inside[len(inside) // 2]), (inside[1], inside[1])]:
        assert _gradient_support(model, (2, 40, 40), i, j) == field.box(i, j), (i, j)


def test_receptive_field_refuses_what_it_cannot_follow(model):
    with pytest.raises(ValueError, match="no layer named"):
        featvis.receptive_field(model, "conv9")
    with pytest.raises(ValueError, match="whole image"):
        featvis.receptive_field(model, "classifier")
    with pytest.raises(TypeError, match="nn.Module"):
        featvis.receptive_field("model", "conv1")


# --- top-activating patches -------------------------------------------------------------------

def test_top_patches_are_the_strongest_positions_cropped(model, subset):
    unit = Channel("conv3", 7)
    before = state_of(model)
    top = featvis.top_patches(model, subset, unit, k=6, batch_size=64, progress=False)
    assert_same_state(before, state_of(model))
    maps = featvis.feature_maps(model, subset[0], "conv3")[:, 7]  # brute force over all images
    best = maps.flatten(1).max(dim=1).values
    torch.testing.assert_close(top.activations, best.topk(6).values)
    assert top.indices.tolist() == best.topk(6).indices.tolist()
    assert top.labels.tolist() == subset[1][top.indices].tolist()
    field = featvis.receptive_field(model, "conv3")
    padded = torch.nn.functional.pad(subset[0], (10, 10, 10, 10))
    for n, (index, (r, c)) in enumerate(zip(top.indices.tolist(), top.positions.tolist())):
        assert maps[index, r, c] == top.activations[n]
        t, left, b, right = field.box(r, c)
        torch.testing.assert_close(top.patches[n], padded[index, :, t + 10:b + 10, left + 10:right + 10])
    assert top.patches.shape == (6, 1, 10, 10)
    several = featvis.top_patches(model, subset, [Channel("conv3", 2), unit], k=6, batch_size=64, progress=False)
    assert several.patches.shape == (2, 6, 1, 10, 10)
    for mine, one in zip(several, top):
        torch.testing.assert_close(mine[1], one)


def test_top_patches_wants_a_channel(model, subset):
    with pytest.raises(TypeError, match="Channel"):
        featvis.top_patches(model, subset, ("neuron", 3), progress=False)
    with pytest.raises(ValueError, match="channels"):
        featvis.top_patches(model, subset, Channel("conv3", 64), progress=False)
    with pytest.raises(ValueError, match="one layer"):
        featvis.top_patches(model, subset, [Channel("conv3", 1), Channel("conv2", 1)], progress=False)
    with pytest.raises(ValueError, match="k must be"):
        featvis.top_patches(model, subset, Channel("conv3", 0), k=0, progress=False)


# --- a function as the objective --------------------------------------------------------------

def test_maximize_takes_a_function_as_objective(model):
    def hooked(model, x):  # what a student writes: the channel's mean, read with a forward hook
        captured = []
        handle = model.conv3.register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            model(x)
        finally:
            handle.remove()
        return captured[0][:, 4].mean(dim=(1, 2))

    x0 = torch.rand(3, 1, 28, 28, generator=seeded(1)) * 0.5
    before = state_of(model)
    mine = featvis.maximize(model, hooked, x0=x0, steps=5, progress=False)
    assert_same_state(before, state_of(model))
    unit = featvis.maximize(model, Channel("conv3", 4), x0=x0, steps=5, progress=False)
    torch.testing.assert_close(mine, unit)
    from_noise = featvis.maximize(model, hooked, steps=2, generator=seeded(0), progress=False)
    assert from_noise.shape == (1, 1, 28, 28)
    with pytest.raises(ValueError, match="one value per image"):
        featvis.maximize(model, lambda m, x: m(x), x0=x0, steps=1, progress=False)
    with pytest.raises(ValueError, match="detached"):
        featvis.maximize(model, lambda m, x: hooked(m, x).detach(), x0=x0, steps=1, progress=False)
    assert_same_state(before, state_of(model))


# --- deep dream -------------------------------------------------------------------------------

@pytest.mark.parametrize("octaves,jitter", [(1, 0), (3, 2)])
def test_deep_dream_raises_the_layers_energy_and_changes_nothing_else(model, subset, octaves, jitter):
    x = subset[0][:4].clone()
    kept = x.clone()
    before = state_of(model)
    dream = featvis.deep_dream(model, x, "relu4", steps=5, lr=0.02, octaves=octaves, jitter=jitter,
                               generator=seeded(0), progress=False)
    assert_same_state(before, state_of(model))
    assert torch.equal(x, kept) and dream.shape == x.shape and not dream.requires_grad
    assert 0 <= dream.min() and dream.max() <= 1
    energy = lambda images: featvis.feature_maps(model, images, "relu4").pow(2).flatten(1).mean(1)
    assert (energy(dream) > 1.1 * energy(x)).all()


def test_deep_dream_one_step_is_the_normalized_gradient_step(model, subset):
    x = subset[0][:2]
    dream = featvis.deep_dream(model, x, "conv2", steps=1, lr=0.01, octaves=1, jitter=0, progress=False)
    z = x.clone().requires_grad_(True)
    conv2 = model.conv2(model.relu1(model.conv1(model.normalize(z))))
    (g,) = torch.autograd.grad(conv2.pow(2).flatten(1).mean(1).sum(), z)
    step = 0.01 * math.sqrt(784) * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(dream, (x + step).clamp(0, 1))


def test_deep_dream_validates(model, subset):
    x = subset[0][:1]
    for bad, error in [(dict(steps=0), ValueError), (dict(lr=0.0), ValueError), (dict(octave_scale=0.5), ValueError),
                       (dict(jitter=-1), ValueError), (dict(octaves=1.5), TypeError), (dict(layer="conv9"), ValueError)]:
        options = dict(layer="conv2") | bad
        with pytest.raises(error):
            featvis.deep_dream(model, x, progress=False, **options)
    with pytest.raises(ValueError, match="dimensions"):
        featvis.deep_dream(model, x[0], "conv2", progress=False)


# --- Dong et al.'s consistency ----------------------------------------------------------------

def test_consistency_analytic_cases():
    labels = torch.tensor([[3, 3, 3, 3], [0, 1, 2, 3], [0, 0, 1, 1]])
    torch.testing.assert_close(featvis.consistency(labels, 4), torch.tensor([1.0, 0.25, 0.5]))
    a = torch.tensor([[1.0, 0.5, 0, 0], [0.5, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    # p = (1/2, 1/2, 0, 0): p^T A p = 1/4 + 1/4 + 2 * 0.5 / 4
    torch.testing.assert_close(featvis.consistency(labels, 4, a), torch.tensor([1.0, 0.25 + 0.5 / 8, 0.75]))
    assert featvis.consistency(labels, 4, torch.eye(4)).tolist() == featvis.consistency(labels, 4).tolist()


def test_consistency_validates():
    with pytest.raises(TypeError, match="integer"):
        featvis.consistency(torch.rand(2, 3), 4)
    with pytest.raises(ValueError, match="N x k"):
        featvis.consistency(torch.tensor([1, 2]), 4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        featvis.consistency(torch.tensor([[1, 4]]), 4)
    with pytest.raises(ValueError, match="4 x 4"):
        featvis.consistency(torch.tensor([[1, 2]]), 4, torch.eye(3))
    with pytest.raises(ValueError, match="symmetric"):
        featvis.consistency(torch.tensor([[1, 2]]), 4, torch.eye(4) + torch.triu(torch.ones(4, 4), 1))
