"""A live page of the mesh for a person to watch: `make view` (view/__main__.py)."""
