"""The MPT family: config, presets, prompt templates, the Relax model and its checkpoint loader."""
