"""Names of the supported backbone architectures, importable without torch.

Light processes (configuration checks, connect_db) need the names but not the networks.
"""

BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")
