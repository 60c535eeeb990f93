"""The one band table: names, aliases, wavelengths, resolution, radiometry and normalisation stats.

Every source (local files, STAC items) and every encoder normalisation reads band facts from here,
so a band means the same thing whichever way it arrived.

Pixels leave the readers as *reflectance* (float32, ~0..1): `dn * dn_scale + dn_offset`.
Normalisation statistics (`mean`, `std`) are therefore in reflectance units too.
Sources: ESA Sentinel-2 MSI spectral response (central wavelengths, S2A); USGS Landsat 8-9
Collection 2 Level-2 product guide (scale 2.75e-5, offset -0.2); USDA NAIP (8-bit DN);
band means/stds from the Clay foundation model's public `configs/metadata.yaml`
(DN units there, divided by the DN scale here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from chipscout.indexer.errors import UnknownBandError  # noqa: F401  (raised here, defined with the others)


@dataclass(frozen=True)
class Band:
    name: str
    """Common name used throughout chipscout (STAC eo:common_name style, e.g. `red`, `nir08`)."""
    wavelength_um: float
    gsd_m: float
    aliases: tuple[str, ...] = ()
    """Other spellings: asset keys of Earth Search / Planetary Computer, file-name tokens."""
    mean: float | None = None
    """Reflectance-unit mean used for `standardize` normalisation (None: not known)."""
    std: float | None = None

    def matches(self, label: str) -> bool:
        wanted = label.strip().lower()
        return wanted == self.name.lower() or wanted in (a.lower() for a in self.aliases)


@dataclass(frozen=True)
class CloudMaskRule:
    """How a sensor's quality band flags cloud: by class value (Sentinel-2 SCL) or bit (Landsat QA_PIXEL)."""

    name: str
    aliases: tuple[str, ...] = ()
    """Asset keys / file tokens of the quality band (Earth Search `scl`, Planetary Computer `SCL`)."""
    cloudy_classes: frozenset[int] = frozenset()
    cloudy_bits: tuple[int, ...] = ()
    nodata_classes: frozenset[int] = frozenset()

    def matches(self, label: str) -> bool:
        wanted = label.strip().lower()
        return wanted == self.name.lower() or wanted in (a.lower() for a in self.aliases)


@dataclass(frozen=True)
class Sensor:
    name: str
    bands: tuple[Band, ...]
    dn_scale: float
    """Multiply stored digital numbers by this to get reflectance."""
    dn_offset: float = 0.0
    rgb: tuple[str, str, str] = ("red", "green", "blue")
    rgb_max_reflectance: float = 0.3
    """Reflectance mapped to white in thumbnails (a fixed stretch, so thumbnails compare)."""
    nodata_dn: float | None = 0
    quality_bands: tuple[str, ...] = field(default_factory=tuple)
    cloud_mask: CloudMaskRule | None = None
    baseline_offset_dn: float = 0.0
    """Offset added to DNs of products from `baseline_offset_since` on (Sentinel-2 processing
    baseline 04.00 shifted L1C/L2A DNs by +1000: BOA_ADD_OFFSET / RADIO_ADD_OFFSET = -1000)."""
    baseline_offset_since: str | None = None
    product: str | None = None
    """Set for a published embedding product (`aef`, `tessera`, `raster-embedding`): its "bands"
    are embedding channels, not reflectance; they are read as stored (no DN scaling) and
    de-quantised by the product encoder (`chipscout.encoders.raster_embedding`)."""

    def band(self, label: str) -> Band:
        for band in self.bands:
            if band.matches(label):
                return band
        known = ", ".join(b.name for b in self.bands)
        raise UnknownBandError(f"sensor {self.name!r} has no band {label!r}; its bands are: {known}")

    def has_band(self, label: str) -> bool:
        return any(b.matches(label) for b in self.bands)

    @property
    def band_names(self) -> list[str]:
        return [b.name for b in self.bands]


def _s2_band(name: str, code: str, wavelength_um: float, gsd_m: float,
             mean_dn: float | None = None, std_dn: float | None = None) -> Band:
    # Earth Search uses common names as asset keys, Planetary Computer and the SAFE files use B04.
    short = code.replace("B0", "B") if code.startswith("B0") else code
    aliases = (code, short, f"{code}_{int(gsd_m)}m")
    if code == "B8A":
        aliases += ("B08A", "B8a")
    return Band(name, wavelength_um, gsd_m, aliases,
                None if mean_dn is None else mean_dn / 10000.0,
                None if std_dn is None else std_dn / 10000.0)


# Clay v1.5 sentinel-2-l2a statistics (DN), keyed by common name.
_S2_CLAY_MEAN = {"blue": 1105.0, "green": 1355.0, "red": 1552.0, "rededge1": 1887.0,
                 "rededge2": 2422.0, "rededge3": 2630.0, "nir": 2743.0, "nir08": 2785.0,
                 "swir16": 2388.0, "swir22": 1835.0}
_S2_CLAY_STD = {"blue": 1809.0, "green": 1757.0, "red": 1888.0, "rededge1": 1870.0,
                "rededge2": 1732.0, "rededge3": 1697.0, "nir": 1742.0, "nir08": 1648.0,
                "swir16": 1470.0, "swir22": 1379.0}

_S2_BANDS_ALL = [
    ("coastal", "B01", 0.443, 60.0),
    ("blue", "B02", 0.493, 10.0),
    ("green", "B03", 0.560, 10.0),
    ("red", "B04", 0.665, 10.0),
    ("rededge1", "B05", 0.704, 20.0),
    ("rededge2", "B06", 0.740, 20.0),
    ("rededge3", "B07", 0.783, 20.0),
    ("nir", "B08", 0.842, 10.0),
    ("nir08", "B8A", 0.865, 20.0),
    ("nir09", "B09", 0.945, 60.0),
    ("cirrus", "B10", 1.375, 60.0),
    ("swir16", "B11", 1.610, 20.0),
    ("swir22", "B12", 2.190, 20.0),
]


#: Scene classification (L2A SCL): 3 cloud shadow, 8 cloud medium, 9 cloud high, 10 thin cirrus; 0 no data.
S2_SCL = CloudMaskRule("scl", ("SCL", "SCL_20m"), cloudy_classes=frozenset({3, 8, 9, 10}),
                       nodata_classes=frozenset({0}))


def _sentinel2(name: str, with_cirrus: bool, quality_bands: tuple[str, ...],
               cloud_mask: CloudMaskRule | None = None) -> Sensor:
    bands = tuple(
        _s2_band(common, code, wl, gsd, _S2_CLAY_MEAN.get(common), _S2_CLAY_STD.get(common))
        for common, code, wl, gsd in _S2_BANDS_ALL
        if with_cirrus or code != "B10"
    )
    return Sensor(name, bands, dn_scale=1e-4, quality_bands=quality_bands, cloud_mask=cloud_mask,
                  baseline_offset_dn=-1000.0, baseline_offset_since="04.00")


SENTINEL2_L1C = _sentinel2("sentinel-2-l1c", with_cirrus=True, quality_bands=())
SENTINEL2_L2A = _sentinel2("sentinel-2-l2a", with_cirrus=False, quality_bands=("scl",), cloud_mask=S2_SCL)

#: Landsat Collection 2 QA_PIXEL: bit 1 dilated cloud, 2 cirrus, 3 cloud, 4 cloud shadow; value 1 = fill only.
LANDSAT_QA_PIXEL = CloudMaskRule("qa_pixel", ("QA_PIXEL",), cloudy_bits=(1, 2, 3, 4),
                                 nodata_classes=frozenset({1}))

_LANDSAT_SCALE, _LANDSAT_OFFSET = 2.75e-5, -0.2
LANDSAT_C2_L2 = Sensor(
    "landsat-c2-l2",
    (
        # Wavelengths and stats of Clay's landsat-c2l2-sr entry (the wavelengths Clay was
        # trained with, rounded from USGS's); stats DN -> reflectance: mean * scale + offset,
        # std * scale.
        Band("coastal", 0.443, 30.0, ("SR_B1", "B1")),
        Band("blue", 0.48, 30.0, ("SR_B2", "B2"),
             12474 * _LANDSAT_SCALE + _LANDSAT_OFFSET, 10144 * _LANDSAT_SCALE),
        Band("green", 0.56, 30.0, ("SR_B3", "B3"),
             13310 * _LANDSAT_SCALE + _LANDSAT_OFFSET, 9408 * _LANDSAT_SCALE),
        Band("red", 0.65, 30.0, ("SR_B4", "B4"),
             13705 * _LANDSAT_SCALE + _LANDSAT_OFFSET, 9578 * _LANDSAT_SCALE),
        Band("nir08", 0.86, 30.0, ("SR_B5", "B5", "nir"),
             17801 * _LANDSAT_SCALE + _LANDSAT_OFFSET, 8277 * _LANDSAT_SCALE),
        Band("swir16", 1.6, 30.0, ("SR_B6", "B6"),
             14615 * _LANDSAT_SCALE + _LANDSAT_OFFSET, 5300 * _LANDSAT_SCALE),
        Band("swir22", 2.2, 30.0, ("SR_B7", "B7"),
             12701 * _LANDSAT_SCALE + _LANDSAT_OFFSET, 4522 * _LANDSAT_SCALE),
    ),
    dn_scale=_LANDSAT_SCALE,
    dn_offset=_LANDSAT_OFFSET,
    quality_bands=("qa_pixel",),
    cloud_mask=LANDSAT_QA_PIXEL,
)

NAIP = Sensor(
    "naip",
    (
        Band("red", 0.65, 1.0, ("R", "band1"), 110.16 / 255, 47.23 / 255),
        Band("green", 0.56, 1.0, ("G", "band2"), 115.41 / 255, 39.82 / 255),
        Band("blue", 0.48, 1.0, ("B", "band3"), 98.15 / 255, 35.43 / 255),
        Band("nir", 0.842, 1.0, ("N", "NIR", "band4"), 139.04 / 255, 49.86 / 255),
    ),
    dn_scale=1 / 255,
    rgb_max_reflectance=1.0,
    nodata_dn=None,
)

#: 8-bit RGB photos (EuroSAT RGB, screenshots): no radiometry, just 0..255 -> 0..1.
RGB8 = Sensor(
    "rgb8",
    (
        Band("red", 0.665, 10.0, ("R",)),
        Band("green", 0.560, 10.0, ("G",)),
        Band("blue", 0.493, 10.0, ("B",)),
    ),
    dn_scale=1 / 255,
    rgb_max_reflectance=1.0,
    nodata_dn=None,
)

# ----------------------------------------------------------------------------- embedding products
# Per-pixel embedding rasters (docs/products.md): channels are "bands" read as stored (scale 1),
# with the product's nodata; no wavelength, no reflectance, no RGB to show.


def _channels(prefix: str, count: int, width: int) -> tuple[Band, ...]:
    return tuple(Band(f"{prefix}{i:0{width}d}", 0.0, 10.0) for i in range(count))


#: AlphaEarth Foundations Satellite Embedding: 64 int8 channels A00..A63, -128 = nodata in all.
AEF = Sensor("aef", _channels("A", 64, 2), dn_scale=1.0, rgb=(), rgb_max_reflectance=1.0,
             nodata_dn=-128, product="aef")
#: TESSERA: 128 int8 channels (T000..T127) and a float32 per-pixel `scale` (0 or NaN = nodata).
TESSERA = Sensor("tessera", _channels("T", 128, 3) + (Band("scale", 0.0, 10.0, ("scales",)),),
                 dn_scale=1.0, rgb=(), rgb_max_reflectance=1.0, nodata_dn=None, product="tessera")
#: Prefix of the generic product sensors: `embedding-N` has N channels E000.. (any N >= 1).
GENERIC_EMBEDDING_PREFIX = "embedding-"


def embedding_sensor(channels: int, nodata: float | None = None) -> Sensor:
    """The band table of a generic per-pixel embedding product with `channels` channels."""
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= 4096:
        raise UnknownBandError(f"an embedding product has 1 to 4096 channels, got {channels!r}")
    return Sensor(f"{GENERIC_EMBEDDING_PREFIX}{channels}", _channels("E", channels, 3), dn_scale=1.0,
                  rgb=(), rgb_max_reflectance=1.0, nodata_dn=nodata, product="raster-embedding")


@dataclass(frozen=True)
class ProductNote:
    """What a front end shows beside a table of published embeddings: the product and the
    attribution line its licence asks for (docs/products.md says where each line comes from)."""

    product: str
    name: str
    attribution: str


PRODUCT_NOTES: dict[str, ProductNote] = {
    "aef": ProductNote("aef", "AlphaEarth Foundations Satellite Embedding (CC-BY 4.0)",
                       "The AlphaEarth Foundations Satellite Embedding dataset is produced by Google and "
                       "Google DeepMind."),
    "tessera": ProductNote("tessera", "TESSERA embeddings (CC-BY)",
                           "Contains TESSERA embeddings by the University of Cambridge (geotessera), CC-BY."),
    "major-tom": ProductNote("major-tom", "Major TOM embeddings",
                             "Contains Major TOM embeddings (ESA Phi-lab and partners); see the dataset card for "
                             "the licence of the set used."),
    "clay": ProductNote("clay", "Clay embeddings",
                        "Contains embeddings published by the Clay project; see the release for its licence."),
    "earth-index": ProductNote("earth-index", "Earth Index embeddings (CC-BY)",
                               "Contains Earth Index embeddings by Earth Genome, CC-BY."),
}


def product_note(product: str, label: str | None = None) -> ProductNote:
    """The note of a known product; for others, its name and a reminder to credit its makers."""
    return PRODUCT_NOTES.get(product) or ProductNote(
        product, label or product, "Published embeddings: credit their makers as their licence asks.")


SENSORS: dict[str, Sensor] = {
    s.name: s for s in (SENTINEL2_L1C, SENTINEL2_L2A, LANDSAT_C2_L2, NAIP, RGB8, AEF, TESSERA)
}


def get_sensor(name: str) -> Sensor:
    if name.startswith(GENERIC_EMBEDDING_PREFIX) and name[len(GENERIC_EMBEDDING_PREFIX):].isdigit():
        return embedding_sensor(int(name[len(GENERIC_EMBEDDING_PREFIX):]))
    try:
        return SENSORS[name]
    except KeyError:
        raise UnknownBandError(
            f"unknown sensor {name!r}; known sensors: {', '.join(sorted(SENSORS))}, embedding-N"
        ) from None


#: Sentinel-2's atmospheric bands (aerosol, water vapour, cirrus) say little about the ground.
_SKIPPED_BY_DEFAULT = {"coastal", "nir09", "cirrus"}


def default_bands(sensor: Sensor) -> list[str]:
    """The surface bands an index uses unless told otherwise."""
    bands = [b.name for b in sensor.bands if b.name not in _SKIPPED_BY_DEFAULT]
    return bands or sensor.band_names
