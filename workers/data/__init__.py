"""Corpora (readers, manifests), augmentation, perturbations and continuous test streams."""
