"""Experiment configs (ml_collections) and model-size presets (``configs.common``)."""
