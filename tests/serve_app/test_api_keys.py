"""Where the router's keys come from, rotation through the key file, and what an empty source means."""

import logging

import pytest

from serve_app.api_keys import KeyRing, key_id, key_id_secret, refuse_open_non_loopback
from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.specs import key_digest

SECRET = b"0123456789abcdef0123456789abcdef"  # a key-id secret, as IMAGESERVE_KEY_ID_SECRET would give it


def test_config_digests_and_the_environment_add_up():
    ring = KeyRing((key_digest("from-config"),), environ={"IMAGESERVE_API_KEYS": " a, b ,,"}, id_secret=SECRET)
    assert ring.configured
    for key in ("from-config", "a", "b"):
        assert ring.check(key.encode()) == key_id(key_digest(key), SECRET)
    assert ring.check(b"c") is None and ring.check(b"") is None


def test_the_key_file_is_re_read_when_it_changes_so_keys_rotate_without_a_redeploy(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# rotated weekly\nold-key\n")
    ring = KeyRing(keys_file=str(keys), reload_s=0, environ={})
    assert ring.check(b"old-key") and not ring.check(b"new-key")
    keys.write_text("new-key\n")
    assert ring.check(b"new-key") and not ring.check(b"old-key")


def test_a_key_file_that_goes_missing_refuses_everything_until_it_is_back(tmp_path, caplog):
    """Fail closed: deleting the key file may be how its keys were revoked. Every key is refused meanwhile, the
    environment's too, and the log says so once per outage, not once per request."""
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    ring = KeyRing(keys_file=str(keys), reload_s=0, environ={"IMAGESERVE_API_KEYS": "from-env"})
    assert ring.check(b"k") and ring.check(b"from-env") and ring.unavailable() is None
    keys.unlink()
    with caplog.at_level(logging.WARNING):
        assert ring.check(b"k") is None and ring.check(b"from-env") is None
        assert "cannot be read (FileNotFoundError" in ring.unavailable()
        assert caplog.text.count("cannot read the API key file") == 1
        assert "every request is refused until it can be read again" in caplog.text
        keys.write_text("k\n")
        assert ring.check(b"k") and ring.check(b"from-env") and ring.unavailable() is None
    assert "can be read again (1 key)" in caplog.text


@pytest.mark.parametrize("breakage", ["a folder", "not text"])
def test_a_key_file_that_cannot_be_read_refuses_everything(tmp_path, breakage):
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    ring = KeyRing(keys_file=str(keys), reload_s=0, environ={})
    keys.unlink()
    if breakage == "a folder":  # IsADirectoryError (as root, chmod 000 would not stop a read)
        keys.mkdir()
    else:
        keys.write_bytes(b"k\n\xff\xfe")
    assert ring.check(b"k") is None and ring.unavailable()


def test_a_configured_source_with_no_key_refuses_everything_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        blank_env = KeyRing(environ={"IMAGESERVE_API_KEYS": " , "})
        empty_file = tmp_path / "keys"
        empty_file.write_text("\n# nothing yet\n")
        blank_file = KeyRing(keys_file=str(empty_file), environ={})
    for ring in (blank_env, blank_file):
        assert ring.configured and ring.check(b"anything") is None
    assert "holds no key" in caplog.text


def test_no_source_at_all_is_open_and_logged(caplog):
    with caplog.at_level(logging.WARNING):
        assert not KeyRing(environ={}).configured
    assert "every route is open" in caplog.text


def test_a_key_id_names_a_caller_without_showing_the_key():
    digest = key_digest("sk-live-1234")
    assert len(key_id(digest, SECRET)) == 8 and "1234" not in key_id(digest, SECRET)


def test_a_key_id_is_an_hmac_under_the_server_secret_so_a_leaked_id_cannot_test_guesses():
    """An id that was 8 hex digits of the unsalted sha256 let anyone holding it test guessed keys offline; under a
    secret, the same key has unrelated ids, and the id is not a prefix of the digest."""
    import hashlib
    import hmac

    digest = key_digest("sk-guessable")
    assert key_id(digest, SECRET) == hmac.new(SECRET, digest.encode(), hashlib.sha256).hexdigest()[:8]
    assert key_id(digest, SECRET) != digest[:8]
    assert key_id(digest, SECRET) != key_id(digest, b"another secret of 32 characters.")
    ring = KeyRing((digest,), environ={}, id_secret=SECRET)
    assert ring.check(b"sk-guessable") == key_id(digest, SECRET)


def test_the_key_id_secret_comes_from_the_environment_or_is_random_outside_a_cluster():
    configured = "f" * 32
    assert key_id_secret({"IMAGESERVE_KEY_ID_SECRET": f" {configured}\n"}) == configured.encode()
    with pytest.raises(ValueError, match="at least 32 characters"):
        key_id_secret({"IMAGESERVE_KEY_ID_SECRET": "short"})
    first, second = key_id_secret({}), key_id_secret({})  # no Ray here: one per process, never a fixed value
    assert len(first) == 32 and first != second


def test_every_router_replica_reads_the_secret_the_first_one_stored(monkeypatch):
    """Replicas starting together each offer a secret; the store keeps the first (no overwrite), and all read it."""
    import ray.experimental.internal_kv as internal_kv

    from serve_app.api_keys import cluster_key_id_secret

    store = {}

    def put(key, value, overwrite=False, *, namespace=None):
        if overwrite or (namespace, key) not in store:
            store[(namespace, key)] = value

    monkeypatch.setattr(internal_kv, "_internal_kv_put", put)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, *, namespace=None: store[(namespace, key)])
    secrets_read = {cluster_key_id_secret() for _ in range(3)}
    assert len(secrets_read) == 1 and len(next(iter(secrets_read))) == 64  # 32 random bytes, as hex


def test_config_digests_must_be_sha256_hex():
    with pytest.raises(ConfigError, match=r"entries \[1\] are not sha256 hex digests"):
        parse_config({"serving": {"api_key_sha256": [key_digest("a"), "sk-pasted-the-key-itself"]}})


def test_a_mistyped_key_is_not_echoed_in_the_config_error():
    for serving in ({"api_keys": "sk-live-not-a-list"}, {"api_keys": [12345678]}):
        with pytest.raises(ConfigError) as err:
            parse_config({"serving": serving})
        assert "sk-live" not in str(err.value) and "12345678" not in str(err.value)


def test_no_keys_on_a_reachable_address_refuses_to_start_unless_public():
    open_ring = KeyRing(environ={})
    for host in ("127.0.0.1", "::1", "localhost"):
        refuse_open_non_loopback(open_ring, host, public=False)
    with pytest.raises(PermissionError, match="refusing to serve on 0.0.0.0 with no API keys"):
        refuse_open_non_loopback(open_ring, "0.0.0.0", public=False)
    refuse_open_non_loopback(open_ring, "0.0.0.0", public=True)
    refuse_open_non_loopback(KeyRing((key_digest("k"),), environ={}), "0.0.0.0", public=False)
    refuse_open_non_loopback(KeyRing(keys_file="/nonexistent/keys", environ={}), "0.0.0.0", public=False)


def test_imageserve_run_refuses_before_starting_ray(monkeypatch, capsys):
    from serve_app import runner
    from serve_app.cli import main

    monkeypatch.delenv("IMAGESERVE_API_KEYS", raising=False)
    monkeypatch.setattr(runner, "run_foreground", lambda config: pytest.fail("Ray must not start"))
    assert main(["run", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve on 0.0.0.0" in capsys.readouterr().err
