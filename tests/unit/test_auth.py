"""Who is calling: a bearer token is a user of the keys file (read again as it changes) or RENDERFARM_TOKEN's admin."""

import logging

import pytest

from renderfarm.cluster.auth import ANONYMOUS, Users
from renderfarm.cluster.config_file import ConfigError
from renderfarm.cluster.keys import add_user, remove_user, token_sha256


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def keys(tmp_path):
    """A keys file with the member alice and the admin root; their tokens."""
    path = tmp_path / "keys.toml"
    return path, add_user(path, "alice", max_concurrent_jobs=2), add_user(path, "root", role="admin")


def test_a_farm_without_keys_or_token_is_open_to_everyone_as_an_admin():
    users = Users(None, None)
    assert users.open
    assert users.authenticate(()) is ANONYMOUS and users.authenticate(bearer("anything")) is ANONYMOUS
    assert ANONYMOUS.is_admin


def test_renderfarm_token_is_one_admin_named_admin():
    users = Users(None, "s3cret")
    assert not users.open
    admin = users.authenticate(bearer("s3cret"))
    assert (admin.name, admin.is_admin) == ("admin", True) and users.get("admin") == admin
    assert users.authenticate(bearer("s3cre")) is None and users.authenticate(()) is None


def test_each_keys_file_token_is_its_own_user(keys):
    path, alice, root = keys
    users = Users(path, None)
    assert users.authenticate(bearer(alice)) == users.get("alice")
    assert (users.get("alice").role, users.get("alice").max_concurrent_jobs) == ("member", 2)
    assert users.authenticate(bearer(root)).name == "root" and users.get("root").is_admin


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (),
        (("authorization", "Bearer rf_not-anyones"),),
        (("authorization", "Bearer "),),
        (("x-api-key", "Bearer {alice}"),),
        (("authorization", "{alice}"),),  # the token without "Bearer "
        (("authorization", "Token {alice}"),),
        (("authorization", "Bearer {hash}"),),  # what the keys file holds is not a token
    ],
)
def test_a_call_without_a_users_exact_bearer_token_is_nobody(keys, metadata):
    path, alice, _ = keys
    if metadata:
        metadata = tuple((key, value.format(alice=alice, hash=token_sha256(alice))) for key, value in metadata)
    assert Users(path, None).authenticate(metadata) is None


def test_a_user_added_or_removed_takes_effect_without_a_restart(keys):
    path, alice, _ = keys
    users = Users(path, None)
    bob = add_user(path, "bob", weight=2)
    assert users.authenticate(bearer(bob)).name == "bob" and users.get("bob").weight == 2
    remove_user(path, "alice")
    assert users.authenticate(bearer(alice)) is None and users.get("alice") is None
    assert users.authenticate(bearer(bob)).name == "bob"


def test_a_keys_file_missing_or_broken_at_start_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="keys file .*keys.toml"):
        Users(tmp_path / "keys.toml", None)
    (tmp_path / "keys.toml").write_text('[[users]]\nname = "alice"\n')
    with pytest.raises(ConfigError, match="missing required key users\\[0\\].token_sha256"):
        Users(tmp_path / "keys.toml", None)


def test_a_keys_file_broken_later_keeps_the_users_the_farm_had(keys, caplog):
    path, alice, _ = keys
    users = Users(path, None)
    good = path.read_text()
    path.write_text(good + "[[users]\n")  # an editor's half-saved file
    with caplog.at_level(logging.ERROR):
        assert users.authenticate(bearer(alice)).name == "alice"
    assert "keys.toml: not valid TOML" in caplog.text
    path.write_text(good)
    bob = add_user(path, "bob")  # fixed, the file is read again
    assert users.authenticate(bearer(bob)).name == "bob"


def test_a_keys_file_user_named_admin_clashes_with_renderfarm_tokens_admin(tmp_path):
    path = tmp_path / "keys.toml"
    alice = add_user(path, "alice")
    users = Users(path, "s3cret")
    assert users.authenticate(bearer(alice)).name == "alice" and users.authenticate(bearer("s3cret")).name == "admin"
    add_user(path, "admin", role="admin")
    with pytest.raises(ConfigError, match="'admin' is RENDERFARM_TOKEN's admin"):
        Users(path, "s3cret")
    # The running farm refuses the change too: its admin stays RENDERFARM_TOKEN's.
    assert users.get("admin").token_sha256 == token_sha256("s3cret")


def test_members_see_only_their_own_jobs_and_admins_every_job(keys):
    path, alice, root = keys
    users = Users(path, None)
    alice, root = users.authenticate(bearer(alice)), users.authenticate(bearer(root))
    assert alice.may_see("alice") and not alice.may_see("bob")
    assert not alice.may_see("")  # jobs from before owners are the admins'
    assert all(root.may_see(owner) for owner in ("alice", "bob", "", "root"))
