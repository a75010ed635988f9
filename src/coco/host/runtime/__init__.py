"""The containerd runtime for confidential pods: ``containerd-shim-coco-v2`` (``io.containerd.coco.v2``).

* :mod:`.shim`: the shim v2 command (``start``, ``delete``, serve mode) as containerd 1.6+ runs it;
* :mod:`.task`: the ``containerd.task.v2.Task`` service, each task turned into kata agent calls in
  upstream's order; :mod:`.spec` the OCI spec as the agent receives it; :mod:`.stdio` the copying
  between containerd's fifos and the agent's streams; :mod:`.events` the events sent back;
* :mod:`.config`: the runtime config TOML (kata's ``configuration.toml`` shape);
  :mod:`.initdata`: the initdata the pod's policy reaches the guest in;
* :mod:`.sandbox`: the :class:`~.sandbox.Sandbox` interface; one folder per kind: ``local``
  (insecure: the guest on the host), ``qemu`` (the pod VM), ``remote`` (a cloud-api-adaptor VM).

The host side never imports the guest: it reaches the agent over ttRPC only.
"""

from coco.errors import HostError


class ShimError(HostError):
    """The shim could not do what containerd asked (bad bundle, config, state, or agent reply)."""


class SandboxError(HostError):
    """A sandbox (the place the agent runs) that could not be started, reached or stopped."""
