"""The Cosmos DB user-defined function ``filterDocumentsByLabels``, as deployed by the seed.

Existing deployments select images with ``udf.filterDocumentsByLabels(c.id,
c.labels_with_taxonomy, include_list, exclude_list)`` (REFERENCE §2). This is its source, kept
as a string so it ships with the package and ``install_udf`` can compare it with the deployed one.

Contract: the function returns the document's taxonomy paths that start with one of the
``include`` prefixes (every path when ``include`` is empty), or ``[]`` as soon as any path
starts with an ``exclude`` prefix (exclude wins). A path "starts with" a prefix when its first
``len(prefix)`` levels equal the prefix. Like the SQLite store, only lists of strings count as
paths and only objects count as annotations; anything mistyped is skipped, never an error.
The ``id`` argument is unused; it is kept because deployed queries pass it.

Written in ES5 (``var``, plain loops): Cosmos DB's JavaScript engine runs it unchanged.
"""

from __future__ import annotations

UDF_ID = "filterDocumentsByLabels"

UDF_BODY = """\
function filterDocumentsByLabels(id, labels, include, exclude) {
    function isPath(path) {
        if (!Array.isArray(path) || path.length === 0) {
            return false;
        }
        for (var i = 0; i < path.length; i++) {
            if (typeof path[i] !== "string") {
                return false;
            }
        }
        return true;
    }
    function startsWith(path, prefix) {
        if (!isPath(prefix) || prefix.length > path.length) {
            return false;
        }
        for (var i = 0; i < prefix.length; i++) {
            if (path[i] !== prefix[i]) {
                return false;
            }
        }
        return true;
    }
    function matchesAny(path, prefixes) {
        for (var i = 0; i < prefixes.length; i++) {
            if (startsWith(path, prefixes[i])) {
                return true;
            }
        }
        return false;
    }
    function allPaths(annotations) {
        var paths = [];
        if (!Array.isArray(annotations)) {
            return paths;
        }
        for (var i = 0; i < annotations.length; i++) {
            var a = annotations[i];
            var isObject = a !== null && typeof a === "object" && !Array.isArray(a);
            if (!isObject || !Array.isArray(a.taxonomy)) {
                continue;
            }
            for (var j = 0; j < a.taxonomy.length; j++) {
                if (isPath(a.taxonomy[j])) {
                    paths.push(a.taxonomy[j]);
                }
            }
        }
        return paths;
    }
    var wanted = Array.isArray(include) ? include : [];
    var unwanted = Array.isArray(exclude) ? exclude : [];
    var paths = allPaths(labels);
    var selected = [];
    for (var k = 0; k < paths.length; k++) {
        if (matchesAny(paths[k], unwanted)) {
            return [];
        }
        if (wanted.length === 0 || matchesAny(paths[k], wanted)) {
            selected.push(paths[k]);
        }
    }
    return selected;
}
"""
