"""Domains over time: add or remove a domain, add a subdomain, in an existing bundle.

Every change trains at most one new adapter, refits a router from its replay memory (no old raw
text), copies every other file byte for byte and commits a new bundle version (versions.py).
"""

from temporal_lora.evolve.common import bundle_train_config
from temporal_lora.evolve.domains import add_domain, remove_domain
from temporal_lora.evolve.styles import add_style
from temporal_lora.evolve.subdomains import add_subdomain

__all__ = ["add_domain", "add_style", "add_subdomain", "bundle_train_config", "remove_domain"]
