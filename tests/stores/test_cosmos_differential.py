"""Differential test: random documents and random filters select the very same documents, in
the same order, from SQLite and from the Cosmos DB store on the local Cosmos-compatible server,
with label filters in plain SQL and through the UDF.

Documents mix well-formed fields with missing and mistyped ones; label text mixes quotes, SQL
keywords and Unicode, and ids go beyond the Basic Multilingual Plane. Not generated, as known
and documented differences (sslpipe/stores/cosmos.py): float annotator ids (``701.0``) and
annotator ids that are lists or objects.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.cosmos import ContainerProxy, CosmosClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sslpipe.core.filters import ImageFilter
from sslpipe.stores.cosmos import CosmosMetadataStore, install_udf
from sslpipe.stores.sqlite import SQLiteMetadataStore

# The local server's certificate is self-signed; unverified TLS to loopback is intended.
pytestmark = pytest.mark.filterwarnings("ignore:Unverified HTTPS request is being made to host")

LEVELS = [
    "A",
    "AB",
    "A ",
    "a",
    "Ä",
    "it's",
    '" OR 1=1 --',
    "SELECT VALUE c FROM c",
    "DROP TABLE c",
    "日本",
    "🛁",
    "%",
    "_",
    "back\\slash",
]
ID_PREFIXES = ["img", "Img", "ïmg", "Ａ", "🛁", "b"]
ANNOTATORS = [701, "701", 702, "anna@example.com", None, True, "True", "None", 0]
FLAGS = [False, False, False, True, True, None, "yes", 1, 0]

COMMON = ["A", "AB", "it's", "日本"]  # drawn more often, so that filters often match

levels = st.one_of(st.sampled_from(COMMON), st.sampled_from(COMMON), st.sampled_from(LEVELS))
paths = st.lists(levels, min_size=1, max_size=3)
prefixes = st.lists(levels, min_size=1, max_size=2)
mistyped_paths = st.sampled_from([[], [1], ["A", None], ["A", ["B"]], "A/B", 5, None, {"A": 1}])
taxonomies: st.SearchStrategy[Any] = st.one_of(
    st.lists(st.one_of(paths, paths, paths, mistyped_paths), max_size=3),
    st.sampled_from([5, "A/B", None, {}]),
)
annotation_objects = st.fixed_dictionaries(
    {}, optional={"annotator_id": st.sampled_from(ANNOTATORS), "taxonomy": taxonomies}
)
any_annotations = st.one_of(
    annotation_objects, annotation_objects, annotation_objects, st.sampled_from([5, None, "x", []])
)
labels = st.one_of(
    st.lists(any_annotations, max_size=4),
    st.lists(any_annotations, max_size=4),
    st.sampled_from(["Even/2", 5, None, {"annotator_id": 1, "taxonomy": [["A"]]}]),
)
bodies = st.fixed_dictionaries(
    {"id_prefix": st.sampled_from(ID_PREFIXES)},
    optional={
        "is_blurred": st.sampled_from(FLAGS),
        "has_review": st.sampled_from(FLAGS),
        "sortout": st.sampled_from(["Keep", "Keep", "Keep", "Keep", "Sort Out", "keep", None, 3]),
        "labels_with_taxonomy": labels,
    },
)
filters = st.builds(
    ImageFilter,
    exclude_blurred=st.booleans(),
    sortout=st.sampled_from([None, None, ["Keep"], ["Keep", "Sort Out"], ["keep", "3"], []]),
    labelled=st.sampled_from(["any", "any", "labelled", "unlabelled"]),
    include_labels=st.lists(prefixes, max_size=2),
    exclude_labels=st.lists(prefixes, max_size=2),
    min_annotators=st.sampled_from([0, 0, 0, 1, 2, 3]),
    require_review=st.sampled_from([False, False, False, True]),
    limit=st.one_of(st.none(), st.none(), st.integers(min_value=1, max_value=8)),
)


def _documents(drawn: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bodies with unique ids ``<prefix>-<index>``."""
    documents = []
    for index, body in enumerate(drawn):
        fields = {k: v for k, v in body.items() if k != "id_prefix"}
        documents.append({"id": f"{body['id_prefix']}-{index:03d}", **fields})
    return documents


class CosmosPair:
    """One container on the server, opened in SQL mode and in UDF mode."""

    def __init__(self, server: dict[str, str]) -> None:
        self.database = f"test-differential-{uuid.uuid4().hex[:8]}"
        name = "documents"
        endpoint, key = server["endpoint"], server["key"]
        self.sql = CosmosMetadataStore(endpoint, self.database, name, credential=key)
        self.udf = CosmosMetadataStore(endpoint, self.database, name, credential=key, use_udf=True)
        assert install_udf(self.udf) == "created"
        self._client = CosmosClient(endpoint, key, connection_verify=False)
        self.raw: ContainerProxy = self._client.get_database_client(
            self.database
        ).get_container_client(name)

    def empty(self) -> None:
        """Delete every document (between examples)."""
        query = "SELECT VALUE c.id FROM c"
        for doc_id in list(self.raw.query_items(query, enable_cross_partition_query=True)):
            self.raw.delete_item(str(doc_id), partition_key=str(doc_id))

    def close(self) -> None:
        self.sql.close()
        self.udf.close()
        self._client.delete_database(self.database)
        self._client.close()


@pytest.fixture(scope="module")
def cosmos_pair(cosmos_server: dict[str, str]) -> Iterator[CosmosPair]:
    pair = CosmosPair(cosmos_server)
    yield pair
    pair.close()


@pytest.mark.servers
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    drawn=st.lists(bodies, min_size=10, max_size=30),
    image_filters=st.lists(filters, min_size=1, max_size=6),
)
def test_sqlite_and_cosmos_select_the_same_documents(
    cosmos_pair: CosmosPair, drawn: list[dict[str, Any]], image_filters: list[ImageFilter]
) -> None:
    documents = _documents(drawn)
    cosmos_pair.empty()
    assert cosmos_pair.sql.upsert(documents).created == len(documents)
    with (
        tempfile.TemporaryDirectory() as folder,
        SQLiteMetadataStore(Path(folder) / "reference.db") as reference,
    ):
        reference.upsert(documents)
        for image_filter in image_filters:
            expected = list(reference.select(image_filter))
            assert list(cosmos_pair.sql.select(image_filter)) == expected, image_filter
            assert list(cosmos_pair.udf.select(image_filter)) == expected, image_filter
