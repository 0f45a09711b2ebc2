"""Base checkpoints (single files, sharded folders, diffusers pipelines) mapped to components, native modules
and rows."""
