"""Confidential Containers in Python.

Floors (arrows point down): ``cli`` over ``trustee`` / ``guest`` over ``image`` / ``integrity`` over
the ground floor ``protocol``, ``tee``, ``oci``, ``ocicrypt``, ``rpc`` and ``crypto``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
