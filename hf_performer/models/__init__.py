"""Performer model types: stock transformers families with FAVOR+ attention and saved random features."""
