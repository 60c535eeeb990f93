"""A labelling session in and out of GIS files: export to GeoJSON or GeoParquet with provenance,
and start (or extend) a session from a GeoJSON of places.

Exported rows: each labelled chip's footprint (EPSG:4326 / OGC:CRS84), label, score, round, dates,
source, and where it came from (table and version, encoder and parameters, strategy); optionally
the best unlabelled chips above a threshold as `candidate` rows. GeoParquet files follow
GeoParquet 1.1 (the `geo` key of the Parquet metadata; WKB geometry; CRS omitted = OGC:CRS84).
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from shapely.geometry import mapping, shape
from shapely.validation import explain_validity

from chipscout.indexer import __version__
from chipscout.indexer.seedsets.labels import NEGATIVE, POSITIVE, LabelError, LabelStore, Session, normalise_label
from chipscout.indexer.seedsets.refine import rank_session
from chipscout.indexer.search.engine import BBox, SearchEngine, SearchFilters
from chipscout.indexer.errors import ExportError, GeoJSONImportError  # noqa: F401  (raised here, defined with the others)

FORMATS = ("geojson", "geoparquet")
CANDIDATE = "candidate"
GEOPARQUET_VERSION = "1.1.0"
#: Names GeoJSON files use for longitude/latitude on WGS 84 (RFC 7946's only CRS).
LONLAT_CRS_NAMES = {
    "urn:ogc:def:crs:ogc:1.3:crs84", "urn:ogc:def:crs:ogc::crs84", "ogc:crs84", "crs84",
    "epsg:4326", "urn:ogc:def:crs:epsg::4326", "urn:ogc:def:crs:epsg:4326",
    "http://www.opengis.net/def/crs/ogc/1.3/crs84", "http://www.opengis.net/def/crs/epsg/0/4326",
}
#: Up to this many features, each is matched with its own box filter; more share one scan.
_PER_FEATURE_QUERIES = 64


# ----------------------------------------------------------------------------- export
@dataclass(frozen=True)
class ExportSummary:
    path: str | None
    format: str
    session: str
    positives: int
    negatives: int
    candidates: int
    candidate_strategy: str | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _format(fmt: str | None, path: str | Path | None) -> str:
    if fmt is None and path is not None:
        suffix = Path(path).suffix.lower()
        fmt = {".geojson": "geojson", ".json": "geojson", ".parquet": "geoparquet",
               ".geoparquet": "geoparquet"}.get(suffix)
        if fmt is None:
            raise ExportError(f"cannot tell the format from {str(path)!r}; give --format geojson or geoparquet")
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    return fmt


def session_rows(engine: SearchEngine, session: str | Session, *, candidates: int = 0,
                 threshold: float | None = None, strategy: str | None = None,
                 labels: LabelStore | None = None, **options: Any) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """The rows an export holds (labelled chips, then candidates), the provenance, and a note.

    Candidates are the best `candidates` unlabelled chips of the session's ranking (`strategy`, or
    the session's own) whose score is at least `threshold`: a cosine similarity for the
    similarity strategies, a probability for the classifier.
    """
    store = labels or LabelStore.for_engine(engine)
    current = store.session(session)
    labelled = store.labels(current)
    if not labelled:
        raise ExportError(f"session {current.name!r} has no labels yet; nothing to export "
                          "(label some chips, or import a GeoJSON)")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 0:
        raise ExportError(f"candidates must be a whole number >= 0, got {candidates!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise ExportError(f"threshold must be a finite number, got {threshold!r}")
    records = {r.chip_id: r for r in engine.get_chips([label.chip_id for label in labelled])}
    missing = [label.chip_id for label in labelled if label.chip_id not in records]
    if missing:
        raise ExportError(f"labelled chip(s) {', '.join(missing[:5])} are no longer in table "
                          f"{engine.store.table_name!r}; remove their labels first "
                          "(`chipscout label remove`)")
    config = engine.config
    provenance = {
        "chipscout_version": __version__,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "db": engine.store.db_uri,
        "table": engine.store.table_name,
        "table_version": int(engine.store.version),
        "encoder": config.encoder,
        "encoder_label": config.encoder_label,
        "encoder_config": config.encoder_config,
        "encoder_state_sha256": config.state_sha256,
        "sensor": config.sensor,
        "bands": list(config.bands),
        "session": current.name,
        "session_id": current.session_id,
        "session_strategy": current.strategy,
        "session_round": current.current_round,
    }
    shared = {"session": current.name, "table": engine.store.table_name,
              "table_version": provenance["table_version"], "encoder": config.encoder_label}
    rows = []
    for label in labelled:
        chip = records[label.chip_id]
        rows.append({**_chip_fields(chip), "label": label.label, "score": label.score, "round": label.round,
                     "labelled_at": label.labelled_at, "labelled_by": label.labelled_by,
                     "origin": label.origin, "strategy": label.strategy, **shared})
    note = ""
    if candidates:
        ranking = rank_session(engine, current, strategy=strategy, labels=store,
                               depth=candidates, **options)
        kept = [item for item in ranking.items[:candidates] if threshold is None or item.score >= threshold]
        provenance["candidates"] = {"strategy": ranking.strategy, "requested_strategy": ranking.requested_strategy,
                                    "note": ranking.note, "score": ranking.score_kind,
                                    "top_n": candidates, "threshold": threshold}
        note = ranking.note
        for item in kept:
            rows.append({**_chip_fields(item.chip), "label": CANDIDATE, "score": item.score, "round": None,
                         "labelled_at": None, "labelled_by": None, "origin": "ranking",
                         "strategy": ranking.strategy, **shared})
    return rows, provenance, note


def _chip_fields(chip) -> dict[str, Any]:
    return {"chip_id": chip.chip_id, "geometry": chip.footprint, "acquired": chip.acquired,
            "source_id": chip.source_id, "source_path": chip.source_path, "sensor": chip.sensor,
            "gsd_m": chip.gsd_m, "size_px": chip.size_px}


_PARQUET_COLUMNS = [
    ("chip_id", pa.string()), ("label", pa.string()), ("score", pa.float64()), ("round", pa.int32()),
    ("labelled_at", pa.timestamp("us", tz="UTC")), ("labelled_by", pa.string()), ("origin", pa.string()),
    ("strategy", pa.string()), ("acquired", pa.timestamp("us", tz="UTC")), ("source_id", pa.string()),
    ("source_path", pa.string()), ("sensor", pa.string()), ("gsd_m", pa.float32()), ("size_px", pa.int32()),
    ("session", pa.string()), ("table", pa.string()), ("table_version", pa.int64()), ("encoder", pa.string()),
]


def geojson_document(rows: Sequence[Mapping[str, Any]], provenance: Mapping[str, Any]) -> dict[str, Any]:
    """An RFC 7946 FeatureCollection; provenance in the foreign member `chipscout`."""
    features = []
    for row in rows:
        properties = {name: _json_value(row[name]) for name, _ in _PARQUET_COLUMNS}
        features.append({"type": "Feature", "id": row["chip_id"], "geometry": mapping(row["geometry"]),
                         "properties": properties})
    return {"type": "FeatureCollection", "chipscout": dict(provenance), "features": features}


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def geoparquet_table(rows: Sequence[Mapping[str, Any]], provenance: Mapping[str, Any]) -> pa.Table:
    """An Arrow table with a WKB `geometry` column and GeoParquet 1.1 `geo` metadata."""
    geometries = [row["geometry"] for row in rows]
    columns = {name: pa.array([row[name] for row in rows], type=kind) for name, kind in _PARQUET_COLUMNS}
    columns["geometry"] = pa.array(shapely.to_wkb(geometries).tolist() if geometries else [], pa.binary())
    bounds = shapely.total_bounds(geometries) if geometries else [math.nan] * 4
    geo = {
        "version": GEOPARQUET_VERSION,
        "primary_column": "geometry",
        "columns": {"geometry": {
            "encoding": "WKB",
            "geometry_types": sorted({g.geom_type for g in geometries}),
            # No "crs": GeoParquet's default is OGC:CRS84 (longitude, latitude on WGS 84), which
            # is what chip footprints are stored in.
            "bbox": [float(b) for b in bounds],
        }},
    }
    metadata = {b"geo": json.dumps(geo).encode(), b"chipscout": json.dumps(dict(provenance), default=str).encode()}
    return pa.table(columns).replace_schema_metadata(metadata)


def export_bytes(engine: SearchEngine, session: str | Session, fmt: str = "geojson", **options: Any
                 ) -> tuple[bytes, ExportSummary]:
    """The export as bytes (for a download button) and what it holds; options as `session_rows`."""
    fmt = _format(fmt, None)
    return export_formats(engine, session, (fmt,), **options)[fmt]


def export_formats(engine: SearchEngine, session: str | Session, formats: Sequence[str] = FORMATS,
                   **options: Any) -> dict[str, tuple[bytes, ExportSummary]]:
    """`export_bytes` for several formats from one read of the session (and one ranking for the
    candidates): {format: (bytes, summary)}, for the app's download buttons."""
    formats = [_format(fmt, None) for fmt in formats]
    rows, provenance, note = session_rows(engine, session, **options)
    labels = [row["label"] for row in rows]
    exports = {}
    for fmt in formats:
        if fmt == "geojson":
            payload = json.dumps(geojson_document(rows, provenance), default=str).encode()
        else:
            buffer = io.BytesIO()
            pq.write_table(geoparquet_table(rows, provenance), buffer, compression="zstd")
            payload = buffer.getvalue()
        exports[fmt] = payload, ExportSummary(None, fmt, provenance["session"], labels.count(POSITIVE),
                                              labels.count(NEGATIVE), labels.count(CANDIDATE),
                                              provenance.get("candidates", {}).get("strategy"), note)
    return exports


def export_session(engine: SearchEngine, session: str | Session, out: str | Path, fmt: str | None = None,
                   **options: Any) -> ExportSummary:
    """Write the session to `out` (format from `fmt` or the file suffix); the file appears whole
    or not at all."""
    fmt = _format(fmt, out)
    payload, summary = export_bytes(engine, session, fmt, **options)
    out = Path(out).expanduser()
    temporary = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as handle:
            temporary = handle.name
            handle.write(payload)
        # mkstemp makes the file 0600; give it the mode any file the user writes gets (an
        # overwritten file keeps its own), so QGIS under another account can open it.
        os.chmod(temporary, _mode_of(out))
        os.replace(temporary, out)
    except OSError as err:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        raise ExportError(f"cannot write {out}: {err}") from err
    return replace(summary, path=str(out))


def _mode_of(out: Path) -> int:
    """The permission bits of `out` when it exists, else 0666 less the process umask."""
    try:
        return stat.S_IMODE(out.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)  # the only way to read it; set straight back
        os.umask(umask)
        return 0o666 & ~umask


# ----------------------------------------------------------------------------- import
@dataclass(frozen=True)
class ImportSummary:
    session: str
    created: bool
    label: str
    features: int
    chips: list[str]
    """The chips labelled, sorted."""
    unmatched_features: list[int]
    """Indexes of features that intersect no chip of the table."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_geojson(source: str | Path | bytes | Mapping[str, Any]) -> list[Any]:
    """The geometries of a GeoJSON (FeatureCollection, Feature or bare geometry), validated.

    source: a file path, JSON text or bytes, or a parsed mapping. Raises GeoJSONImportError for
    unreadable JSON, a `crs` member naming anything but lon/lat WGS 84, and (naming the feature's
    index) a missing, malformed, invalid or empty geometry or coordinates outside lon/lat range.
    """
    document = _load_json(source)
    if not isinstance(document, Mapping) or "type" not in document:
        raise GeoJSONImportError("not a GeoJSON object (no 'type' member)")
    _check_crs(document.get("crs"), "the file")
    kind = document["type"]
    if kind == "FeatureCollection":
        features = document.get("features")
        if not isinstance(features, list):
            raise GeoJSONImportError("FeatureCollection has no 'features' list")
    elif kind == "Feature":
        features = [document]
    else:
        features = [{"type": "Feature", "geometry": document}]
    if not features:
        raise GeoJSONImportError("the GeoJSON holds no features")
    geometries = []
    for index, feature in enumerate(features):
        if not isinstance(feature, Mapping):
            raise GeoJSONImportError(f"feature {index} is not a GeoJSON object")
        _check_crs(feature.get("crs"), f"feature {index}")
        raw = feature.get("geometry")
        if raw is None:
            raise GeoJSONImportError(f"feature {index} has no geometry")
        try:
            geometry = shape(raw)
        except Exception as err:  # shapely raises GeometryTypeError, ValueError, TypeError, KeyError...
            raise GeoJSONImportError(f"feature {index} has a malformed geometry: {err}") from None
        if geometry.is_empty:
            raise GeoJSONImportError(f"feature {index} has an empty geometry")
        if not geometry.is_valid:
            raise GeoJSONImportError(f"feature {index} has an invalid geometry: {explain_validity(geometry)}")
        min_x, min_y, max_x, max_y = geometry.bounds
        if not (-180 <= min_x <= max_x <= 180 and -90 <= min_y <= max_y <= 90):
            raise GeoJSONImportError(
                f"feature {index} has coordinates outside longitude/latitude range "
                f"({min_x:g}, {min_y:g}, {max_x:g}, {max_y:g}); GeoJSON must be in WGS 84 degrees "
                "(is it in a projected CRS?)")
        geometries.append(geometry)
    return geometries


def _load_json(source: str | Path | bytes | Mapping[str, Any]) -> Any:
    if isinstance(source, Mapping):
        return source
    where = "the GeoJSON text"
    try:
        if isinstance(source, bytes):
            text = source.decode("utf-8")
        elif isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            where = str(source)
            text = Path(source).expanduser().read_text(encoding="utf-8")
        else:
            text = source
        return json.loads(text)
    except (OSError, UnicodeDecodeError) as err:
        raise GeoJSONImportError(f"cannot read {where}: {err}") from None
    except json.JSONDecodeError as err:
        raise GeoJSONImportError(f"{where} is not valid JSON: {err}") from None


def _check_crs(crs: Any, where: str) -> None:
    """Reject the 2008 GeoJSON `crs` member unless it names lon/lat WGS 84."""
    if crs is None:
        return
    name = crs.get("properties", {}).get("name") if isinstance(crs, Mapping) else None
    if not isinstance(name, str) or name.strip().lower() not in LONLAT_CRS_NAMES:
        shown = name if isinstance(name, str) else json.dumps(crs)
        raise GeoJSONImportError(f"{where} declares CRS {shown}; only longitude/latitude on WGS 84 "
                                 "(OGC:CRS84 / EPSG:4326) is accepted: reproject it first "
                                 "(e.g. ogr2ogr -t_srs EPSG:4326)")


def matching_chips(engine: SearchEngine, geometries: Sequence[Any],
                   filters: SearchFilters | None = None) -> tuple[list[str], list[int]]:
    """Chips whose footprint intersects any of `geometries` (and pass `filters`), and the indexes
    of the geometries that intersect none."""
    filters = filters or SearchFilters()
    if not geometries:
        return [], []
    if len(geometries) <= _PER_FEATURE_QUERIES:
        boxes = [geometry.bounds for geometry in geometries]
    else:
        boxes = [tuple(shapely.total_bounds(list(geometries)))]
    footprints: dict[str, Any] = {}
    for box in boxes:
        where = replace(filters, bbox=BBox(*box)).where_clause()
        rows = engine.store.scan(["chip_id", "footprint"], where=where)
        footprints.update(zip(rows["chip_id"].to_pylist(), shapely.from_wkb(rows["footprint"].to_pylist())))
    ids = list(footprints)
    tree = shapely.STRtree([footprints[c] for c in ids])
    matched: set[str] = set()
    unmatched = []
    for index, geometry in enumerate(geometries):
        hits = tree.query(geometry, predicate="intersects")
        if len(hits) == 0:
            unmatched.append(index)
        matched.update(ids[i] for i in hits)
    return sorted(matched), unmatched


def import_geojson(engine: SearchEngine, source: str | Path | bytes | Mapping[str, Any], session: str,
                   *, label: str = POSITIVE, create: bool = True, by: str | None = None,
                   filters: SearchFilters | None = None, strategy: str = "auto",
                   labels: LabelStore | None = None) -> ImportSummary:
    """Label every chip whose footprint intersects a feature of the GeoJSON (points or polygons)
    as `label` in `session`, creating the session when it does not exist (and `create`).

    Every footprint intersecting a feature counts: overlapping grids and several dates of one
    place give several chips per feature (narrow them with `filters`, e.g. a date range).
    Nothing is written when the file is rejected or no feature meets a chip.
    """
    label = normalise_label(label)
    geometries = read_geojson(source)
    chips, unmatched = matching_chips(engine, geometries, filters)
    if not chips:
        raise GeoJSONImportError(f"none of the {len(geometries)} feature(s) intersects a chip of table "
                                 f"{engine.store.table_name!r} (within the filters given)")
    store = labels or LabelStore.for_engine(engine)
    created = False
    if not store.exists(session):
        if not create:
            raise LabelError(f"no labelling session {session!r}; create it first or allow creating it")
        store.create_session(session, strategy=strategy, created_by=by)
        created = True
    origin = "import" if not isinstance(source, (str, Path)) or str(source).lstrip().startswith("{") \
        else f"import:{Path(source).name}"
    store.set_labels(session, {chip_id: label for chip_id in chips}, by=by, origin=origin)
    return ImportSummary(session, created, label, len(geometries), chips, unmatched)
