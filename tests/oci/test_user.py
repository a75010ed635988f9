"""coco.oci.user: the image config's User as uid, gid and supplementary groups."""

from __future__ import annotations

import pytest

from coco.errors import BundleError
from coco.oci.user import Accounts, ImageUser, resolve_user

ACCOUNTS = Accounts(
    "root:x:0:0::/root:/bin/sh\n# comment\napp:x:1234:4321::/:/bin/sh\nodd:x:7:x::/:/bin/sh\n",
    "users:x:4321:\napp:x:2345:\nextra:x:3456:root,app\nmore:x:4567:app\n",
)


@pytest.mark.parametrize(
    ("user", "want"),
    [
        ("", ImageUser(0, 0)),
        ("app", ImageUser(1234, 4321, (3456, 4567), "app")),
        ("app:app", ImageUser(1234, 2345, (), "app")),
        ("app:9", ImageUser(1234, 9, (), "app")),
        ("1234", ImageUser(1234, 4321, (3456, 4567), "app")),
        ("1234:extra", ImageUser(1234, 3456, (), "app")),
        ("99", ImageUser(99, 0)),  # no passwd row: root's group, no name
        ("odd", ImageUser(7, 0, (), "odd")),  # a gid that is not a number counts as none
    ],
)
def test_forms(user: str, want: ImageUser) -> None:
    assert resolve_user(user, ACCOUNTS, "here", BundleError) == want


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("ghost", "here: expected user 'ghost' in the image's /etc/passwd, found none"),
        ("app:ghosts", "here: expected group 'ghosts' in the image's /etc/group, found none"),
    ],
)
def test_unknown_names_are_refused_with_the_error_given(user: str, message: str) -> None:
    with pytest.raises(BundleError) as e:
        resolve_user(user, ACCOUNTS, "here", BundleError)
    assert str(e.value) == message
