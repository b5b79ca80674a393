"""The launcher plugin interface, where third-party backends import it from: `Backend` and its records.

It lives in `melange_sky.fleet.backends`; this module keeps the documented import path stable.
"""
from melange_sky.fleet.backends import (BUILTIN_BACKENDS, DEFAULT_BACKEND, ENTRY_POINT_GROUP, ENV_VAR, Backend,
                                        ClusterInfo, ClusterStatus, LaunchRequest, Validation, ValidationLevel,
                                        available_backends, load_backend)

__all__ = ["BUILTIN_BACKENDS", "DEFAULT_BACKEND", "ENTRY_POINT_GROUP", "ENV_VAR", "Backend", "ClusterInfo",
           "ClusterStatus", "LaunchRequest", "Validation", "ValidationLevel", "available_backends", "load_backend"]
