"""Triton's logging extension over both transports (tritonclient's get/update_log_settings): settings are read,
changed and checked; a change reaches every worker of --workers 2 and takes effect in the log; admin-only where
an admin token is set."""
from __future__ import annotations

import shutil
import time

import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.subprocess
KEYS = {"log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format"}


def test_settings_are_read_and_changed_over_both_transports_and_bad_ones_are_named(server):
    h = thttp.InferenceServerClient(server.http)
    g = tgrpc.InferenceServerClient(server.grpc)
    try:
        now = h.get_log_settings()
        assert set(now) == KEYS and now["log_info"] is True and now["log_format"] == "default"
        assert {"logging", "trace", "parameters"} <= set(h.get_server_metadata()["extensions"])
        got = h.update_log_settings({"log_verbose_level": 1, "log_format": "ISO8601"})
        assert got["log_verbose_level"] == 1 and got["log_format"] == "ISO8601"
        settings = g.get_log_settings(as_json=True)["settings"]
        assert settings["log_verbose_level"] == {"uint32_param": 1}
        assert settings["log_format"] == {"string_param": "ISO8601"}
        g.update_log_settings({"log_verbose_level": 0, "log_format": "default"})
        assert h.get_log_settings()["log_verbose_level"] == 0
        for bad, words in (({"log_colour": True}, "unknown log setting 'log_colour'"),
                           ({"log_info": "yes"}, "'log_info' must be a bool"),
                           ({"log_format": "json"}, "must be one of ['default', 'ISO8601']"),
                           ({"log_file": "/tmp/x.log"}, "stderr only")):
            with pytest.raises(InferenceServerException, match=words.replace("[", r"\[").replace("]", r"\]")) as e:
                h.update_log_settings(bad)
            assert e.value.status() == "400"
        with pytest.raises(InferenceServerException, match="unknown log setting") as e:
            g.update_log_settings({"log_colour": True})
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        h.close()
        g.close()


def test_a_change_reaches_every_worker_and_takes_effect(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo, "--workers", "2", "--repository-api", "--admin-token", "adm") as srv:
        admin = {"Authorization": "Bearer adm"}
        h = thttp.InferenceServerClient(srv.http)
        with pytest.raises(InferenceServerException) as e:
            h.get_log_settings()                                  # admin-only where an admin token is set
        assert e.value.status() == "401"
        h.close()
        h = thttp.InferenceServerClient(srv.http)
        h.update_log_settings({"log_info": False}, headers=admin)
        for _ in range(6):                                        # new connections land on both workers
            c = thttp.InferenceServerClient(srv.http)
            assert c.get_log_settings(headers=admin)["log_info"] is False
            c.close()
        before = srv.log().count("loaded model.onnx")
        h.load_model("digits", headers=admin)                       # every worker reloads; none logs it at INFO
        time.sleep(0.5)
        assert srv.log().count("loaded model.onnx") == before
        h.update_log_settings({"log_info": True}, headers=admin)
        h.load_model("digits", headers=admin)
        deadline = time.time() + 10
        while srv.log().count("loaded model.onnx") < before + 2 and time.time() < deadline:
            time.sleep(0.2)
        assert srv.log().count("loaded model.onnx") >= before + 2    # both workers log again
        h.close()


def test_log_and_trace_settings_take_the_auth_token_where_no_admin_token_is_set(repository, tmp_path):
    """Fail closed: with --auth-token and no --admin-token, nobody without the token reads or silences the log
    (``log_error: false``) or changes tracing, over either transport."""
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo, "--auth-token", "tok") as srv:
        auth = {"authorization": "Bearer tok"}          # grpc metadata keys are lower case
        h = thttp.InferenceServerClient(srv.http)
        g = tgrpc.InferenceServerClient(srv.grpc)
        try:
            for call in (h.get_log_settings, lambda: h.update_log_settings({"log_error": False}),
                         h.get_trace_settings, lambda: h.update_trace_settings(settings={"trace_rate": "1"})):
                with pytest.raises(InferenceServerException) as e:
                    call()
                assert e.value.status() == "401"
            for call in (g.get_log_settings, lambda: g.update_log_settings({"log_error": False}),
                         g.get_trace_settings):
                with pytest.raises(InferenceServerException) as e:
                    call()
                assert e.value.status() == "StatusCode.UNAUTHENTICATED"
            assert h.get_log_settings(headers=auth)["log_error"] is True     # nothing was changed
            assert g.get_log_settings(headers=auth, as_json=True)["settings"]["log_error"] == {"bool_param": True}
        finally:
            h.close()
            g.close()
