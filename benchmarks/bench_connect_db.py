"""Row 4: connect_db's selection at scale (issue 6).

One million generated metadata documents (REFERENCE §2's schema: a 3-level product taxonomy,
12% of the images labelled by 1-3 annotators who mostly agree, a few blurred and sorted-out
images) in the embedded SQLite store, written once through its bulk path
(``SQLiteMetadataStore.upsert`` of a generator, one transaction) and cached. Two selections:

- labelled: not blurred, sortout Keep, at least 2 annotators, include two taxonomy prefixes
  (a level-1 and a level-2 one), exclude one level-2 prefix;
- unlabelled: not blurred, sortout Keep, no annotation (MoCo's pre-training set).

Each is timed as ``store.select(filter)`` read to the end (documents parsed, ids kept), in a
fresh child process that also reports its peak RSS. Baselines:

- SQLite: a naive scan of the JSON text in the same file (``documents NOT INDEXED``,
  ``json_extract`` / ``json_each`` for every condition, then a sort by id);
- Cosmos-compatible server (the first 10,000 of the same documents): a plain-Python scan,
  every document read with ``SELECT * FROM c`` and filtered in Python.

Every baseline must select the same ids as the project (checked, or the row fails).

The Cosmos server is a private instance (:mod:`benchmarks.cosmos_server`) that keeps its
documents between runs. The issue asks for 100,000 documents there, but that server (npm
``@vercel/cosmosdb-server``, single-threaded, no indexes) evaluates every query over the whole
container for every page: filled with 100,000 documents (888 s), it did not answer the first
page of ``SELECT * FROM c`` within the SDK's 5 s read timeout, and while it worked on one query
it did not answer the next client's connection within 3 s, so neither the project nor the
baseline could run at all. 10,000 documents is the largest size it serves. The project's
select also reads the selected documents back in chunks of 100 ids (``ARRAY_CONTAINS``), each
a full scan on this server, so its time grows with selected x stored; a project query is
stopped after :data:`COSMOS_CAP_S` and reported as such.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import (
    ROOT,
    in_child,
    interleaved,
    log,
    median,
    row,
    spread,
)

GENERATOR_VERSION = 1
FULL = {"sqlite": 1_000_000, "cosmos": 10_000, "repeats": 3, "cosmos_repeats": 2}
QUICK = {"sqlite": 100_000, "cosmos": 3_000, "repeats": 2, "cosmos_repeats": 1}
COSMOS_CAP_S = 180.0
"""A project query on the Cosmos server is stopped after this long: see the module docstring."""
COSMOS_DATABASE = "sslpipe-bench"

LEVEL1 = (
    "Badezimmersysteme",
    "Installationssysteme",
    "Rohrleitungssysteme",
    "Spülkästen",
    "Armaturen",
    "Keramik",
)
ANNOTATORS = tuple(range(701, 721))
LABELLED_SHARE = 0.12

# The two selections, as ImageFilter keyword arguments.
FILTERS: dict[str, dict[str, Any]] = {
    "labelled": {
        "labelled": "labelled",
        "min_annotators": 2,
        "include_labels": [["Badezimmersysteme"], ["Installationssysteme", "Vorwand"]],
        "exclude_labels": [["Badezimmersysteme", "Spülung"]],
    },
    "unlabelled": {"labelled": "unlabelled"},
}


def _dir() -> Path:
    return common.CACHE / "connect_db"


# --- the documents


def _taxonomy() -> list[list[str]]:
    """6 x 4 x 3 = 72 leaf paths."""
    second = ("Vorwand", "Spülung", "Zubehör", "Ersatzteile")
    return [[one, two, f"Typ {chr(65 + k)}"] for one in LEVEL1 for two in second for k in range(3)]


def documents(count: int, *, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``count`` metadata documents, deterministic (the first n are the same for every count)."""
    rng = random.Random(seed)
    paths = _taxonomy()
    weights = [1.0 / (1 + i // 12) for i in range(len(paths))]  # imbalanced, like the seed's
    for index in range(count):
        labelled = rng.random() < LABELLED_SHARE
        annotations = []
        if labelled:
            truth = rng.choices(paths, weights)[0]
            for annotator in sorted(rng.sample(ANNOTATORS, rng.randint(1, 3))):
                given = truth if rng.random() < 0.85 else rng.choice(paths)
                taxonomy = [given] if rng.random() < 0.9 else [given, rng.choice(paths)[:2]]
                annotations.append({"annotator_id": annotator, "taxonomy": taxonomy})
        image_id = f"{uuid.UUID(int=rng.getrandbits(128), version=4)}.jpeg"
        yield {
            "id": image_id,
            "uri_orig": f"{index:013x}.jpeg",
            "file_hash": f"{rng.getrandbits(44):011x}",
            "text": None,
            "artnr_ocr": None,
            "pii_entities": None,
            "face_rects": None,
            "is_blurred": rng.random() < 0.03,
            "resolution_width": 480,
            "resolution_height": 640,
            "servicereport_artnr": [f"{rng.randint(100, 999)}.{rng.randint(100, 999)}.CG.1"],
            "servicereport_filename": f"{rng.randint(0, 9999):04d}.PDF",
            "sortout": "Sort Out" if rng.random() < 0.03 else "Keep",
            "sortout_testset": labelled and rng.random() < 0.1,
            "has_imagerecognition_labels": labelled,
            "labels_with_taxonomy": annotations,
            "total_annotations": len(annotations),
            "has_review": labelled and rng.random() < 0.3,
        }


def python_match(doc: dict[str, Any], spec: dict[str, Any]) -> bool:
    """The filter evaluated in plain Python on one document (ImageFilter's semantics for
    well-formed documents; defaults: exclude blurred, sortout Keep)."""
    if doc.get("is_blurred") is True or doc.get("sortout") not in ("Keep",):
        return False
    annotations = doc.get("labels_with_taxonomy") or []
    annotators = {str(a.get("annotator_id")) for a in annotations}
    labelled = spec.get("labelled", "any")
    if (labelled == "labelled" and not annotators) or (labelled == "unlabelled" and annotators):
        return False
    if len(annotators) < spec.get("min_annotators", 0):
        return False
    paths = [tuple(p) for a in annotations for p in a.get("taxonomy") or []]

    def hits(prefixes: list[list[str]]) -> bool:
        return any(p[: len(q)] == tuple(q) for p in paths for q in prefixes)

    include, exclude = spec.get("include_labels", []), spec.get("exclude_labels", [])
    return (not include or hits(include)) and not (exclude and hits(exclude))


# --- the SQLite store


def _store_key(count: int) -> str:
    source = (ROOT / "sslpipe" / "stores" / "sqlite.py").read_bytes()
    digest = hashlib.sha256(source + f"{GENERATOR_VERSION}".encode()).hexdigest()[:12]
    return f"catalog-{count}-{digest}.db"


def ensure_sqlite(count: int) -> tuple[Path, str]:
    """The cached SQLite store of ``count`` documents (built when missing or when the store's
    code changed); returns its path and how it was obtained."""
    path = _dir() / _store_key(count)
    if path.is_file():
        return path, "cached"
    _dir().mkdir(parents=True, exist_ok=True)
    for stale in _dir().glob(f"catalog-{count}-*.db*"):
        stale.unlink()
    log(f"building the SQLite store of {count:,} documents (once; cached as {path.name})")
    result = in_child("benchmarks.bench_connect_db:build_sqlite", path=str(path), count=count)
    return path, (
        f"built in {result['seconds']:.0f} s ({count / result['seconds']:,.0f} docs/s, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB)"
    )


def build_sqlite(path: str, count: int) -> dict[str, Any]:
    from sslpipe.stores.sqlite import SQLiteMetadataStore

    partial = Path(path + ".part")
    partial.unlink(missing_ok=True)
    started = time.perf_counter()
    with SQLiteMetadataStore(partial) as store:
        report = store.upsert(documents(count))
    with sqlite3.connect(partial) as db:  # fold the WAL in, so the file is the whole store
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("ANALYZE")
    seconds = time.perf_counter() - started
    partial.replace(path)
    return {"created": report.created, "seconds": seconds}


def _digest(ids: Iterable[str]) -> dict[str, Any]:
    """How many ids and a digest of them in order, without holding them (so that a child's
    peak memory is the store's, not the list's)."""
    digest = hashlib.sha256()
    count = 0
    for image_id in ids:
        digest.update(image_id.encode() + b"\n")
        count += 1
    return {"count": count, "digest": digest.hexdigest()[:16]}


def sqlite_project(path: str, which: str) -> dict[str, Any]:
    """The project's selection: ``SQLiteMetadataStore.select`` read to the end."""
    from sslpipe.core.filters import ImageFilter
    from sslpipe.stores.sqlite import SQLiteMetadataStore

    image_filter = ImageFilter(**FILTERS[which])
    with SQLiteMetadataStore(Path(path)) as store:
        started = time.perf_counter()
        found = _digest(doc["id"] for doc in store.select(image_filter))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, **found}


def naive_sql(spec: dict[str, Any]) -> tuple[str, list[Any]]:
    """The selection as a scan of the JSON text: no index, json_extract for every field."""
    where = [
        "(json_extract(d.doc, '$.is_blurred') IS NULL OR json_extract(d.doc, '$.is_blurred') = 0)",
        "json_extract(d.doc, '$.sortout') = ?",
    ]
    params: list[Any] = ["Keep"]
    annotators = (
        "(SELECT COUNT(DISTINCT json_extract(a.value, '$.annotator_id'))"
        " FROM json_each(d.doc, '$.labels_with_taxonomy') AS a)"
    )
    if spec.get("labelled") == "labelled":
        where.append(f"{annotators} > 0")
    elif spec.get("labelled") == "unlabelled":
        where.append(f"{annotators} = 0")
    if spec.get("min_annotators", 0):
        where.append(f"{annotators} >= ?")
        params.append(spec["min_annotators"])
    for negate, key in ((False, "include_labels"), (True, "exclude_labels")):
        prefixes = spec.get(key) or []
        if not prefixes:
            continue
        tests = []
        for prefix in prefixes:
            tests.append(
                "("
                + " AND ".join(f"json_extract(p.value, '$[{i}]') = ?" for i in range(len(prefix)))
                + ")"
            )
            params.extend(prefix)
        exists = (
            "EXISTS (SELECT 1 FROM json_each(d.doc, '$.labels_with_taxonomy') AS a,"
            f" json_each(a.value, '$.taxonomy') AS p WHERE {' OR '.join(tests)})"
        )
        where.append(f"NOT {exists}" if negate else exists)
    sql = f"SELECT d.doc FROM documents AS d NOT INDEXED WHERE {' AND '.join(where)} ORDER BY d.id"
    return sql, params


def sqlite_baseline(path: str, which: str) -> dict[str, Any]:
    """The naive scan of the JSON text, read to the end like the project's."""
    sql, params = naive_sql(FILTERS[which])
    db = sqlite3.connect(path)
    started = time.perf_counter()
    found = _digest(json.loads(text)["id"] for (text,) in db.execute(sql, params))
    seconds = time.perf_counter() - started
    db.close()
    return {"seconds": seconds, **found}


def query_plan(path: Path, which: str) -> list[str]:
    """EXPLAIN QUERY PLAN of the project's SQL for the selection ``which``."""
    from sslpipe.core.filters import ImageFilter
    from sslpipe.stores.sqlite import compile_filter

    sql, params = compile_filter(ImageFilter(**FILTERS[which]))
    with sqlite3.connect(path) as db:
        return [str(r[-1]) for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


_ORDERED_PASS = "full pass in index order (every document visited, no JSON parsed to filter)"


def _access(plan: list[str]) -> str:
    """How the plan reaches the documents table ``d``: "index search" (SEARCH d ...), "full
    pass in index order" (SCAN d USING INDEX: every row visited, no sort) or "bare scan"."""
    for line in plan:
        if line.startswith("SEARCH d "):
            return "index search"
        if line.startswith("SCAN d "):
            return _ORDERED_PASS if "INDEX" in line else "bare scan"
    return "unknown"


# --- the Cosmos-compatible server


def cosmos_uri(endpoint: str, count: int) -> str:
    host = endpoint.split("://", 1)[1].rstrip("/")
    return f"cosmos://{host}/{COSMOS_DATABASE}/catalog-{count}-v{GENERATOR_VERSION}"


def fill_cosmos(uri: str, count: int) -> dict[str, Any]:
    """Write the first ``count`` documents unless the container already holds them: plain
    ``upsert_item`` calls, 16 at once (the store's own upsert first reads every chunk back
    with a query, which this server answers with a full scan: quadratic at this size)."""
    from concurrent.futures import ThreadPoolExecutor

    from sslpipe.stores.cosmos import CosmosMetadataStore

    store = CosmosMetadataStore.from_uri(uri)
    try:
        if store.count() == count:
            return {"seconds": 0.0, "created": 0}
        started = time.perf_counter()
        container = store._container  # bulk load of test data
        with ThreadPoolExecutor(16) as pool:
            written = sum(1 for _ in pool.map(container.upsert_item, documents(count)))
        return {"seconds": time.perf_counter() - started, "created": written}
    finally:
        store.close()


def cosmos_project(uri: str, which: str) -> dict[str, Any]:
    from sslpipe.core.filters import ImageFilter
    from sslpipe.stores.cosmos import CosmosMetadataStore

    with CosmosMetadataStore.from_uri(uri, create=False) as store:
        started = time.perf_counter()
        found = _digest(doc["id"] for doc in store.select(ImageFilter(**FILTERS[which])))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, **found}


def cosmos_baseline(uri: str, which: str) -> dict[str, Any]:
    """Every document read (``SELECT * FROM c``, pages of 1,000), filtered in Python."""
    from sslpipe.stores.cosmos import CosmosMetadataStore

    spec = FILTERS[which]
    store = CosmosMetadataStore.from_uri(uri, create=False)
    try:
        started = time.perf_counter()
        found = store._query("scan", "SELECT * FROM c", [], 1000)  # the store's paged reads
        selected = _digest(sorted(doc["id"] for doc in found if python_match(doc, spec)))
        seconds = time.perf_counter() - started
    finally:
        store.close()
    return {"seconds": seconds, **selected}


# --- the row


def _check_same(name: str, runs: dict[str, list[dict[str, Any]]]) -> int:
    digests = {(r["count"], r["digest"]) for results in runs.values() for r in results}
    if len(digests) != 1:
        raise RuntimeError(
            f"{name}: the project and the baseline selected different ids: {digests}"
        )
    return int(next(iter(digests))[0])


def _time_row(
    title: str, runs: dict[str, list[dict[str, Any]]], *, notes: str, target: str, extra_ok: bool
) -> dict[str, Any]:
    selected = _check_same(title, runs)
    project = [r["seconds"] for r in runs["project"]]
    baseline = [r["seconds"] for r in runs["baseline"]]
    ratio = median(baseline) / median(project)
    return row(
        title,
        project=median(project),
        baseline=median(baseline),
        unit="s",
        higher_is_better=False,
        target=target,
        met=ratio > 1.0 and extra_ok,
        notes=f"{selected:,} selected (same ids as the baseline); project {spread(project, 2)} s,"
        f" baseline {spread(baseline, 2)} s; {notes}",
    )


def run(quick: bool) -> list[dict[str, Any]]:
    sizes = QUICK if quick else FULL
    rows = sqlite_rows(sizes["sqlite"], repeats=sizes["repeats"])
    rows.extend(_cosmos_rows(sizes["cosmos"], repeats=sizes["cosmos_repeats"]))
    return rows


def sqlite_rows(count: int, *, repeats: int) -> list[dict[str, Any]]:
    """The SQLite rows: both selections on ``count`` documents, and the peak memory."""
    path, how = ensure_sqlite(count)
    log(f"SQLite store of {count:,} documents: {how}")
    runs = {}
    plans = {}
    for which in FILTERS:
        plans[which] = query_plan(path, which)
        runs[which] = interleaved(
            repeats,
            {
                name: partial(
                    in_child,
                    f"benchmarks.bench_connect_db:sqlite_{name}",
                    path=str(path),
                    which=which,
                )
                for name in ("project", "baseline")
            },
        )
    rows = []
    for which in FILTERS:
        access = _access(plans[which])
        plan = " / ".join(plans[which])
        # The labelled selection is a few % of the documents: it should be found through an
        # index; the unlabelled one is most of them, where one ordered pass is the right plan.
        wanted = ("index search",) if which == "labelled" else ("index search", _ORDERED_PASS)
        rows.append(
            _time_row(
                f"4. connect_db SQLite {count:,} docs, {which} selection (time: baseline/project)",
                runs[which],
                target="> 1x, " + ("index search" if which == "labelled" else "no JSON scan"),
                extra_ok=access in wanted,
                notes=f"baseline: naive json_extract scan of the same file (NOT INDEXED); "
                f"store {how}; documents reached by: {access}; EXPLAIN QUERY PLAN: {plan}",
            )
        )
    peaks = {
        name: median(r["peak_rss_mib"] for r in runs["unlabelled"][name])
        for name in ("project", "baseline")
    }
    rows.append(
        row(
            f"4. connect_db SQLite {count:,} docs, peak RSS of the unlabelled selection "
            "(ratio: baseline/project)",
            project=peaks["project"],
            baseline=peaks["baseline"],
            unit="MiB",
            higher_is_better=False,
            target="< 256 MiB (streamed)",
            met=peaks["project"] < 256,
            notes="child's peak RSS (VmHWM) with imports; documents are parsed one by one and only "
            f"ids kept; database file {path.stat().st_size / 2**20:,.0f} MiB",
        )
    )
    return rows


def _cosmos_rows(count: int, *, repeats: int) -> list[dict[str, Any]]:
    from benchmarks import cosmos_server

    cosmos = cosmos_server.start()
    uri = cosmos_uri(cosmos["endpoint"], count)
    env = {"SSLPIPE_COSMOS_KEY": cosmos["key"]}
    filled = in_child(
        "benchmarks.bench_connect_db:fill_cosmos", env=env, uri=uri, count=count, timeout_s=3600
    )
    how = (
        f"filled in {filled['seconds']:.0f} s ({count / filled['seconds']:,.0f} docs/s)"
        if filled["created"]
        else "filled by an earlier run"
    )
    log(f"Cosmos container of {count:,} documents: {how}")
    rows = []
    for which in FILTERS:
        cap = COSMOS_CAP_S
        cosmos_runs = interleaved(
            repeats,
            {
                "project": partial(
                    _capped,
                    cap,
                    "benchmarks.bench_connect_db:cosmos_project",
                    env=env,
                    uri=uri,
                    which=which,
                ),
                "baseline": partial(
                    in_child,
                    "benchmarks.bench_connect_db:cosmos_baseline",
                    env=env,
                    uri=uri,
                    which=which,
                ),
            },
        )
        title = (
            f"4. connect_db Cosmos server {count:,} docs, {which} selection "
            "(time: baseline/project)"
        )
        notes = (
            "baseline: every document read (SELECT * FROM c, pages of 1,000) and filtered in "
            "Python; a private @vercel/cosmosdb-server (single-threaded Node.js, no indexes) on "
            f"loopback, container {how}; at 100,000 documents this server times out on every "
            "query (module docstring)"
        )
        stopped = [r for r in cosmos_runs["project"] if r.get("stopped")]
        if stopped:
            baseline = [r["seconds"] for r in cosmos_runs["baseline"]]
            rows.append(
                row(
                    title,
                    project=cap,
                    baseline=median(baseline),
                    unit="s",
                    higher_is_better=False,
                    target="> 1x",
                    met=False,
                    notes=f"project STOPPED after {cap:.0f} s without finishing (the ratio is "
                    f"an upper bound), baseline {spread(baseline, 2)} s; {notes}",
                )
            )
            continue
        peak = median(r["peak_rss_mib"] for r in cosmos_runs["project"])
        rows.append(
            _time_row(
                title,
                cosmos_runs,
                target="> 1x",
                extra_ok=True,
                notes=f"{notes}; project peak RSS {peak:.0f} MiB",
            )
        )
    return rows


def _capped(cap_s: float, function: str, **kwargs: Any) -> dict[str, Any]:
    """``in_child`` stopped after ``cap_s`` seconds: then ``{"stopped": True}``."""
    import subprocess

    try:
        return in_child(function, timeout_s=cap_s, **kwargs)
    except subprocess.TimeoutExpired:
        return {"stopped": True, "seconds": cap_s}
