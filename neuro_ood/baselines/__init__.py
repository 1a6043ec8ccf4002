"""Supervised baselines for the unsupervised detectors: a ResNet classifier (Hendrycks & Gimpel 2017)."""
