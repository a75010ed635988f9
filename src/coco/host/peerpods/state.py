"""Sandbox state on disk: ``<pods-dir>/<sandbox>/sandbox.json`` (and the VM's ``userdata``).

Upstream's CAA keeps sandboxes in memory, so a restart loses every pod (its issues #375, #394,
#3055). Here each state change is written (atomically, 0600) before the CAA acts on it:

* ``created``: CreateVM answered; the userdata is ready, no VM exists;
* ``starting``: StartVM asked the provider for a VM (``instance_id`` once it has one) and waits
  for its forwarder; a CAA that finds this state at start died before StartVM answered, so the
  VM (if any) is an orphan: the reconcile deletes it and the sandbox goes back to ``created``;
* ``running``: StartVM answered; the VM ``instance_id`` exists and the proxy serves the agent
  socket.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from coco import jsonio
from coco.files import atomic_write
from coco.host.peerpods.provider import PeerPodError

STATE_FILE = "sandbox.json"
USERDATA_FILE = "userdata"
STATES = ("created", "starting", "running")
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_sandbox_id(sid: str) -> str:
    if not _SANDBOX_ID.fullmatch(sid) or sid in (".", ".."):
        raise PeerPodError(
            f"sandbox id: expected 1-128 letters, digits, '.', '_' or '-', found {sid[:80]!r}"
        )
    return sid


@dataclass
class Sandbox:
    id: str
    pod_name: str
    pod_namespace: str
    instance_name: str
    netns: str = ""
    state: str = "created"
    vcpus: int = 0
    memory: int = 0
    gpus: int = 0
    instance_type: str = ""
    image: str = ""
    instance_id: str = ""
    ips: list[str] = field(default_factory=list)
    forwarder_port: int = 0
    initdata: str = ""  # gzip + base64, as sent in the userdata


class Store:
    """One directory per sandbox under ``pods_dir``."""

    def __init__(self, pods_dir: Path) -> None:
        self.pods_dir = pods_dir

    def pod_dir(self, sid: str) -> Path:
        return self.pods_dir / check_sandbox_id(sid)

    def save(self, sb: Sandbox, userdata: str | None = None) -> None:
        d = self.pod_dir(sb.id)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if userdata is not None:
            atomic_write(d / USERDATA_FILE, userdata.encode(), 0o600)
        atomic_write(d / STATE_FILE, json.dumps(dataclasses.asdict(sb), indent=1).encode(), 0o600)

    def userdata(self, sid: str) -> str:
        return (self.pod_dir(sid) / USERDATA_FILE).read_text()

    def remove(self, sid: str) -> None:
        shutil.rmtree(self.pod_dir(sid), ignore_errors=True)

    def load_all(self) -> dict[str, Sandbox]:
        out: dict[str, Sandbox] = {}
        if not self.pods_dir.is_dir():
            return out
        names = {f.name for f in dataclasses.fields(Sandbox)}
        for path in sorted(self.pods_dir.glob(f"*/{STATE_FILE}")):
            where = str(path)
            doc = jsonio.loads(path.read_bytes(), what=where, error=PeerPodError)
            if not isinstance(doc, dict) or set(doc) - names or doc.get("state") not in STATES:
                raise PeerPodError(
                    f"{where}: expected a sandbox record ({', '.join(sorted(names))}), found "
                    f"keys {sorted(doc) if isinstance(doc, dict) else type(doc).__name__} "
                    "(remove the directory if the pod is gone)"
                )
            try:
                sb = Sandbox(**doc)
            except TypeError as e:
                raise PeerPodError(f"{where}: {e}") from None
            if sb.id != path.parent.name:
                raise PeerPodError(f"{where}: id {sb.id!r} does not match its directory")
            out[sb.id] = sb
        return out
