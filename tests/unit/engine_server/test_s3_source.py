"""The pure parts of S3 access: settings read from the environment (a cache Secret's keys) and the
mapping of botocore's failures to a status reason and a message that never carries the keys."""

from __future__ import annotations

import pytest

botocore_exceptions = pytest.importorskip("botocore.exceptions")

from kiln_engine.build.source import S3Settings, SourceError, parse_uri, s3_failure, s3_settings  # noqa: E402

LOC = parse_uri("s3://kiln-cache/engines/tiny")


def test_settings_default_to_aws_with_automatic_addressing() -> None:
    assert s3_settings({}) == S3Settings(endpoint=None, region=None, addressing_style="auto")


def test_settings_read_the_endpoint_region_and_style_an_s3_compatible_server_needs() -> None:
    env = {"AWS_ENDPOINT_URL_S3": "http://minio.storage:9000", "AWS_REGION": "eu-central-1",
           "KILN_S3_ADDRESSING_STYLE": "Path"}  # fmt: skip
    assert s3_settings(env) == S3Settings("http://minio.storage:9000", "eu-central-1", "path")
    # the generic names are the fallback, the S3-specific ones win
    fallback = {"AWS_ENDPOINT_URL": "https://s3.example", "AWS_DEFAULT_REGION": "us-west-2"}
    assert s3_settings(fallback) == S3Settings("https://s3.example", "us-west-2", "auto")
    assert s3_settings({**fallback, **env}).endpoint == "http://minio.storage:9000"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"KILN_S3_ADDRESSING_STYLE": "dns"}, "KILN_S3_ADDRESSING_STYLE"),
        ({"AWS_ENDPOINT_URL_S3": "minio:9000"}, "AWS_ENDPOINT_URL_S3"),
    ],
)
def test_malformed_settings_are_refused_before_any_request(env: dict[str, str], names: str) -> None:
    with pytest.raises(SourceError, match=names) as raised:
        s3_settings(env)
    assert raised.value.reason == "InvalidOptions"


def client_error(code: str, message: str = "") -> Exception:
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": 400}}
    return botocore_exceptions.ClientError(response, "GetObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (botocore_exceptions.NoCredentialsError(), "MissingCredentials"),
        (botocore_exceptions.PartialCredentialsError(provider="env", cred_var="x"), "MissingCredentials"),
        (botocore_exceptions.EndpointConnectionError(endpoint_url="http://x"), "EndpointUnreachable"),
        (client_error("NoSuchBucket"), "BucketNotFound"),
        (client_error("InvalidAccessKeyId"), "Unauthorized"),
        (client_error("SignatureDoesNotMatch"), "Unauthorized"),
        (client_error("AccessDenied"), "Unauthorized"),
        (client_error("AuthorizationHeaderMalformed", "the region is wrong; expecting 'eu-central-1'"),
         "WrongRegion"),
        (client_error("SlowDown"), "FetchFailed"),
    ],
)  # fmt: skip
def test_failures_map_to_a_reason_naming_the_location(error: Exception, reason: str) -> None:
    failure = s3_failure(LOC, error)
    assert failure.reason == reason and "s3://kiln-cache/engines/tiny" in str(failure)


def test_a_wrong_region_names_the_region_the_server_expects() -> None:
    failure = s3_failure(LOC, client_error("AuthorizationHeaderMalformed", "expecting 'eu-central-1'"))
    assert "eu-central-1" in str(failure)


def test_the_message_is_built_from_the_code_not_the_servers_text() -> None:
    """A server may echo request details in its message; only region hints are passed on."""
    failure = s3_failure(LOC, client_error("SignatureDoesNotMatch", "echo: secret=hunter2"))
    assert "hunter2" not in str(failure) and "SignatureDoesNotMatch" in str(failure)
