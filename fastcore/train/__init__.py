"""The thin trainer: fastcore train, fastcore data prepare, fastcore sample."""
