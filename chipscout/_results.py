"""`Results`: one search's answer, as Python objects, an Arrow table or a GeoDataFrame."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from chipscout.indexer.errors import QueryError

if TYPE_CHECKING:
    import geopandas
    import pyarrow as pa

    from chipscout.indexer.search import Heatmap, SearchResponse, SearchResult

#: The footprint column: WKB polygons in EPSG:4326, tagged the GeoArrow way so GeoArrow-aware
#: readers (geopandas, lonboard, DuckDB) see a geometry column.
FOOTPRINT_METADATA = {b"ARROW:extension:name": b"geoarrow.wkb",
                      b"ARROW:extension:metadata": b'{"crs": "EPSG:4326"}'}


class Results:
    """The ranked chips of one search (best first) and how they were found."""

    def __init__(self, response: SearchResponse, heatmaps: list[Heatmap] | None = None):
        self.response = response
        self._heatmaps = heatmaps

    @property
    def heatmaps(self) -> list[Heatmap]:
        """One `Heatmap` per result (same order): where in the chip it matches the query; a heatmap
        without a grid carries a `note` (e.g. the source moved). Search with `where=True`."""
        if self._heatmaps is None:
            raise QueryError("these results carry no heatmaps: search with where=True "
                             "(or call Table.heatmaps(results))")
        return self._heatmaps

    @property
    def query_chip_id(self) -> str | None:
        return self.response.query_chip_id

    @property
    def method(self) -> str:
        """How the engine found them: `exact`, `ann`, ... and `+expanded:m` after query expansion."""
        return self.response.method

    @property
    def expansion(self) -> int:
        """Results folded into the query by query expansion (0: the plain nearest neighbours)."""
        return self.response.expansion

    @property
    def chip_ids(self) -> list[str]:
        return [r.chip.chip_id for r in self.response.results]

    def __len__(self) -> int:
        return len(self.response.results)

    def __iter__(self) -> Iterator[SearchResult]:
        return iter(self.response.results)

    def __getitem__(self, index: int) -> SearchResult:
        return self.response.results[index]

    def __repr__(self) -> str:
        query = f"chip {self.query_chip_id!r}" if self.query_chip_id else "a vector"
        return f"<Results: {len(self)} chips like {query}, {self.method}, {self.response.elapsed_ms:.1f} ms>"

    def to_list(self) -> list[dict[str, Any]]:
        """One dict per result (rank, similarity, distance and the chip's fields; footprint as WKT)."""
        return [r.to_dict() for r in self.response.results]

    def to_arrow(self) -> pa.Table:
        """rank, chip_id, similarity, distance, lon, lat (footprint centre), acquired (UTC or null),
        source_id, sensor, cloud_fraction, nodata_fraction, gsd_m, size_px, source_path and
        footprint (WKB, EPSG:4326)."""
        import pyarrow as pa
        import shapely

        results = self.response.results
        chips = [r.chip for r in results]
        footprint = pa.field("footprint", pa.binary(), metadata=FOOTPRINT_METADATA)
        schema = pa.schema([
            ("rank", pa.int32()), ("chip_id", pa.string()), ("similarity", pa.float64()),
            ("distance", pa.float64()), ("lon", pa.float64()), ("lat", pa.float64()),
            ("acquired", pa.timestamp("us", tz="UTC")), ("source_id", pa.string()), ("sensor", pa.string()),
            ("cloud_fraction", pa.float64()), ("nodata_fraction", pa.float64()), ("gsd_m", pa.float64()),
            ("size_px", pa.int32()), ("source_path", pa.string()), footprint,
        ], metadata={"query_chip_id": self.query_chip_id or "", "method": self.method})
        columns = {
            "rank": [r.rank for r in results], "chip_id": [c.chip_id for c in chips],
            "similarity": [r.similarity for r in results], "distance": [r.distance for r in results],
            "lon": [c.center_lon for c in chips], "lat": [c.center_lat for c in chips],
            "acquired": [c.acquired for c in chips], "source_id": [c.source_id for c in chips],
            "sensor": [c.sensor for c in chips], "cloud_fraction": [c.cloud_fraction for c in chips],
            "nodata_fraction": [c.nodata_fraction for c in chips], "gsd_m": [c.gsd_m for c in chips],
            "size_px": [c.size_px for c in chips], "source_path": [c.source_path for c in chips],
            "footprint": shapely.to_wkb([c.footprint for c in chips]).tolist() if chips else [],
        }
        return pa.table(columns, schema=schema)

    def to_geodataframe(self) -> geopandas.GeoDataFrame:
        """`to_arrow()` as a GeoDataFrame whose geometry is the footprint, in EPSG:4326.
        Needs geopandas (`pip install geopandas`)."""
        try:
            import geopandas
        except ImportError:
            raise ImportError("Results.to_geodataframe needs geopandas: `pip install geopandas` "
                              "(or use Results.to_arrow())") from None
        table = self.to_arrow()
        frame = table.drop_columns(["footprint"]).to_pandas()
        geometry = geopandas.GeoSeries.from_wkb(table["footprint"].to_pylist(), crs="EPSG:4326")
        return geopandas.GeoDataFrame(frame, geometry=geometry, crs="EPSG:4326")
