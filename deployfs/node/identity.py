"""Who an instance runs as, and who may ask for that.

Why it looks like this:

* Names are resolved on the host that runs the instance, at apply (so an
  unknown user refuses the manifest with its line number) and again at every
  start (a user deleted since is a failed start, never a silent run as root).
* The supplementary groups are the user's from the group database
  (``getgrouplist``), as login and ``su`` give them; ``group`` replaces the
  primary group (which does not stay as a supplementary one), as systemd's
  ``Group=`` does.
* The user chosen at apply is recorded with the version (a ``user`` line added
  to the version's text when ``--default-user`` chose it): every later start of
  that version (restart, scale, a supervisor restart, after a server restart,
  with another ``--default-user`` or none) runs as it, never as root by default.
* The policy never lets an instance run with more privilege than its deployer
  had: a deployer who is not root may name only itself or one of
  ``--allow-users``, never root, and only a group the run-as user is already
  in.  Root may name anyone.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field

from ..model.errors import CommandError, Kind
from ..model.manifest import Manifest, ManifestError, Parsed, add_user_line, parse


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, the primary gid included
    home: str


class IdentityError(Exception):
    """No such user or group on this host; ``what`` is the directive that named it."""

    def __init__(self, what: str, reason: str) -> None:
        self.what, self.reason = what, reason
        super().__init__(f"{what}: {reason}")


def resolve(user: str, group: str | None = None) -> Identity:
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise IdentityError("user", f"no user {user!r} on this host") from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
        except (KeyError, OverflowError):
            raise IdentityError("group", f"no group {group!r} on this host") from None
    # With ``group``, the user's own primary group goes too (as with systemd's Group=): the
    # database's memberships of the user, plus the group in its place.
    groups = set(os.getgrouplist(pw.pw_name, gid))
    return Identity(pw.pw_name, pw.pw_uid, gid, tuple(sorted(groups)), pw.pw_dir)


def member_groups(ident: Identity) -> set[int]:
    """The groups a user is in by the database: its primary and supplementary ones."""
    pw = pwd.getpwuid(ident.uid)
    return set(os.getgrouplist(pw.pw_name, pw.pw_gid))


@dataclass(frozen=True)
class UserPolicy:
    """``--default-user`` and ``--allow-users``, and the rule that applies them."""

    default_user: str | None = None
    allow_users: frozenset[str] = frozenset()
    server_uid: int = field(default_factory=os.geteuid)

    def run_as(self, m: Manifest) -> str | None:
        """The user an instance of ``m`` runs as; None: as deployfs itself."""
        return m.user or self.default_user

    def record(self, parsed: Parsed, text: str, name: str) -> tuple[Parsed, str]:
        """The manifest as a version records it: with the user ``--default-user`` chose
        written in, so that no later start depends on the flags of the server running then."""
        if parsed.manifest.user is not None or self.default_user is None:
            return parsed, text
        text = add_user_line(text, self.default_user, "--default-user when applied")
        return parse(text, name=name), text

    def _may_name(self) -> frozenset[str]:
        return self.allow_users | ({self.default_user} if self.default_user else set())

    def check(self, parsed: Parsed, source: str, deployer: int | None) -> None:
        """Refuse a manifest whose user or group does not exist (ManifestError, with
        its line) or that ``deployer`` (a uid; None: unknown) may not ask for (EPERM)."""
        m = parsed.manifest
        name = self.run_as(m)
        ident: Identity | None = None
        if name is not None:
            try:
                ident = resolve(name, m.group)
            except IdentityError as e:
                line = parsed.lines.get(e.what) if (e.what == "group" or m.user) else None
                where = "" if line or m.user else " (--default-user)"
                raise ManifestError(source, line, f"{e.reason}{where}") from None
        elif m.group is not None:
            try:
                grp.getgrnam(m.group) if not m.group.isdigit() else grp.getgrgid(int(m.group))
            except (KeyError, OverflowError):
                raise ManifestError(source, parsed.lines.get("group"), f"group: no group {m.group!r} on this host") from None
        uid = self.server_uid if ident is None else ident.uid
        if self.server_uid != 0 and uid != self.server_uid:
            raise CommandError(Kind.PERMISSION, f"user {name}: deployfs runs as uid={self.server_uid}, not root, "
                                            "so it can run instances only as itself")
        if deployer == 0:
            return
        who = "a deployer" if deployer is None else f"uid={deployer}"
        if uid == 0:
            why = "the manifest names no user and deployfs has no --default-user" if name is None else f"user {name}"
            raise CommandError(Kind.PERMISSION, f"{why}: the instance would run as root, and {who} is not root "
                                            "(name an unprivileged user with `user NAME`)")
        # The default user is allowed by name too: a version recorded with it (record) rolls back.
        if m.user is not None and ident is not None and ident.uid != deployer \
                and not {m.user, ident.user} & self._may_name():
            allowed = ", ".join(sorted(self.allow_users)) or "none"
            raise CommandError(Kind.PERMISSION, f"user {m.user}: {who} may run instances only as itself or as one of "
                                            f"--allow-users ({allowed})")
        if m.group is not None and ident is not None and ident.gid not in member_groups(ident):
            raise CommandError(Kind.PERMISSION, f"group {m.group}: {ident.user} is not a member, and {who} is not root")
        elif m.group is not None and ident is None:
            raise CommandError(Kind.PERMISSION, f"group {m.group}: {who} is not root (name a user too)")


def deployer_uid(who: str) -> int | None:
    """The uid in a command's ``who`` ("uid=1000"), or None when it names none."""
    head, _, value = who.partition("=")
    return int(value) if head == "uid" and value.isdigit() else None
