"""compile_filter: metadata filters to Cosmos SQL, read and tested without a client or a server.

The store's own tests (test_cosmos.py) run these queries against the Cosmos-compatible server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sslpipe.core.filters import ImageFilter
from sslpipe.stores.cosmos_query import compile_filter
from sslpipe.stores.cosmos_udf import UDF_ID
from tests.blocked_imports import without_packages

REPO = Path(__file__).resolve().parents[2]

TRICKY = [
    "it's",
    "'; DROP TABLE c; --",
    '" OR 1=1 --',
    "SELECT * FROM c",
    "udf.filterDocumentsByLabels",
    "@include_labels",
    "Bäder & Wannen",
    "日本語",
    "emoji 🛁",
    "back\\slash",
]


def paren_depth(text: str) -> int:
    """The deepest nesting of parentheses in ``text``."""
    depth = deepest = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    return deepest


# --- compile_filter ----------------------------------------------------------------------------


def _tricky_filter(labels: list[str], sortout: list[str], number: int) -> ImageFilter:
    return ImageFilter(
        include_labels=[[label, "child"] for label in labels[:5]] + [[labels[5]]],
        exclude_labels=[[label] for label in labels[5:]],
        sortout=sortout,
        min_annotators=number,
        limit=number + 10,
    )


@pytest.mark.parametrize("use_udf", [False, True], ids=["sql", "udf"])
def test_compile_filter_keeps_every_value_out_of_the_query_text(use_udf: bool) -> None:
    tricky = _tricky_filter(TRICKY, ["O'Neil", "Keep", "SELECT"], 7)
    query, params = compile_filter(tricky, use_udf=use_udf)
    # The text depends on the filter's shape only: plain values give the very same text.
    plain = _tricky_filter([f"x{i}" for i in range(len(TRICKY))], ["a", "b", "c"], 2)
    assert compile_filter(plain, use_udf=use_udf)[0] == query
    assert "'" not in query and '"' not in query and "17" not in query and "7" not in query
    names = {p["name"] for p in params}
    assert len(names) == len(params)  # no parameter given twice
    assert names == set(re.findall(r"@\w+", query))  # every placeholder has its value
    values = {p["name"]: p["value"] for p in params}
    assert values["@sortout"] == ["O'Neil", "Keep", "SELECT"]
    assert values["@min_annotators"] == 7
    assert values["@include_labels"][0] == [TRICKY[0], "child"]
    assert [TRICKY[-1]] in values["@exclude_labels"]


def test_compile_filter_of_the_default_filter() -> None:
    query, params = compile_filter(ImageFilter())
    assert query == (
        "SELECT VALUE c.id FROM c WHERE NOT (IS_BOOL(c.is_blurred) AND c.is_blurred)"
        " AND ARRAY_CONTAINS(@sortout, c.sortout)"
    )
    assert params == [{"name": "@sortout", "value": ["Keep"]}]


def test_a_filter_without_conditions_selects_every_id() -> None:
    query, params = compile_filter(ImageFilter(exclude_blurred=False, sortout=None))
    assert (query, params) == ("SELECT VALUE c.id FROM c", [])


def test_prefixes_of_each_length_get_one_heads_array() -> None:
    query, params = compile_filter(
        ImageFilter(include_labels=[["A"], ["B", "C"]], exclude_labels=[["D", "E"], ["F"]])
    )
    values = {p["name"]: p["value"] for p in params}
    assert values["@levels_0"] == 1 and values["@levels_1"] == 2 and "@levels_2" not in values
    assert "ARRAY_CONCAT(heads_0, heads_1)" in query
    assert values["@include_labels"] == [["A"], ["B", "C"]]
    assert values["@exclude_labels"] == [["D", "E"], ["F"]]


def test_the_udf_mode_passes_the_label_lists_to_the_udf() -> None:
    query, params = compile_filter(
        ImageFilter(include_labels=[["A"]], exclude_labels=[["B"]]), use_udf=True
    )
    call = f"udf.{UDF_ID}(c.id, c.labels_with_taxonomy, @include_labels, @exclude_labels)"
    assert f"ARRAY_LENGTH({call}) > 0" in query
    assert "heads" not in query
    only_exclude, params = compile_filter(ImageFilter(exclude_labels=[["B"]]), use_udf=True)
    assert f"ARRAY_LENGTH(udf.{UDF_ID}(c.id, c.labels_with_taxonomy, @exclude_labels, "
    assert "@no_labels)) = 0" in only_exclude
    assert {p["name"]: p["value"] for p in params}["@no_labels"] == []


def test_the_documents_query_has_the_same_filter_as_the_ids_query() -> None:
    image_filter = ImageFilter(include_labels=[["A"]], min_annotators=2)
    ids_query, params = compile_filter(image_filter)
    documents_query, same_params = compile_filter(image_filter, documents=True)
    assert documents_query.startswith("SELECT VALUE c FROM c ")
    assert documents_query.removeprefix("SELECT VALUE c ") == ids_query.removeprefix(
        "SELECT VALUE c.id "
    )
    assert same_params == params


@pytest.mark.parametrize("use_udf", [False, True], ids=["sql", "udf"])
def test_the_query_stays_shallow_for_the_servers_parser(use_udf: bool) -> None:
    """cosmosdb-server's parser is exponential in nesting (depth 6 takes seconds, 10 hangs)."""
    everything = ImageFilter(
        include_labels=[["A"], ["A", "B"], ["A", "B", "C"]],
        exclude_labels=[["X", "Y", "Z", "W"]],
        labelled="labelled",
        min_annotators=3,
        require_review=True,
    )
    query, _ = compile_filter(everything, use_udf=use_udf)
    assert paren_depth(query) <= 3


# A machine without the Azure SDKs: `import azure...` fails.
WITHOUT_AZURE = (
    without_packages("azure")
    + """
import json, sys

from sslpipe.core.filters import ImageFilter
from sslpipe.stores.cosmos_query import compile_filter

query, params = compile_filter(ImageFilter(include_labels=[["A"]], min_annotators=2))
print(json.dumps({
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] == "azure"),
    "query": query,
    "params": params,
}))
"""
)


def test_the_compiler_imports_and_runs_without_the_azure_sdks() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_AZURE],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["loaded"] == []
    expected_query, expected_params = compile_filter(
        ImageFilter(include_labels=[["A"]], min_annotators=2)
    )
    assert (result["query"], result["params"]) == (expected_query, expected_params)
