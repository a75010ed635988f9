"""An image config's ``User`` as the process's uid, gid and supplementary groups.

The one resolver behind the bundle a pull makes (:mod:`coco.image.bundle`, reading the rootfs's
``/etc/passwd`` and ``/etc/group``) and the policy genpolicy writes for the same image
(:mod:`coco.integrity.genpolicy`, reading those files out of the layers), so both agree on who
the container runs as. The forms are the runtimes' (runc, containerd): ``""`` (root), ``uid``,
``uid:gid``, ``name``, ``name:group``, ``uid:group``, ``name:gid``; a name is looked up, a number
is taken as it is, and a number's passwd row (when there is one) gives the primary group.
"""

from __future__ import annotations

from coco.errors import CocoError
from coco.record import record

#: The PATH a process gets when the image config sets none (runc's and containerd's default).
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@record
class ImageUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    """Groups that list the user as a member (only when the User names no group)."""
    username: str = ""


class Accounts:
    """The ``/etc/passwd`` and ``/etc/group`` of an image (either may be empty)."""

    def __init__(self, passwd: str = "", group: str = "") -> None:
        self.passwd = _table(passwd, 4)
        self.group = _table(group, 3)

    def user(self, name: str) -> tuple[int, int | None] | None:
        """(uid, primary gid) of the user named ``name``."""
        for row in self.passwd:
            if row[0] == name and row[2].isdigit():
                return int(row[2]), int(row[3]) if row[3].isdigit() else None
        return None

    def user_by_uid(self, uid: int) -> tuple[str, int | None] | None:
        """(name, primary gid) of the first passwd row for ``uid``."""
        for row in self.passwd:
            if row[2] == str(uid):
                return row[0], int(row[3]) if row[3].isdigit() else None
        return None

    def group_id(self, name: str) -> int | None:
        for row in self.group:
            if row[0] == name and row[2].isdigit():
                return int(row[2])
        return None

    def member_of(self, username: str) -> set[int]:
        return {
            int(row[2])
            for row in self.group
            if len(row) >= 4 and row[2].isdigit() and username in row[3].split(",")
        }


def _table(text: str, fields: int) -> list[list[str]]:
    rows = (ln.split(":") for ln in text.splitlines() if ln and not ln.startswith("#"))
    return [r for r in rows if len(r) >= fields]


def resolve_user(user: str, accounts: Accounts, where: str, error: type[CocoError]) -> ImageUser:
    """The process user for image config ``User`` ``user``; a name that ``accounts`` do not hold
    raises ``error`` naming ``where``."""
    if not user:
        return ImageUser(0, 0)
    name, _, group = user.partition(":")
    username = ""
    gid: int | None = None
    if name.isdigit():
        uid = int(name)
        row = accounts.user_by_uid(uid)
        if row is not None:
            username, gid = row
    else:
        found = accounts.user(name)
        if found is None:
            raise error(f"{where}: expected user {name!r} in the image's /etc/passwd, found none")
        username, (uid, gid) = name, found
    if group:
        gid = int(group) if group.isdigit() else accounts.group_id(group)
        if gid is None:
            raise error(f"{where}: expected group {group!r} in the image's /etc/group, found none")
    primary = gid if gid is not None else 0
    extra: tuple[int, ...] = ()
    if username and not group:
        extra = tuple(sorted(accounts.member_of(username) - {primary}))
    return ImageUser(uid, primary, extra, username)
