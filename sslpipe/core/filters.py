"""The image filter: which metadata documents a pipeline selects.

One validated object serves every backend: the SQLite store compiles it to indexed SQL, the
Cosmos DB store to Cosmos SQL, and both pass user-supplied values only as query parameters.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TaxonomyPath = tuple[str, ...]


def parse_taxonomy_path(value: str | list[str] | tuple[str, ...]) -> TaxonomyPath:
    """Accept ``["A", "B"]`` or ``"A/B"`` and return ``("A", "B")``.

    Raises:
        ValueError: if the path is empty or has an empty level.
    """
    parts = tuple(value.split("/")) if isinstance(value, str) else tuple(value)
    if not parts or any(not isinstance(p, str) or not p.strip() for p in parts):
        raise ValueError(
            f"taxonomy path {value!r} is empty or has an empty level; "
            "expected e.g. ['Badezimmersysteme', 'Geberit AquaClean'] "
            "or 'Badezimmersysteme/Geberit AquaClean'"
        )
    return parts


class ImageFilter(BaseModel):
    """Which images a step selects from the metadata store.

    Label filters match taxonomy path *prefixes*: ``include_labels=[["Badezimmersysteme"]]``
    selects every image that has at least one annotated path starting with
    ``Badezimmersysteme``. An image with any path matching ``exclude_labels`` is dropped,
    whatever it also matches in ``include_labels`` (exclude wins).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    exclude_blurred: bool = Field(True, description="drop images with is_blurred = true")
    sortout: list[str] | None = Field(
        default_factory=lambda: ["Keep"],
        description="allowed values of the sortout field; null allows any",
    )
    labelled: Literal["any", "labelled", "unlabelled"] = Field(
        "any", description="select only images with (or without) annotations"
    )
    include_labels: list[TaxonomyPath] = Field(
        default_factory=list, description="taxonomy path prefixes of which one must match"
    )
    exclude_labels: list[TaxonomyPath] = Field(
        default_factory=list, description="taxonomy path prefixes of which none may match"
    )
    min_annotators: int = Field(0, ge=0, description="minimum number of distinct annotators")
    require_review: bool = Field(False, description="select only images with has_review = true")
    limit: int | None = Field(None, ge=1, description="at most this many images (by id order)")

    @field_validator("include_labels", "exclude_labels", mode="before")
    @classmethod
    def _parse_paths(cls, value: object) -> list[TaxonomyPath]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a list of taxonomy paths, found {type(value).__name__}")
        return [parse_taxonomy_path(v) for v in value]

    @property
    def needs_labels(self) -> bool:
        return bool(self.include_labels) or self.labelled == "labelled" or self.min_annotators > 0


def filter_argument(image_filter: ImageFilter) -> str:
    """The filter as a one-line JSON command argument that is safe inside single quotes.

    Azure ML pastes string inputs into the component's command line, where the filter sits in
    single quotes; JSON's ``\\u0027`` escape keeps a quote in a label from ending them.
    """
    return image_filter.model_dump_json().replace("'", "\\u0027")
