"""The keys file: users as validated data, tokens that exist only with their user, and edits that keep the rest."""

import re
import stat

import pytest

from renderfarm.cluster.config import ConfigValueError
from renderfarm.cluster.config_file import ConfigError
from renderfarm.cluster.keys import User, add_user, load_users, remove_user, token_sha256

HASH = token_sha256("alice's token")


def keys_file(tmp_path, text: str):
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_add_user_returns_a_token_and_stores_only_its_hash(tmp_path):
    path = tmp_path / "secrets" / "keys.toml"
    token = add_user(path, "alice", role="admin", weight=3, max_concurrent_jobs=4, max_images_per_day=20000)
    other = add_user(path, "bob")
    assert token.startswith("rf_") and other.startswith("rf_") and token != other
    assert token not in path.read_text() and token_sha256(token) in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_users(path) == [
        User("alice", token_sha256(token), "admin", 3.0, max_concurrent_jobs=4, max_images_per_day=20000),
        User("bob", token_sha256(other)),
    ]


def test_add_user_keeps_the_files_comments_and_users(tmp_path):
    text = f'# the render team\n[[users]]\nname = "alice"  # lead\ntoken_sha256 = "{HASH}"'  # no final newline
    path = keys_file(tmp_path, text)
    token = add_user(path, "bob")
    assert path.read_text().startswith(text + "\n")
    assert [user.token_sha256 for user in load_users(path)] == [HASH, token_sha256(token)]


def test_a_taken_name_or_a_bad_value_is_refused_and_the_file_is_unchanged(tmp_path):
    path = keys_file(tmp_path, f'[[users]]\nname = "alice"\ntoken_sha256 = "{HASH}"\n')
    with pytest.raises(ConfigError, match="a user named 'alice' exists already"):
        add_user(path, "alice")
    with pytest.raises(ConfigError, match="keys.toml: role must be one of member, admin"):
        add_user(path, "bob", role="owner")
    assert path.read_text() == f'[[users]]\nname = "alice"\ntoken_sha256 = "{HASH}"\n'


def test_remove_user_removes_only_that_user(tmp_path):
    path = tmp_path / "keys.toml"
    add_user(path, "alice")
    bob = add_user(path, "bob", weight=2)
    remove_user(path, "alice")
    assert load_users(path) == [User("bob", token_sha256(bob), weight=2.0)]
    with pytest.raises(ConfigError, match="no user named 'carol'"):
        remove_user(path, "carol")


def entry(name: str = "a", token_hash: str = HASH, extra: str = "") -> str:
    return f'[[users]]\nname = "{name}"\ntoken_sha256 = "{token_hash}"\n{extra}\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (entry(extra='colour = "red"'), "unknown key users[0].colour"),
        (entry(extra='role = "root"'), "users[0].role must be one of member, admin"),
        ('[[users]]\nname = "a"', "missing required key users[0].token_sha256"),
        (entry(extra='weight = "3"'), "users[0].weight must be a number"),
        (entry(extra="max_images_per_day = 0"), "users[0].max_images_per_day must be at least 1"),
        (entry(token_hash=HASH.upper()), "users[0].token_sha256 must be 64 lowercase hex"),
        (entry() + entry(token_hash=token_sha256("other")), "users[1].name is used by an earlier user too"),
        (entry() + entry("b"), "users[1].token_sha256 is used by an earlier user too"),
        ('admins = ["a"]', "unknown key admins"),
    ],
)
def test_a_bad_keys_file_names_the_entry(tmp_path, text, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"keys.toml: {message}")):
        load_users(keys_file(tmp_path, text))


def test_a_missing_keys_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="keys file .*missing.toml"):
        load_users(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"name": "has space"}, "name"),
        ({"name": ""}, "name"),
        ({"name": "-leading-dash"}, "name"),
        ({"role": "owner"}, "role"),
        ({"token_sha256": "abc"}, "token_sha256"),
        ({"weight": 0.0}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"max_concurrent_jobs": 0}, "max_concurrent_jobs"),
        ({"max_images_per_day": -1}, "max_images_per_day"),
    ],
)
def test_a_user_refuses_bad_values_naming_the_key(fields, key):
    with pytest.raises(ConfigValueError) as refused:
        User(**{"name": "alice", "token_sha256": HASH} | fields)
    assert refused.value.key == key
