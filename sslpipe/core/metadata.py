"""The metadata document of one image (seed 001, Table 4.1) and its validation.

Documents come from stores that other systems write, so they are validated one by one at the
edge: a bad document is reported with its id and the reason, never crashed on.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from sslpipe.core.filters import TaxonomyPath


class Annotation(BaseModel):
    """One annotator's taxonomy paths for an image (``labels_with_taxonomy[i]``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    annotator_id: str
    taxonomy: list[TaxonomyPath] = Field(default_factory=list)

    @field_validator("annotator_id", mode="before")
    @classmethod
    def _annotator_as_text(cls, value: object) -> str:
        # Label Studio user ids are integers; other tools use e-mails. Both identify a person.
        if isinstance(value, bool) or not isinstance(value, int | str) or str(value) == "":
            raise ValueError(f"annotator_id must be a non-empty string or integer, found {value!r}")
        return str(value)

    @field_validator("taxonomy")
    @classmethod
    def _paths_not_empty(cls, value: list[TaxonomyPath]) -> list[TaxonomyPath]:
        for path in value:
            if not path or any(not level for level in path):
                raise ValueError(f"taxonomy path {list(path)!r} is empty or has an empty level")
        return value


class ImageDocument(BaseModel):
    """The fields of a metadata document that the pipeline reads; others are kept untouched."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(min_length=1)
    file_hash: str | None = None
    # Strict: stores index only true JSON booleans for their filters (is_blurred, has_review), so
    # a 1 or "yes" that lax parsing would read as true is reported as invalid, not let through.
    is_blurred: StrictBool | None = None
    sortout: str | None = None
    sortout_testset: StrictBool | None = None
    has_review: StrictBool | None = None
    total_annotations: int | None = None
    labels_with_taxonomy: list[Annotation] = Field(default_factory=list)

    @field_validator("labels_with_taxonomy", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return [] if value is None else value

    @property
    def annotator_ids(self) -> set[str]:
        return {a.annotator_id for a in self.labels_with_taxonomy}


def validate_document(raw: Any) -> tuple[ImageDocument | None, str | None]:
    """Return ``(document, None)`` or ``(None, reason)`` for one raw metadata document.

    The reason is short and stable (``invalid:<field>``) so that skipped documents can be
    counted per reason in a step's stats.
    """
    if not isinstance(raw, dict):
        return None, "invalid:not_an_object"
    try:
        return ImageDocument.model_validate(raw), None
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "document"
        return None, f"invalid:{field}"


def describe_invalid(raw: Any) -> str:
    """A one-line human message of why ``raw`` is not a valid document (for logs)."""
    try:
        ImageDocument.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        doc_id = raw.get("id") if isinstance(raw, dict) else None
        return f"document {doc_id!r}: field '{loc}': {first['msg']}"
    return "valid"
