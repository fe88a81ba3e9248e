"""Datasets of paired images and captions."""
