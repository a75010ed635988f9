"""Confidential Containers in Python.

Floors (arrows point down): ``cli`` over ``trustee`` / ``guest`` over ``image`` / ``integrity`` over
the ground floor ``protocol``, ``tee``, ``oci``, ``ocicrypt``, ``rpc`` and ``crypto``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("coco")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
