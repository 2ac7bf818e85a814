"""tta: a continual test-time adaptation runtime for vision models.

    import tta
    adapted = tta.adapt(model, "tent", preset="cifar10")
    logits = adapted(x)          # predicts and adapts on the batch
"""

from tta.adapters import Adapter, adapt, adapter_config, list_adapters
from tta.errors import TTAError

__version__ = "0.1.0"

__all__ = ["Adapter", "TTAError", "adapt", "adapter_config", "list_adapters", "__version__"]
