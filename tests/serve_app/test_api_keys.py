"""Where the router's keys come from, rotation through the key file, and what an empty source means."""

import logging

import pytest

from serve_app.api_keys import KeyRing, key_id, refuse_open_non_loopback
from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.specs import key_digest


def test_config_digests_and_the_environment_add_up():
    ring = KeyRing((key_digest("from-config"),), environ={"IMAGESERVE_API_KEYS": " a, b ,,"})
    assert ring.configured
    for key in ("from-config", "a", "b"):
        assert ring.check(key.encode()) == key_id(key_digest(key))
    assert ring.check(b"c") is None and ring.check(b"") is None


def test_the_key_file_is_re_read_when_it_changes_so_keys_rotate_without_a_redeploy(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# rotated weekly\nold-key\n")
    ring = KeyRing(keys_file=str(keys), reload_s=0, environ={})
    assert ring.check(b"old-key") and not ring.check(b"new-key")
    keys.write_text("new-key\n")
    assert ring.check(b"new-key") and not ring.check(b"old-key")


def test_a_key_file_that_goes_missing_keeps_the_keys_read_before(tmp_path, caplog):
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    ring = KeyRing(keys_file=str(keys), reload_s=0, environ={})
    keys.unlink()
    with caplog.at_level(logging.ERROR):
        assert ring.check(b"k")
    assert "cannot read the API key file" in caplog.text


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
    assert key_id(digest) == digest[:8] and "1234" not in key_id(digest)


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


def test_imageserve_run_refuses_before_starting_ray(monkeypatch, capsys):
    from serve_app import runner
    from serve_app.cli import main

    monkeypatch.delenv("IMAGESERVE_API_KEYS", raising=False)
    monkeypatch.setattr(runner, "run_foreground", lambda config: pytest.fail("Ray must not start"))
    assert main(["run", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve on 0.0.0.0" in capsys.readouterr().err
