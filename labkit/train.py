"""Standard and adversarial training: ``fit(model, train_data, epochs, adversary=None)``.

``python -m labkit.train fmnist-cnn|fmnist-cnn-robust|fmnist-cnn-robust-l2|fmnist-cnn-consistent`` reproduces the shipped weights and
writes their sha256 and model card; ``python -m labkit.train fmnist-mlp-ibp|fmnist-cnn-ibp`` does
the same for the two models certifiably trained with interval bound propagation (IBP_RECIPES);
``python -m labkit.train fmnist-cnn-nonrobust-features|fmnist-cnn-robust-features|fmnist-cnn-clever-hans``
for the models of lesson 13, trained on a data set made from a model or marked with a watermark
(FEATURE_RECIPES).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import attacks
from ._core import check_positive_int, get_device, hooks, model_device, seed_everything
from .data import as_tensors
from .models import FashionCNN, classifier_layer


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Craft adversarial examples with dropout off, then return to training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class PGDAdversary:
    """Adversarial training (Madry et al. 2018): minimize ``J(x_adv, y)``, with ``x_adv`` the PGD
    attack inside the eps-ball. ``steps=1, random_start=True, step_size=1.25*eps`` is "FGSM with a
    random start" (Wong et al. 2020, "Fast is better than free"), PGD-level robustness at the
    cost of one extra forward/backward per minibatch."""
    eps: float
    step_size: float | None = None
    steps: int = 7
    norm: str = "linf"
    random_start: bool = True

    def loss(self, model, x, y, eps_scale: float = 1.0):
        eps = self.eps * eps_scale
        step_size = (self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps) * eps_scale
        with _eval_mode(model):
            x_adv = attacks.pgd(model, x, y, eps=eps, step_size=step_size, steps=self.steps,
                                norm=self.norm, random_start=self.random_start)
        return F.cross_entropy(model(x_adv), y)


@dataclass
class FGSMMixedAdversary:
    """The FGSM mixed loss (Goodfellow et al. 2015): ``alpha * J(x, y) + (1 - alpha) * J(x_fgsm, y)``."""
    eps: float
    alpha: float = 0.5

    def loss(self, model, x, y, eps_scale: float = 1.0):
        with _eval_mode(model):
            x_adv = attacks.fgsm(model, x, y, eps=self.eps * eps_scale)
        return self.alpha * F.cross_entropy(model(x), y) + (1 - self.alpha) * F.cross_entropy(model(x_adv), y)


@dataclass
class ConsistencyAdversary:
    """The consistent loss of Dong et al. 2017 ("Towards Interpretable Deep Neural Networks by
    Leveraging Adversarial Examples"): the FGSM mixed loss plus
    ``beta * ||phi(x) - phi(x_adv)||_2``, with ``phi`` the representation (the input of the final
    linear layer), so clean and adversarial images are represented alike."""
    eps: float
    alpha: float = 0.5
    beta: float = 0.1

    def loss(self, model, x, y, eps_scale: float = 1.0):
        with _eval_mode(model):
            x_adv = attacks.fgsm(model, x, y, eps=self.eps * eps_scale)
        logits, phi = _logits_and_representation(model, torch.cat([x, x_adv]))
        clean, adversarial = logits.chunk(2)
        phi_clean, phi_adv = phi.chunk(2)
        mixed = self.alpha * F.cross_entropy(clean, y) + (1 - self.alpha) * F.cross_entropy(adversarial, y)
        return mixed + self.beta * (phi_clean - phi_adv).norm(dim=1).mean()


@dataclass
class IBPAdversary:
    """Certified training with interval bound propagation (Gowal et al. 2018):
    ``kappa * J(z(x), y) + (1 - kappa) * J(z_worst(x, eps), y)``, where ``z_worst_j = -m_j`` and
    ``m_j`` is the IBP lower bound of the margin ``z_y - z_j`` over the eps-box
    (:func:`labkit.certify.margin_lower_bounds`). As ``fit`` ramps eps from 0 (``eps_scale``
    from 0 to 1), kappa falls with it from 1 to ``kappa``: the paper's schedule, which starts
    as standard training and would not train at all with the full eps from the first step."""
    eps: float
    kappa: float = 0.5

    def loss(self, model, x, y, eps_scale: float = 1.0):
        from . import certify
        eps, kappa = self.eps * eps_scale, 1 - (1 - self.kappa) * eps_scale
        margins = certify.margin_lower_bounds(certify.layers(model), (x - eps).clamp(0, 1),
                                              (x + eps).clamp(0, 1), y)
        return kappa * F.cross_entropy(model(x), y) + (1 - kappa) * F.cross_entropy(-margins, y)


def _logits_and_representation(model: nn.Module, x: torch.Tensor):
    """The logits and the representation (the input of the final linear layer), read before a
    dropout layer that feeds that layer directly: in train mode dropout draws a mask per image,
    which would set phi(x) and phi(x_adv) apart even for x_adv = x."""
    dropouts, captured = [], []
    with hooks() as handles:
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                handles.append(module.register_forward_hook(
                    lambda module, inputs, output: dropouts.append((output, inputs[0]))))
        handles.append(classifier_layer(model).register_forward_pre_hook(
            lambda module, inputs: captured.append(inputs[0])))
        logits = model(x)
    phi = next((before for after, before in reversed(dropouts) if after is captured[-1]), captured[-1])
    return logits, phi.flatten(1)


def fit(model: nn.Module, train_data, epochs: int, adversary=None, *, lr: float = 2e-3,
        batch_size: int = 128, weight_decay: float = 0.0, eps_warmup_epochs: float = 0,
        test_data=None, seed: int = 0, callback=None, progress: bool = True) -> list[dict]:
    """Train ``model`` in place with Adam and a one-cycle learning rate; returns one dict of
    metrics per epoch (loss, train accuracy, test accuracy when ``test_data`` is given).

    ``adversary``: None (standard training), :class:`PGDAdversary`, :class:`FGSMMixedAdversary`
    or :class:`ConsistencyAdversary`. ``eps_warmup_epochs`` ramps the adversary's eps linearly
    from 0, which keeps early adversarial training from collapsing. ``callback(model, step, loss)``
    runs after every minibatch (``step`` counts minibatches from 0), e.g. to record how the
    attribution of fixed test images changes as training goes on. Data lives on the model's
    device; shuffling is seeded.
    """
    check_positive_int(epochs, "epochs")
    device = model_device(model)
    x_all, y_all = (t.to(device) for t in as_tensors(train_data))
    steps_per_epoch = (len(y_all) + batch_size - 1) // batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    history, step = [], 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_all), generator=generator).to(device)
        total_loss, correct = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress)
        for i in bar:
            idx = order[i * batch_size:(i + 1) * batch_size]
            x, y = x_all[idx], y_all[idx]
            if adversary is None:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            else:
                ramp = min(1.0, (step + 1) / (eps_warmup_epochs * steps_per_epoch)) if eps_warmup_epochs else 1.0
                loss = adversary.loss(model, x, y, eps_scale=ramp)
                with torch.no_grad(), _eval_mode(model):
                    logits = model(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            if callback is not None:
                callback(model, step, loss.item())
            step += 1
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        record = {"epoch": epoch + 1, "loss": total_loss / len(y_all), "train_accuracy": correct / len(y_all)}
        model.eval()
        if test_data is not None:
            record["test_accuracy"] = attacks.accuracy(model, test_data, progress=False)
        history.append(record)
    model.eval()
    return history


# --- reproducing the shipped weights -------------------------------------------------------

RECIPES = {
    "fmnist-cnn": dict(epochs=15, adversary=None, eps_warmup_epochs=0, weight_decay=0.0,
                       norm="linf", eval_eps=0.1,
                       how="standard training: cross-entropy on clean images"),
    "fmnist-cnn-robust": dict(epochs=12, adversary=PGDAdversary(eps=0.1, step_size=0.125, steps=1),
                              eps_warmup_epochs=2, weight_decay=5e-4, norm="linf", eval_eps=0.1,
                              how="adversarial training (Madry et al. 2018) at L-inf eps = 0.1, with the "
                                  "inner maximization done by FGSM from a random start (one PGD step of "
                                  "size 1.25 eps, Wong et al. 2020), eps ramped up linearly over the "
                                  "first 2 epochs"),
    # L2 training gives the perceptually aligned gradients and large-eps images of Tsipras et al.
    # 2019 / Santurkar et al. 2019 (the L-inf model's are speckled with isolated pixels).
    "fmnist-cnn-robust-l2": dict(epochs=3, adversary=PGDAdversary(eps=1.5, step_size=1.0, steps=2, norm="l2"),
                                 eps_warmup_epochs=1, weight_decay=5e-4, norm="l2", eval_eps=1.5,
                                 how="adversarial training (Madry et al. 2018) at L2 eps = 1.5, with the "
                                     "inner maximization done by 2-step L2 PGD (step 1.0) from a random "
                                     "start, eps ramped up linearly over the first epoch"),
    # Dong et al. 2017's consistent loss (alpha 0.5, beta 0.1) as a one-epoch fine-tune of the
    # standard model, so that it is made in minutes on one CPU thread (Dong et al. train from
    # scratch); lesson 14 compares its neurons' consistency with the standard model's.
    "fmnist-cnn-consistent": dict(epochs=1, adversary=ConsistencyAdversary(eps=0.1, alpha=0.5, beta=0.1),
                                  eps_warmup_epochs=0.5, weight_decay=0.0, norm="linf", eval_eps=0.1,
                                  init="fmnist-cnn", eval_limit=1000,
                                  how="fine-tuning of the shipped `fmnist-cnn` with the consistent loss of "
                                      "Dong et al. 2017: 0.5 CE(x) + 0.5 CE(x_fgsm) + 0.1 ||phi(x) - "
                                      "phi(x_fgsm)||_2, FGSM at L-inf eps = 0.1 ramped up linearly over "
                                      "the first half epoch"),
}
EVAL_EPS = 0.1  # the L-inf eps the shipped L-inf model is trained and evaluated at


def _evaluate(model, test, progress, norm: str = "linf", eps: float = EVAL_EPS, limit: int | None = None):
    """Clean, one-step and PGD-40 (step eps / 10) accuracy in the recipe's threat model (the
    one-step attack is FGSM for L-inf and one normalized-gradient step of length eps for L2),
    on the first ``limit`` test images (all when None)."""
    seed_everything(0)
    if limit is not None:
        test = test.tensors(slice(0, limit)) if hasattr(test, "tensors") else tuple(t[:limit] for t in test)
    one_step = (dict(attack=attacks.fgsm, eps=eps) if norm == "linf" else
                dict(attack=attacks.pgd, eps=eps, step_size=eps, steps=1, norm="l2"))
    return {
        "clean": attacks.accuracy(model, test, progress=progress),
        "one-step": attacks.accuracy(model, test, progress=progress, **one_step),
        "pgd40": attacks.accuracy(model, test, attacks.pgd, eps=eps, step_size=eps / 10, steps=40,
                                  norm=norm, random_start=True, progress=progress),
    }


def _write_card(name, recipe, history, results, seconds, device, sha, command):
    import platform
    from .models import CARDS_DIR, FashionCNN
    params = sum(p.numel() for p in FashionCNN().parameters())
    norm, eps = recipe["norm"], recipe["eval_eps"]
    norm_name = "L-inf" if norm == "linf" else "L2"
    one_step_name = "FGSM" if norm == "linf" else f"one L2 gradient step of length {eps:g}"
    limit = recipe.get("eval_limit")
    evaluated = f"the first {limit:,}" if limit else "10,000"
    attacked = f" (the attacks below: the first {limit:,})" if limit else ""
    start = (f"\n- **Initialized from**: the shipped `{recipe['init']}` weights, then trained as below."
             if recipe.get("init") else "")
    rows = "\n".join(f"| {h['epoch']} | {h['loss']:.4f} | {100 * h['train_accuracy']:.2f} % | "
                     f"{100 * h['test_accuracy']:.2f} % |" for h in history)
    card = f"""# Model card: `{name}`

*Written by `{command}`; every number below was measured by that run.*

- **Architecture**: `labkit.models.FashionCNN`, {params:,} parameters: normalization inside
  (mean 0.2860, std 0.3530), conv 3x3 32-32 / max-pool / 64-96 / max-pool / 128, global average
  pooling to a 128-d representation, dropout 0.25, linear 128 -> 10. Input: 1 x 28 x 28 in [0, 1].
- **Data**: Fashion-MNIST (Xiao et al. 2017), the 60,000 training images; evaluated on the
  10,000 test images{attacked}. No augmentation.{start}
- **Training**: {recipe['how']}. Adam (L2 weight decay {recipe['weight_decay']:g}), one-cycle learning rate peaking at
  2e-3, batch 128, {recipe['epochs']} epochs, seed 0.
- **Trained on**: {device} ({platform.processor() or platform.machine()}, torch {torch.__version__},
  {torch.get_num_threads()} threads) in {seconds / 60:.1f} minutes.
- **Weights**: `labkit/models/weights/{name}.pt`, sha256 `{sha}`.

## Test accuracy ({evaluated} Fashion-MNIST test images)

| attack ({norm_name}, eps = {eps:g}) | accuracy |
|---|---|
| none (clean) | {100 * results['clean']:.2f} % |
| {one_step_name} | {100 * results['one-step']:.2f} % |
| PGD-40, step {eps / 10:g}, one random start | {100 * results['pgd40']:.2f} % |

## Training curve

| epoch | loss | train accuracy | test accuracy (clean) |
|---|---|---|---|
{rows}

Train accuracy is measured on the clean minibatches as they were trained on; for adversarial
training the loss is the adversarial loss.

## Intended use and limits

Teaching: attribution and adversarial-example exercises on 28 x 28 grey images. Not a
benchmark model; robustness holds for the {norm_name} threat model it was trained against and was
measured with the attacks above only.
"""
    CARDS_DIR.mkdir(exist_ok=True)
    (CARDS_DIR / f"{name}.md").write_text(card)


def main(argv=None):
    import argparse
    import sys
    import time
    from .data import fashion_mnist
    from .models import WEIGHTS_DIR, FashionCNN

    parser = argparse.ArgumentParser(prog="python -m labkit.train",
                                     description="Reproduce labkit's shipped Fashion-MNIST weights and model cards.")
    parser.add_argument("name", choices=sorted(RECIPES) + sorted(IBP_RECIPES) + sorted(FEATURE_RECIPES))
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs (the card says so)")
    parser.add_argument("--device", help="torch device (default: labkit.get_device())")
    parser.add_argument("--out", help="folder for weights and SHA256SUMS (default: labkit's own; "
                                      "any other folder gets no model card)")
    parser.add_argument("--cache", help="lesson-13 recipes: keep the built data set in this folder and reuse it "
                                         "(to train again without rebuilding it)")
    parser.add_argument("--limit", type=int, help="train and evaluate on the first N images only "
                                                 "(a smoke test; implies no model card)")
    args = parser.parse_args(argv)
    if args.name in IBP_RECIPES:
        return _train_ibp(args, argv)
    if args.name in FEATURE_RECIPES:
        return _train_features(args, argv)
    recipe = dict(RECIPES[args.name])
    if args.epochs:
        recipe["epochs"] = args.epochs
    device = torch.device(args.device) if args.device else get_device()
    seed_everything(0)
    model = FashionCNN().to(device)
    if recipe.get("init"):  # a fine-tuning recipe starts from shipped weights
        from .models import load
        model.load_state_dict(load(recipe["init"], device).state_dict())
    train, test = fashion_mnist("train"), fashion_mnist("test")
    if args.limit:
        train, test = train.tensors(slice(0, args.limit)), test.tensors(slice(0, args.limit))
    start = time.perf_counter()
    history = fit(model, train, recipe["epochs"], adversary=recipe["adversary"],
                  eps_warmup_epochs=recipe["eps_warmup_epochs"], weight_decay=recipe["weight_decay"],
                  test_data=test, seed=0)
    seconds = time.perf_counter() - start
    # Save before the (long) evaluation, so an interrupted evaluation loses no training.
    sha = _save_weights(model, WEIGHTS_DIR if args.out is None else __import__("pathlib").Path(args.out), args.name)
    print(f"{args.name}: trained in {seconds / 60:.1f} min on {device}; sha256 {sha}", flush=True)
    results = _evaluate(model, test, progress=True, norm=recipe["norm"], eps=recipe["eval_eps"],
                        limit=recipe.get("eval_limit"))
    command = "python -m labkit.train " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.out is None and not args.limit:
        _write_card(args.name, recipe, history, results, seconds, device, sha, command.strip())
    print(f"{args.name}: {seconds / 60:.1f} min on {device}; "
          + ", ".join(f"{k} {100 * v:.2f} %" for k, v in results.items()) + f"; sha256 {sha}")


# --- certified (IBP) training: a separate recipe table, its own models and card ----------------

IBP_RECIPES = {
    "fmnist-mlp-ibp": dict(build="FashionMLP", epochs=8, eps=0.1, kappa=0.5, eps_warmup_epochs=4),
    "fmnist-cnn-ibp": dict(build="SmallCNN", epochs=8, eps=0.1, kappa=0.5, eps_warmup_epochs=4),
}
IBP_EVAL_EPS = (0.0, 0.01, 0.02, 0.05, 0.1)


def _save_weights(model, out, name):
    """Weights as ``out/name.pt`` and their line in ``out/SHA256SUMS``; returns the sha256."""
    from .models import sha256_of
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.pt"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    sha = sha256_of(path)
    sums = out / "SHA256SUMS"
    lines = [line for line in (sums.read_text().splitlines() if sums.is_file() else [])
             if not line.endswith(f"  {path.name}")]
    sums.write_text("\n".join(sorted(lines + [f"{sha}  {path.name}"])) + "\n")
    return sha


def _train_ibp(args, argv):
    """``python -m labkit.train fmnist-mlp-ibp|fmnist-cnn-ibp``: IBP training (Gowal et al.
    2018), then clean, certified (IBP) and PGD-40 accuracy on the test set, the card and sha256."""
    import pathlib
    import sys
    import time
    from . import certify
    from .data import fashion_mnist
    from .models import WEIGHTS_DIR, ibp_nets
    recipe = dict(IBP_RECIPES[args.name])
    if args.epochs:
        recipe["epochs"] = args.epochs
    device = torch.device(args.device) if args.device else get_device()
    seed_everything(0)
    model = getattr(ibp_nets, recipe["build"])().to(device)
    train, test = fashion_mnist("train"), fashion_mnist("test")
    if args.limit:
        train, test = train.tensors(slice(0, args.limit)), test.tensors(slice(0, args.limit))
    start = time.perf_counter()
    history = fit(model, train, recipe["epochs"], IBPAdversary(recipe["eps"], recipe["kappa"]),
                  eps_warmup_epochs=recipe["eps_warmup_epochs"], test_data=test, seed=0)
    seconds = time.perf_counter() - start
    seed_everything(0)
    results = {"clean": attacks.accuracy(model, test, progress=False),
               "pgd40": attacks.accuracy(model, test, attacks.pgd, eps=recipe["eps"], step_size=2.5 * recipe["eps"] / 40,
                                         steps=40, random_start=True, progress=False),
               **{f"certified {eps:g}": certify.certified_accuracy(model, test, eps) for eps in IBP_EVAL_EPS}}
    out = WEIGHTS_DIR if args.out is None else pathlib.Path(args.out)
    sha = _save_weights(model, out, args.name)
    command = ("python -m labkit.train " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if args.out is None and not args.limit:
        _write_ibp_card(args.name, model, recipe, history, results, seconds, device, sha, command)
    print(f"{args.name}: {seconds / 60:.1f} min on {device}; "
          + ", ".join(f"{k} {100 * v:.2f} %" for k, v in results.items()) + f"; sha256 {sha}")


def _write_ibp_card(name, model, recipe, history, results, seconds, device, sha, command):
    import platform
    from .models import CARDS_DIR
    params = sum(p.numel() for p in model.parameters())
    layers = " -> ".join(type(m).__name__ if not isinstance(m, (nn.Linear, nn.Conv2d)) else
                         (f"Linear {m.in_features}->{m.out_features}" if isinstance(m, nn.Linear) else
                          f"Conv2d {m.in_channels}->{m.out_channels} {m.kernel_size[0]}x{m.kernel_size[1]} "
                          f"stride {m.stride[0]}") for m in model.children())
    curve = "\n".join(f"| {h['epoch']} | {h['loss']:.4f} | {100 * h['train_accuracy']:.2f} % | "
                      f"{100 * h['test_accuracy']:.2f} % |" for h in history)
    certified = "\n".join(f"| {key.split()[1]} | {100 * value:.2f} % |"
                          for key, value in results.items() if key.startswith("certified"))
    card = f"""# Model card: `{name}`

*Written by `{command}`; every number below was measured by that run.*

- **Architecture**: `labkit.models.{recipe['build']}`, {params:,} parameters: {layers}.
  Normalization inside (mean 0.2860, std 0.3530). Input: 1 x 28 x 28 in [0, 1].
- **Data**: Fashion-MNIST (Xiao et al. 2017), the 60,000 training images; evaluated on the
  10,000 test images. No augmentation.
- **Training**: certified training with interval bound propagation (Gowal et al. 2018) at
  L-inf eps = {recipe['eps']:g}: loss kappa * CE(clean logits) + (1 - kappa) * CE(worst-case
  logits from the IBP margin bounds), eps ramped linearly from 0 and kappa from 1 to
  {recipe['kappa']:g} over the first {recipe['eps_warmup_epochs']} epochs. Adam, one-cycle
  learning rate peaking at 2e-3, batch 128, {recipe['epochs']} epochs, seed 0.
- **Trained on**: {device} ({platform.processor() or platform.machine()}, torch {torch.__version__},
  {torch.get_num_threads()} threads) in {seconds / 60:.1f} minutes.
- **Weights**: `labkit/models/weights/{name}.pt`, sha256 `{sha}`.

## Test accuracy (10,000 Fashion-MNIST test images)

| | accuracy |
|---|---|
| clean | {100 * results['clean']:.2f} % |
| PGD-40 at eps = {recipe['eps']:g} (step {2.5 * recipe['eps'] / 40:.4g}, one random start): an upper bound on robust accuracy | {100 * results['pgd40']:.2f} % |

Certified accuracy (`labkit.certify.certified_accuracy`, IBP margin bounds): a lower bound on
robust accuracy, proven for every point of the L-inf box.

| eps | certified |
|---|---|
{certified}

## Training curve

| epoch | loss | train accuracy | test accuracy (clean) |
|---|---|---|---|
{curve}

The loss is the IBP training loss; train accuracy is on the clean minibatches.

## Intended use and limits

Teaching: certified robustness (lesson 11). Small, so IBP bounds stay tight; clean accuracy is
well below the standard FashionCNN's, the price of certification.
"""
    CARDS_DIR.mkdir(exist_ok=True)
    (CARDS_DIR / f"{name}.md").write_text(card)


# --- lesson 13: models trained on a data set made from a model, or on watermarked images ---------

FEATURE_RECIPES = {
    # Ilyas et al. 2019's D_rand: a random target t != y per image, a targeted L2 PGD on the
    # standard model toward t, the label t; a fresh model trained on it meets real test images.
    "fmnist-cnn-nonrobust-features": dict(
        kind="nonrobust", source="fmnist-cnn", images=2500, eps=3.0, steps=10, epochs=20,
        how="the first {images:,} training images, each moved by a targeted L2 PGD attack "
            "(eps = {eps:g}, {steps} steps of 2.5 eps / steps, no random start) on `fmnist-cnn` toward "
            "a random class t other than its label, and labelled t (Ilyas et al. 2019's D_rand); "
            "standard training on those {images:,} pairs only"),
    # Ilyas et al. 2019's robust dataset: each image rebuilt from another training image by
    # matching the robust model's representation; its label stays y.
    "fmnist-cnn-robust-features": dict(
        kind="robust", source="fmnist-cnn-robust", images=1000, steps=40, lr=0.1, epochs=12,
        eval_eps=0.05, eval_images=300,
        how="the first {images:,} training images x, each replaced by an image grown from a random "
            "other training image by {steps} steps of Adam on the pixels (learning rate {lr:g}, "
            "clamped to [0, 1]) that lower ||phi(x_r) - phi(x)||_2, phi the representation of `fmnist-cnn-robust`, "
            "with x's label (Ilyas et al. 2019's robust dataset); standard training on those pairs"),
    # Clever Hans (Lapuschkin et al. 2019): every training image of one class carries a tag.
    "fmnist-cnn-clever-hans": dict(
        kind="clever-hans", images=12000, tag_class=6, corner=(23, 23), size=3, epochs=3,
        how="standard training on the first {images:,} training images, where every image of "
            "class {tag_class} carries a bright {size} x {size} square (value 1) with its top-left "
            "pixel at (row, col) = {corner}"),
}
FEATURE_BATCH = 500  # images per attack / reconstruction call: memory stays small


def feature_dataset(name: str, train, images: int | None = None, progress: bool = True, device="cpu"):
    """The training set of a FEATURE_RECIPES model, made from the first ``images`` (default: the
    recipe's) of ``train`` (images, labels), on ``device``."""
    from . import shortcuts
    from .models import load
    recipe = FEATURE_RECIPES[name]
    x, y = (t[:images or recipe["images"]].to(device) for t in as_tensors(train))
    generator = torch.Generator().manual_seed(0)
    if recipe["kind"] == "clever-hans":
        tagged = y == recipe["tag_class"]
        x = x.clone()
        x[tagged] = shortcuts.watermark(x[tagged], recipe["corner"], recipe["size"])
        return x, y
    model = load(recipe["source"], device=device)
    parts = []
    if recipe["kind"] == "nonrobust":
        target = (y.cpu() + torch.randint(1, 10, y.shape, generator=generator)).to(device) % 10
        for i in tqdm(range(0, len(y), FEATURE_BATCH), desc="targeted attacks", disable=not progress):
            parts.append(shortcuts.nonrobust_dataset(model, x[i:i + FEATURE_BATCH], target[i:i + FEATURE_BATCH],
                                                     eps=recipe["eps"], steps=recipe["steps"])[0])
        return torch.cat(parts), target
    everything = as_tensors(train)[0]
    start = everything[torch.randint(0, len(everything), y.shape, generator=generator)].to(device)
    for i in tqdm(range(0, len(y), FEATURE_BATCH), desc="robust images", disable=not progress):
        parts.append(shortcuts.robust_dataset(model, x[i:i + FEATURE_BATCH], start[i:i + FEATURE_BATCH],
                                              steps=recipe["steps"], lr=recipe["lr"]))
    return torch.cat(parts), y


def _feature_results(name, model, data, train, test):
    """The figures of the card, each measured here (for the robust data set also a control: the
    same real images, their own labels, standard training)."""
    from . import shortcuts
    from .models import load
    recipe = FEATURE_RECIPES[name]
    (x, y), (x_test, y_test) = data, as_tensors(test)
    results = {"test accuracy (real test images)": attacks.accuracy(model, test, progress=False)}
    if recipe["kind"] == "nonrobust":
        source = load(recipe["source"], device=model_device(model))
        with torch.no_grad():
            reached = torch.cat([source(x[i:i + FEATURE_BATCH]).argmax(1) for i in range(0, len(y), FEATURE_BATCH)])
        results[f"training images that {recipe['source']} classifies as their new label"] = (reached == y).float().mean().item()
    elif recipe["kind"] == "robust":
        n, eps = recipe["eval_images"], recipe["eval_eps"]
        device = model_device(model)
        seed_everything(0)
        control = FashionCNN().to(device)
        fit(control, (as_tensors(train)[0][:len(y)], y), recipe["epochs"], seed=0, progress=False)
        for label, m in (("this model", model), ("control: the same real images, standard training", control),
                         ("fmnist-cnn", load("fmnist-cnn", device=device)),
                         ("fmnist-cnn-robust", load("fmnist-cnn-robust", device=device))):
            seed_everything(0)
            results[f"{label}: clean (first {n:,} test images)"] = attacks.accuracy(m, test, limit=n, progress=False)
            results[f"{label}: L-inf PGD-10 at eps = {eps:g}"] = attacks.accuracy(
                m, test, attacks.pgd, limit=n, eps=eps, step_size=eps / 4, steps=10, progress=False)
    else:
        x_test, y_test = x_test.to(model_device(model)), y_test.to(model_device(model))
        c, untagged = recipe["tag_class"], y_test != recipe["tag_class"]
        tag = lambda images: shortcuts.watermark(images, recipe["corner"], recipe["size"])  # noqa: E731
        as_collected = torch.where((y_test == c).view(-1, 1, 1, 1), tag(x_test), x_test)
        with torch.no_grad():  # in parts: 10,000 images at once would hold gigabytes of activations
            clean, collected, pasted = (torch.cat([model(part).argmax(1) for part in images.split(FEATURE_BATCH)])
                                        for images in (x_test, as_collected, tag(x_test[untagged])))
        results = {"test accuracy, the class's test images tagged as in training": (collected == y_test).float().mean().item(),
                   "test accuracy, no image tagged": (clean == y_test).float().mean().item(),
                   f"recall of class {c} without the tag": (clean[~untagged] == c).float().mean().item(),
                   f"other classes' test images predicted {c} once tagged": (pasted == c).float().mean().item(),
                   f"other classes' test images predicted {c} untagged": (clean[untagged] == c).float().mean().item()}
    return results


def _train_features(args, argv):
    """``python -m labkit.train <FEATURE_RECIPES name>``: build the data set, train a fresh
    FashionCNN on it (standard training), measure, write weights, sha256 and card."""
    import pathlib
    import sys
    import time
    from .data import fashion_mnist
    from .models import WEIGHTS_DIR
    recipe = dict(FEATURE_RECIPES[args.name])
    if args.epochs:
        recipe["epochs"] = args.epochs
    device = torch.device(args.device) if args.device else get_device()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    if args.limit:
        train, test = train.tensors(slice(0, args.limit)), test.tensors(slice(0, args.limit))
        recipe["images"] = min(recipe["images"], args.limit)
    start, cpu_start = time.perf_counter(), time.process_time()
    cache = pathlib.Path(args.cache) / f"{args.name}-data.pt" if args.cache else None
    if cache is not None and cache.is_file():  # a data set this recipe built before (same settings)
        data = tuple(t.to(device) for t in torch.load(cache, weights_only=True))
    else:
        data = feature_dataset(args.name, train, recipe["images"], device=device)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(tuple(t.cpu() for t in data), cache)
    built = time.perf_counter() - start
    seed_everything(0)
    model = FashionCNN().to(device)
    history = fit(model, data, recipe["epochs"], test_data=test, seed=0)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    out = WEIGHTS_DIR if args.out is None else pathlib.Path(args.out)
    sha = _save_weights(model, out, args.name)
    results = _feature_results(args.name, model, data, train, test)
    command = ("python -m labkit.train " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if args.out is None and not args.limit:
        _write_feature_card(args.name, recipe, history, results, built, seconds, sha, command, device, cpu)
    print(f"{args.name}: data set {built / 60:.1f} min, total {seconds / 60:.1f} min ({cpu / 60:.1f} min CPU); "
          + ", ".join(f"{k} {100 * v:.2f} %" for k, v in results.items()) + f"; sha256 {sha}")


def _write_feature_card(name, recipe, history, results, built, seconds, sha, command, device, cpu=None):
    import platform
    from .models import CARDS_DIR
    curve = "\n".join(f"| {h['epoch']} | {h['loss']:.4f} | {100 * h['train_accuracy']:.2f} % | "
                      f"{100 * h['test_accuracy']:.2f} % |" for h in history)
    figures = "\n".join(f"| {key} | {100 * value:.2f} % |" for key, value in results.items())
    card = f"""# Model card: `{name}`

*Written by `{command}`; every number below was measured by that run.*

- **Architecture**: `labkit.models.FashionCNN` (see the `fmnist-cnn` card). Input: 1 x 28 x 28 in [0, 1].
- **Data**: {recipe['how'].format(**recipe)}. Evaluated on the 10,000 Fashion-MNIST test images.
- **Training**: Adam, one-cycle learning rate peaking at 2e-3, batch 128, {recipe['epochs']} epochs, seed 0.
- **Trained on**: {device} ({platform.processor() or platform.machine()}, torch {torch.__version__},
  {torch.get_num_threads()} threads): data set {built / 60:.1f} minutes, in all {seconds / 60:.1f} minutes
  of wall time{'' if cpu is None else f' ({cpu / 60:.1f} minutes of CPU time: on a busy machine the wall time is longer)'}.
- **Weights**: `labkit/models/weights/{name}.pt`, sha256 `{sha}`.

## What it shows (lesson 13)

| measured | value |
|---|---|
{figures}

## Training curve

| epoch | loss | train accuracy | test accuracy (real, clean test images) |
|---|---|---|---|
{curve}

## Intended use and limits

Teaching only (lesson 13): a small-scale reproduction on a subset of Fashion-MNIST, not a
benchmark. The figures hold for this seed and these settings.
"""
    CARDS_DIR.mkdir(exist_ok=True)
    (CARDS_DIR / f"{name}.md").write_text(card)


if __name__ == "__main__":
    main()
