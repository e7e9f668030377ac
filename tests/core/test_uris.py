"""Store URIs are logged and recorded without credentials."""

from __future__ import annotations

import pytest

from sslpipe.core.uris import redact_uri


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:////tmp/work/metadata.db",
        "file:///tmp/work/blobs/images",
        "https://acct.blob.core.windows.net/images",
        "cosmos://acct.documents.azure.com:443/catalog",
    ],
)
def test_uris_without_credentials_are_unchanged(uri: str) -> None:
    assert redact_uri(uri) == uri


def test_sas_signature_and_its_parameters_are_masked_but_others_kept() -> None:
    uri = (
        "https://acct.blob.core.windows.net/images?restype=container&sv=2024-01-01&sp=r&sig=ab%2Bcd"
    )
    assert redact_uri(uri) == (
        "https://acct.blob.core.windows.net/images?restype=container&sv=***&sp=***&sig=***"
    )


@pytest.mark.parametrize("name", ["key", "KEY", "token", "secret", "password", "Sig"])
def test_secret_looking_query_parameters_are_masked_in_any_case(name: str) -> None:
    redacted = redact_uri(f"cosmos://acct.documents.azure.com/db?{name}=hunter2&db=catalog")
    assert "hunter2" not in redacted
    assert redacted.endswith(f"?{name}=***&db=catalog")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "cosmos://user:hunter2@acct.documents.azure.com:443/db",
            "cosmos://acct.documents.azure.com:443/db",
        ),
        ("https://token@example.com/x", "https://example.com/x"),
        ("https://u:p@[::1]:8080/x", "https://[::1]:8080/x"),
    ],
)
def test_user_info_is_dropped_and_the_port_kept(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_a_malformed_port_does_not_break_redaction() -> None:
    redacted = redact_uri("https://user:hunter2@host:notaport/x?key=k")
    assert "hunter2" not in redacted and "key=***" in redacted
