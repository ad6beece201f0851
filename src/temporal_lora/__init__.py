"""Temporal LoRA: one frozen base model, one LoRA adapter per domain, and a router in front."""

from temporal_lora.errors import TemporalLoRAError
from temporal_lora.meta import __version__

__all__ = ["TemporalLoRA", "TemporalLoRAError", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import temporal_lora` (and `tlora --help`) does not pay for importing torch.
    if name == "TemporalLoRA":
        from temporal_lora.model import TemporalLoRA

        return TemporalLoRA
    raise AttributeError(name)
