"""RaNA Studio's compression core: loading, calibration, adapters, methods and evaluation.

A pure library: it knows nothing of databases, job queues or user interfaces.
"""

from rana_core.errors import RanaError

__all__ = ["RanaError"]
