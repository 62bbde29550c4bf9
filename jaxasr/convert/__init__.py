"""Checkpoint converters: import weights from other formats into Hugging Face layouts."""
