"""recursive: the torch.nn layer of recursive-kernels (modules, models, command line)."""

__all__: list = []
