"""mixprec: mixed-precision training, one concept per module."""

import logging

__version__ = "0.1.0"


class _LibraryNoise(logging.Filter):
    """Drops two import-time notices that concern no reader of this book and would otherwise land in the
    first output of every chapter: torchao (which transformers imports whenever it is installed) logs
    one warning per CUDA extension that a CPU build of torch cannot load, and torch logs a deprecation
    notice for two of torchao's enums. On a CUDA build of torch the torchao warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "torchao" and message.startswith("Failed to load"):
            import torch

            return torch.version.cuda is not None
        return "register_constant() on Enum subclasses is deprecated" not in message


logging.getLogger("torchao").addFilter(_LibraryNoise())
logging.getLogger("torch.utils._pytree").addFilter(_LibraryNoise())
