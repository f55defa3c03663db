"""Data pipelines: real formats (VQA v2, bottom-up features, Visual Genome, Flickr30k Entities) and
the built-in scene benchmark."""
