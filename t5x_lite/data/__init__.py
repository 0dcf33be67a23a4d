"""Data: vocabularies, sources, tasks, preprocessors and the Grain input pipeline."""
