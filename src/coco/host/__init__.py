"""The host side: the untrusted node that starts pod VMs and talks to the guest only on the wire.

It never imports :mod:`coco.guest` or :mod:`coco.trustee`.
"""
