"""Per-epoch cost of each regularizer against the same plain skorch net.

Every row trains the same module on the same data in this process; the time is
the median epoch duration from skorch's ``history`` (first epoch dropped), over
``--repeats`` fits. The ratios divide by the plain skorch ``NeuralNetClassifier``
(the anchor) with the same module, and by skreg's net without a regularizer (which
also fetches whole batches at once, so it is faster than the anchor); the quality
figure is held-out accuracy.

    python benchmarks/bench_nets.py                  # CPU, digits, ~2 minutes
    python benchmarks/bench_nets.py --device cuda --large
"""

import argparse
import statistics
import time

import numpy as np
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier
from torch import nn

from skreg._device import device_name, resolve_device
from skreg.nets import (
    MLP,
    ConvOrthogonality,
    EarlyLearningRegularization,
    GroupSparsity,
    RegularizedNetClassifier,
    SmallCNN,
    SoftOrthogonality,
)


def _data(large):
    if large:
        X, y = make_classification(n_samples=60_000, n_features=256,
                                   n_informative=64, n_classes=10,
                                   random_state=0)
        name = "make_classification 60000x256"
    else:
        X, y = load_digits(return_X_y=True)
        X = X / 16.0
        name = "digits 1797x64"
    X = X.astype(np.float32)
    return name, train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


def _median_epoch(net):
    durations = [epoch["dur"] for epoch in net.history][1:]
    return statistics.median(durations)


def _time(make, X_train, y_train, X_test, y_test, repeats):
    epochs, accuracies = [], []
    for _ in range(repeats):
        net = make()
        net.fit(X_train, y_train)
        epochs.append(_median_epoch(net))
        accuracies.append(float(np.mean(net.predict(X_test) == y_test)))
    return statistics.median(epochs), statistics.median(accuracies)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large", action="store_true",
                        help="60k x 256 synthetic data and wider layers (GPU)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steadier timings on a shared "
                             "machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    device = str(resolve_device(args.device))
    data_name, (X_train, X_test, y_train, y_test) = _data(args.large)
    n_features, n_classes = X_train.shape[1], len(np.unique(y_train))
    hidden = (1024, 1024) if args.large else (256, 256)
    batch_size = 512 if args.large else 128
    epochs = args.epochs or (6 if args.large else 8)
    side = int(np.sqrt(n_features))
    common = {"lr": 1e-3, "max_epochs": epochs, "batch_size": batch_size,
              "device": device}

    def anchor(module, **module_params):
        def make():
            return NeuralNetClassifier(
                module, module__n_features=n_features, module__n_outputs=n_classes,
                criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam,
                train_split=None, iterator_train__shuffle=True, verbose=0,
                **{f"module__{k}": v for k, v in module_params.items()}, **common)
        return make

    def regularized(module, regularizers, **module_params):
        def make():
            return RegularizedNetClassifier(
                module, regularizers=regularizers, random_state=0,
                **{f"module__{k}": v for k, v in module_params.items()}, **common)
        return make

    mlp = {"hidden_units": hidden}
    cnn = {"channels": (32, 64), "strides": (1, 2)}
    rows = [
        ("MLP", "plain skorch (anchor)", anchor(MLP, **mlp)),
        ("MLP", "none", regularized(MLP, None, **mlp)),
        ("MLP", "SoftOrthogonality", regularized(MLP, [SoftOrthogonality()], **mlp)),
        ("MLP", "SoftOrthogonality(spectral)",
         regularized(MLP, [SoftOrthogonality(kind="spectral")], **mlp)),
        ("MLP", "EarlyLearningRegularization",
         regularized(MLP, [EarlyLearningRegularization()], **mlp)),
        ("MLP", "GroupSparsity", regularized(MLP, [GroupSparsity()], **mlp)),
    ]
    if side * side == n_features:
        rows += [
            ("SmallCNN", "plain skorch (anchor)", anchor(SmallCNN, **cnn)),
            ("SmallCNN", "none", regularized(SmallCNN, None, **cnn)),
            ("SmallCNN", "ConvOrthogonality",
             regularized(SmallCNN, [ConvOrthogonality()], **cnn)),
            ("SmallCNN", "GroupSparsity",
             regularized(SmallCNN, [GroupSparsity(layers="all")], **cnn)),
        ]

    print(f"data: {data_name}; device: {device_name(device)}; epochs: {epochs}; "
          f"batch: {batch_size}; MLP hidden {hidden}; torch threads "
          f"{torch.get_num_threads()}; repeats {args.repeats}")
    print()
    print("| module | regularizer | s / epoch | ratio to anchor | ratio to no "
          "regularizer | test acc |")
    print("|---|---|---|---|---|---|")
    anchors, baselines = {}, {}
    start = time.perf_counter()
    for module_name, label, make in rows:
        seconds, accuracy = _time(make, X_train, y_train, X_test, y_test,
                                  args.repeats)
        anchors.setdefault(module_name, seconds)
        if label == "none":
            baselines[module_name] = seconds
        baseline = baselines.get(module_name)
        versus_none = f"{seconds / baseline:.2f}" if baseline else "-"
        print(f"| {module_name} | {label} | {seconds:.4f} | "
              f"{seconds / anchors[module_name]:.2f} | {versus_none} | "
              f"{accuracy:.3f} |", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
