"""Metadata filters compiled to Cosmos SQL, without a client: :func:`compile_filter`.

Values travel only as query parameters, with the SQLite store's semantics and its leniency
about mistyped fields:

- a taxonomy path (a non-empty list of strings in an object of ``labels_with_taxonomy``)
  matches a prefix when its first ``len(prefix)`` levels equal it; exclude wins. Each needed
  prefix length n gives every path's "head" ``ARRAY_SLICE(p, 0, n)``, so a prefix list is one
  ``ARRAY_CONTAINS(@prefixes, head)``;
- ``n_annotators`` is the number of distinct annotator ids compared by their text as Python's
  ``str`` writes them (``701`` and ``"701"`` are one annotator; missing and null are one);
- with ``use_udf`` the label part calls the seed's UDF ``filterDocumentsByLabels``
  (:mod:`sslpipe.stores.cosmos_udf`); the other conditions stay SQL.

The Cosmos-compatible test server (npm ``@vercel/cosmosdb-server`` 1.0.1, whose SQL engine is
``@zeit/cosmosdb-query`` 0.7.2) shaped the query; everything used is standard Cosmos SQL:

  function call costs about 6x; depth 6 takes over 10 s and depth 10 hangs the (single-threaded)
  server. Hence the derived arrays in JOINs (``JOIN (SELECT VALUE ARRAY(...)) AS paths``, one
  row per document) and a WHERE clause that tests them shallowly: the query stays at paren
  depth 3 (a test guards it) and parses in under a second;
- ``x IN expr`` over a value that is not an array (a string, a number, an object) crashes the
  whole query, and ``AND`` evaluates both sides, so iteration is only over arrays built by
  ``IS_ARRAY(v) ? v : []`` or filtered with ``IS_ARRAY``;
- no ``DISTINCT``, no ``GROUP BY``, no ``OFFSET ... LIMIT``: distinct annotators are counted as
  the sum of 1 / multiplicity (compared with ``> n - 0.5``), ``limit`` is applied client-side;
- ``ORDER BY`` compares strings by UTF-16 code units (unlike SQLite beyond the Basic
  Multilingual Plane): ids are ordered client-side (:func:`sslpipe.stores.cosmos.in_id_order`);
- it ignores the key (any key is accepted), and numbers are JavaScript numbers: an annotator id
  ``701.0`` reads back as ``701`` (one annotator with ``701``, unlike SQLite's "701.0");
  annotator ids that are lists or objects compare by their JSON text (SQLite: Python's repr);
- it closes the connection after every response, so unverified connections share one TLS

Not run against Azure here: correlated JOIN subqueries and ``SUM`` over them are standard
Cosmos SQL, but their request-unit cost on large containers is unmeasured.
"""

from __future__ import annotations

from typing import Any

from sslpipe.core.filters import ImageFilter, TaxonomyPath
from sslpipe.stores.cosmos_udf import UDF_ID

_LABELS = "c.labels_with_taxonomy"

# Derived arrays, one JOIN each. Every JOIN yields exactly one (always defined) value per
# document, so it adds no rows; the WHERE clause then tests shallow expressions only.
_JOIN_LABELS = f"JOIN (SELECT VALUE IS_ARRAY({_LABELS}) ? {_LABELS} : []) AS labels"
# Annotator ids as Python's str() writes them: missing and null are "None", true is "True".
_JOIN_ANNOTATORS = (
    "JOIN (SELECT VALUE ARRAY(SELECT VALUE IS_NULL(a.annotator_id) ? @annotator_none"
    " : a.annotator_id = true ? @annotator_true : a.annotator_id = false ? @annotator_false"
    " : ToString(a.annotator_id) ?? @annotator_none FROM a IN labels WHERE IS_OBJECT(a)))"
    " AS annotators"
)
_JOINS_PATHS = (
    "JOIN (SELECT VALUE ARRAY(SELECT VALUE a.taxonomy FROM a IN labels"
    " WHERE IS_OBJECT(a) AND IS_ARRAY(a.taxonomy))) AS taxonomies",
    "JOIN (SELECT VALUE ARRAY(SELECT VALUE p FROM t IN taxonomies JOIN p IN t"
    " WHERE IS_ARRAY(p))) AS candidates",
    # Candidate paths with a level that is not text are no paths (as in SQLite).
    "JOIN (SELECT VALUE ARRAY(SELECT VALUE p FROM p IN candidates JOIN s IN p"
    " WHERE NOT IS_STRING(s))) AS mixed",
    "JOIN (SELECT VALUE ARRAY(SELECT VALUE p FROM p IN candidates"
    " WHERE NOT ARRAY_CONTAINS(mixed, p))) AS paths",
)
# sum over annotators of 1 / (number of annotators with the same id) = distinct ids.
_N_ANNOTATORS = (
    "(SELECT VALUE SUM(1.0 / m) FROM k IN annotators"
    " JOIN (SELECT VALUE COUNT(1) FROM j IN annotators WHERE j = k) AS m)"
)


class _Parameters:
    """Named query parameters; values never enter the query text."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, value: Any) -> str:
        """Register ``value`` under ``@name`` and return the placeholder."""
        placeholder = f"@{name}"
        self.items.append({"name": placeholder, "value": value})
        return placeholder


def _annotator_joins(params: _Parameters) -> list[str]:
    """JOINs defining ``annotators``: one id text per annotation object."""
    params.add("annotator_none", "None")
    params.add("annotator_true", "True")
    params.add("annotator_false", "False")
    return [_JOIN_ANNOTATORS]


def _heads_joins(prefixes: list[TaxonomyPath], params: _Parameters) -> list[str]:
    """JOINs defining ``heads``: the first n levels of every path, for each prefix length n.

    A path starts with prefix q exactly when its head of length len(q) equals q, so a
    prefix filter is one ARRAY_CONTAINS over ``heads``.
    """
    joins = list(_JOINS_PATHS)
    lengths = sorted({len(prefix) for prefix in prefixes})
    for index, length in enumerate(lengths):
        levels = params.add(f"levels_{index}", length)
        joins.append(
            f"JOIN (SELECT VALUE ARRAY(SELECT VALUE ARRAY_SLICE(p, 0, {levels}) FROM p IN paths))"
            f" AS heads_{index}"
        )
    parts = ", ".join(f"heads_{index}" for index in range(len(lengths)))
    joins.append(
        f"JOIN (SELECT VALUE {f'ARRAY_CONCAT({parts})' if len(lengths) > 1 else parts}) AS heads"
    )
    return joins


def _head_test(name: str, prefixes: list[TaxonomyPath], params: _Parameters) -> str:
    values = params.add(name, [list(prefix) for prefix in prefixes])
    return f"EXISTS(SELECT VALUE 1 FROM h IN heads WHERE ARRAY_CONTAINS({values}, h))"


def _label_sql(image_filter: ImageFilter, params: _Parameters) -> tuple[list[str], list[str]]:
    """JOINs and conditions for the label prefixes in plain SQL."""
    include, exclude = image_filter.include_labels, image_filter.exclude_labels
    if not include and not exclude:
        return [], []
    joins = _heads_joins([*include, *exclude], params)
    where = []
    if include:
        where.append(_head_test("include_labels", include, params))
    if exclude:
        where.append(f"NOT {_head_test('exclude_labels', exclude, params)}")
    return joins, where


def _label_udf(image_filter: ImageFilter, params: _Parameters) -> list[str]:
    """The label conditions through the UDF: it returns the included paths, [] if excluded."""
    include = [list(p) for p in image_filter.include_labels]
    exclude = [list(p) for p in image_filter.exclude_labels]
    if include:
        wanted, unwanted = (
            params.add("include_labels", include),
            params.add("exclude_labels", exclude),
        )
        return [f"ARRAY_LENGTH(udf.{UDF_ID}(c.id, {_LABELS}, {wanted}, {unwanted})) > 0"]
    if exclude:
        # The paths that match an exclude prefix: the UDF called with them as includes.
        wanted, unwanted = params.add("exclude_labels", exclude), params.add("no_labels", [])
        return [f"ARRAY_LENGTH(udf.{UDF_ID}(c.id, {_LABELS}, {wanted}, {unwanted})) = 0"]
    return []


def _field_conditions(image_filter: ImageFilter, params: _Parameters) -> list[str]:
    """Conditions on the document's own fields, lenient like SQLite about wrong types."""
    where = []
    if image_filter.exclude_blurred:
        # Missing or mistyped is_blurred is not "known blurred".
        where.append("NOT (IS_BOOL(c.is_blurred) AND c.is_blurred)")
    if image_filter.sortout is not None:
        where.append(f"ARRAY_CONTAINS({params.add('sortout', image_filter.sortout)}, c.sortout)")
    if image_filter.require_review:
        where.append("c.has_review = true")
    return where


def _annotator_conditions(image_filter: ImageFilter, params: _Parameters) -> list[str]:
    where = []
    if image_filter.labelled != "any":
        where.append(
            f"ARRAY_LENGTH(annotators) {'>' if image_filter.labelled == 'labelled' else '='} 0"
        )
    if image_filter.min_annotators > 0:
        minimum = params.add("min_annotators", image_filter.min_annotators)
        where.append(f"{_N_ANNOTATORS} > {minimum} - 0.5")  # the sum is a float
    return where


def compile_filter(
    image_filter: ImageFilter, *, use_udf: bool = False, documents: bool = False
) -> tuple[str, list[dict[str, Any]]]:
    """The Cosmos SQL selecting the ids of matching documents (the documents themselves with
    ``documents``), and its parameters.

    Returns ``(query_text, [{"name": "@...", "value": ...}, ...])``; no filter value is ever
    part of the text. ``limit`` and the id order are applied by the caller (see the module
    docstring). With ``use_udf`` the label prefixes go to ``udf.filterDocumentsByLabels``.
    """
    params = _Parameters()
    joins: list[str] = []
    where = _field_conditions(image_filter, params)
    annotator_where = _annotator_conditions(image_filter, params)
    label_joins, label_where = (
        ([], _label_udf(image_filter, params)) if use_udf else _label_sql(image_filter, params)
    )
    if annotator_where or label_joins:
        joins.append(_JOIN_LABELS)
    if annotator_where:
        joins.extend(_annotator_joins(params))
    joins.extend(label_joins)
    query = " ".join([f"SELECT VALUE {'c' if documents else 'c.id'} FROM c", *joins])
    conditions = [*where, *annotator_where, *label_where]
    if conditions:
        query += " WHERE " + " AND ".join(conditions)
    return query, params.items
