"""Scores that depend on the data alone, kept here so that no run spends time measuring them: the supervised
ceiling of MedMNIST's paper, and the class probes on raw pixels of MedMNIST's own files."""

from __future__ import annotations

# The supervised ceiling: ResNet-18 (28) test accuracy, MedMNIST v2 (Yang et al., Scientific Data 2023, Table 3).
RESNET18_28 = {
    "bloodmnist": 0.958,
    "breastmnist": 0.863,
    "pneumoniamnist": 0.854,
    "retinamnist": 0.524,
    "dermamnist": 0.735,
}

# (dataset, size) -> the test accuracy of latent_space.class_probes on the raw pixels of MedMNIST's own file (its md5
# in medmnist.INFO): the same for every model, and most of the probes' time. Measured on one torch thread, with the
# probes' settings PIXEL_PROBES_PROTOCOL; tests/test_baselines.py measures them again on the files it has. A file not
# listed here (DermaMNIST, the 64-224 px sizes: not at hand when this was measured) or not MedMNIST's own, or probes
# whose settings have changed since (probes.protocol()), are measured by the run.
PIXEL_PROBES_PROTOCOL = {
    "knn_neighbours": 11,
    "linear_strengths": (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    "linear_iterations": 100,
    "preconditioned": 128,
    "hessian_scale": 0.25,
    "two_classes": "one logit",
}
PIXEL_PROBES = {
    ("bloodmnist", 28): {"knn": 0.763519, "linear": 0.824320},
    ("pneumoniamnist", 28): {"knn": 0.830128, "linear": 0.836538},
    ("retinamnist", 28): {"knn": 0.480000, "linear": 0.515000},
    ("breastmnist", 28): {"knn": 0.788462, "linear": 0.782051},
}
