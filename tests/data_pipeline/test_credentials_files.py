"""without_secrets: options another process reads from a file keep their endpoints and lose their credentials."""

from data_pipeline.credentials import without_secrets


def test_credentials_are_left_out_and_the_rest_kept():
    options = {"key": "AKIA123", "secret": "s3cr3t", "anon": False, "token": None,
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1",
                                 "aws_session_token": "tok"},
               "headers": {"Authorization": "Bearer abc"}, "endpoint": "https://user:pw@host/x"}
    kept = without_secrets(options)
    assert kept["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}
    assert kept["anon"] is False and kept["token"] is None  # no secret in them
    for gone in ("key", "secret", "endpoint"):
        assert gone not in kept
    assert kept["headers"] == {}
    assert "s3cr3t" not in repr(kept) and "AKIA" not in repr(kept) and "pw@" not in repr(kept)
    assert options["key"] == "AKIA123"  # the caller's options are untouched
