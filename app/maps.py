"""pydeck maps for the app: chip footprints coloured by similarity, with the chips' own thumbnails
drawn at their footprints, so the map shows imagery even with no basemap (and works offline).

Pure functions from search-API records to `pydeck.Deck` objects; no Streamlit here.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pydeck as pdk
from PIL import Image
from shapely.geometry import Polygon

from chipscout.indexer.errors import BasemapError
from chipscout.indexer.search import ChipRecord, SearchResult
from chipscout.indexer.seedsets import NEGATIVE, POSITIVE

#: Layer ids the page reads selections from.
RESULTS_LAYER, QUERY_LAYER, CHIPS_LAYER, PROPOSALS_LAYER = "results", "query", "chips", "proposals"
OSM_TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
#: Viridis stops, low to high similarity.
_RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
QUERY_COLOUR = (255, 0, 200)
CHIP_COLOUR = (200, 200, 200)
GALLERY_COLOUR = (255, 140, 0)
#: Look-alikes labelled in the open labelling session: the colours of the label buttons.
LABEL_COLOURS = {POSITIVE: (46, 125, 50), NEGATIVE: (198, 40, 40)}
#: Labelled footprints are filled more than the others, so the label shows over the thumbnail.
LABEL_FILL_ALPHA = 110
#: Side of the small thumbnails drawn as a mosaic under the maps (about 1 KB each as PNG).
MOSAIC_SIZE_PX = 24
MAP_HEIGHT_PX = 520
# The template is HTML and each {field} is put in as text: the chip id gets its own line, and a long
# id wraps inside the map instead of running off its edge.
_TOOLTIP_HTML = "{label}<br/>{chip_id}"
_TOOLTIP_STYLE = {"backgroundColor": "#222", "color": "#fff", "fontSize": "12px", "maxWidth": "260px",
                  "whiteSpace": "normal", "overflowWrap": "anywhere"}


def basemap_style(url: str | None) -> str | None:
    """A map style URL for pydeck's `map_style`, or None for no basemap.

    An XYZ raster template (`https://host/{z}/{x}/{y}.png`) becomes an inline (data: URI) style with
    one raster source; an http(s) URL without `{z}` is taken as a style document (style.json).
    """
    text = (url or "").strip()
    if not text or text.lower() == "none":
        return None
    if not text.startswith(("http://", "https://")):
        raise BasemapError(f"basemap {text!r} is not an http(s) URL")
    if all(part in text for part in ("{z}", "{x}", "{y}")):
        style = {"version": 8,
                 "sources": {"basemap": {"type": "raster", "tiles": [text], "tileSize": 256, "maxzoom": 19}},
                 "layers": [{"id": "basemap", "type": "raster", "source": "basemap"}]}
        encoded = base64.b64encode(json.dumps(style).encode()).decode()
        return f"data:application/json;base64,{encoded}"
    if any(part in text for part in ("{z}", "{x}", "{y}")):
        raise BasemapError(f"basemap template {text!r} needs all of {{z}}, {{x}} and {{y}}")
    return text


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def small_png(png: bytes, size_px: int = MOSAIC_SIZE_PX) -> bytes:
    """A thumbnail shrunk for the map mosaic, so hundreds of chips fit in one page update."""
    with Image.open(io.BytesIO(png)) as image:
        small = image.convert("RGB").resize((size_px, size_px), Image.Resampling.BOX)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def footprint_corners(footprint: Polygon) -> list[list[float]]:
    """[bottom-left, top-left, top-right, bottom-right] lon/lat corners, the order BitmapLayer takes.

    Chips are squares in their native CRS, so their lon/lat footprints are slightly rotated
    quadrilaterals; drawing the thumbnail on the four corners keeps it exactly on the footprint.
    """
    points = list(footprint.exterior.coords)[:-1]
    if len(points) != 4:
        min_lon, min_lat, max_lon, max_lat = footprint.bounds
        return [[min_lon, min_lat], [min_lon, max_lat], [max_lon, max_lat], [max_lon, min_lat]]
    by_lat = sorted(points, key=lambda p: p[1])
    bottom_left, bottom_right = sorted(by_lat[:2])
    top_left, top_right = sorted(by_lat[2:])
    return [list(bottom_left), list(top_left), list(top_right), list(bottom_right)]


def similarity_colour(similarity: float, low: float, high: float) -> tuple[int, int, int]:
    """A viridis colour for a similarity, stretched over the range shown (scores often bunch near 1)."""
    share = 1.0 if high - low < 1e-12 else min(max((similarity - low) / (high - low), 0.0), 1.0)
    position = share * (len(_RAMP) - 1)
    index = min(int(position), len(_RAMP) - 2)
    blend = position - index
    start, end = _RAMP[index], _RAMP[index + 1]
    return tuple(round(a + (b - a) * blend) for a, b in zip(start, end))  # type: ignore[return-value]


def colour_hex(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb[:3])


def _date(chip: ChipRecord) -> str:
    return chip.acquired.date().isoformat() if chip.acquired else "date unknown"


def _row(chip: ChipRecord, colour: Sequence[int], label: str, fill_alpha: int, line_alpha: int = 255) -> dict:
    return {"chip_id": chip.chip_id, "polygon": [list(p) for p in chip.footprint.exterior.coords],
            "label": label, "line": [*colour[:3], line_alpha], "fill": [*colour[:3], fill_alpha]}


def result_rows(results: Sequence[SearchResult], labels: Mapping[str, str] | None = None) -> list[dict]:
    """Footprint rows of the look-alikes: viridis by similarity, or the label's colour for chips
    `labels` ({chip id: positive | negative}, the open session's) has a label for."""
    if not results:
        return []
    similarities = [r.similarity for r in results]
    low, high = min(similarities), max(similarities)
    rows = []
    for r in results:
        label = (labels or {}).get(r.chip.chip_id)
        text = f"#{r.rank} · similarity {r.similarity:.4f} · {_date(r.chip)}"
        if label in LABEL_COLOURS:
            rows.append(_row(r.chip, LABEL_COLOURS[label], f"{text} · labelled {label}",
                             LABEL_FILL_ALPHA))
        else:
            rows.append(_row(r.chip, similarity_colour(r.similarity, low, high), text, 40))
    return rows


@dataclass(frozen=True)
class View:
    longitude: float
    latitude: float
    zoom: float


def fit_view(bounds: Sequence[float], width_px: int = 900,
             height_px: int = MAP_HEIGHT_PX) -> View:
    """A web-mercator view showing the lon/lat box (min_lon, min_lat, max_lon, max_lat)."""
    min_lon, min_lat, max_lon, max_lat = bounds
    centre_lat = (min_lat + max_lat) / 2
    lon_span = max(max_lon - min_lon, 1e-6)
    lat_span = max((max_lat - min_lat) / max(math.cos(math.radians(centre_lat)), 0.01), 1e-6)
    # deck.gl (like Mapbox GL) draws the world 512 px wide at zoom 0.
    zoom = min(math.log2(width_px * 360 / (512 * lon_span)), math.log2(height_px * 360 / (512 * lat_span)))
    return View((min_lon + max_lon) / 2, centre_lat, round(min(max(zoom - 0.5, 1.0), 17.0), 2))


def _bounds(chips: Sequence[ChipRecord]) -> tuple[float, float, float, float]:
    boxes = [c.footprint.bounds for c in chips]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def thumbnail_layers(chips: Sequence[ChipRecord], thumbnails: Mapping[str, bytes | None]) -> list[pdk.Layer]:
    """One BitmapLayer per chip with a stored thumbnail, on the chip's footprint corners."""
    layers = []
    for chip in chips:
        png = thumbnails.get(chip.chip_id)
        if png:
            # Quoted so pydeck passes the data URI through instead of reading it as an accessor.
            layers.append(pdk.Layer("BitmapLayer", id=f"thumb-{chip.chip_id}", image=f"'{png_data_uri(png)}'",
                                    bounds=footprint_corners(chip.footprint)))
    return layers


def mosaic_layer(chips: Sequence[ChipRecord], small_pngs: Mapping[str, bytes], opacity: float = 1.0) -> pdk.Layer:
    """Many chips' small thumbnails as one IconLayer (one draw call instead of one layer per chip).

    Icons are axis-aligned squares of the chip's side in metres at its centre; the slight rotation of a
    UTM chip in lon/lat does not show at the zoom where a whole scene fits.
    """
    rows = []
    for chip in chips:
        png = small_pngs.get(chip.chip_id)
        if png:
            # 2% larger than the chip so neighbouring icons overlap instead of leaving hairline gaps.
            rows.append({"position": [chip.center_lon, chip.center_lat], "size_m": 1.02 * chip.size_px * chip.gsd_m,
                         "icon": {"url": png_data_uri(png), "id": chip.chip_id, "width": MOSAIC_SIZE_PX,
                                  "height": MOSAIC_SIZE_PX}})
    return pdk.Layer("IconLayer", id="mosaic", data=rows, get_icon="icon", get_position="position",
                     get_size="size_m", size_units="'meters'", billboard=False, opacity=opacity,
                     pickable=False)


def _deck(layers: list[pdk.Layer], chips: Sequence[ChipRecord], basemap_url: str | None,
          width_px: int) -> pdk.Deck:
    view = fit_view(_bounds(chips), width_px)
    style = basemap_style(basemap_url)
    map_options = {"map_provider": "carto", "map_style": style} if style else {"map_provider": None}
    return pdk.Deck(layers=layers, initial_view_state=pdk.ViewState(
        longitude=view.longitude, latitude=view.latitude, zoom=view.zoom, pitch=0, bearing=0),
        tooltip={"html": _TOOLTIP_HTML, "style": _TOOLTIP_STYLE}, **map_options)


def _polygon_layer(layer_id: str, rows: list[dict], line_width_px: float) -> pdk.Layer:
    return pdk.Layer("PolygonLayer", id=layer_id, data=rows, get_polygon="polygon", get_fill_color="fill",
                     get_line_color="line", line_width_units="'pixels'", get_line_width=line_width_px,
                     line_width_min_pixels=1, stroked=True, filled=True, pickable=True, auto_highlight=True)


def results_deck(query: ChipRecord, results: Sequence[SearchResult], thumbnails: Mapping[str, bytes | None],
                 basemap_url: str | None = None, show_thumbnails: bool = True, width_px: int = 650,
                 context: Sequence[ChipRecord] = (), context_pngs: Mapping[str, bytes] | None = None,
                 labels: Mapping[str, str] | None = None) -> pdk.Deck:
    """The example (magenta) and its look-alikes (viridis by similarity; green / red when `labels`
    marks them positive / negative) over their own thumbnails, on a faded mosaic of other chips
    (`context`) for orientation."""
    chips = [query, *(r.chip for r in results)]
    layers = []
    if show_thumbnails and context and context_pngs:
        layers.append(mosaic_layer(context, context_pngs, opacity=0.45))
    if show_thumbnails:
        layers += thumbnail_layers(chips, thumbnails)
    layers.append(_polygon_layer(RESULTS_LAYER, result_rows(results, labels), 2))
    layers.append(_polygon_layer(QUERY_LAYER, [
        _row(query, QUERY_COLOUR, f"example · {_date(query)}", 30)], 3))
    return _deck(layers, chips, basemap_url, width_px)


def overview_deck(chips: Sequence[ChipRecord], small_pngs: Mapping[str, bytes] | None = None,
                  highlighted: Sequence[str] = (), basemap_url: str | None = None, width_px: int = 1000) -> pdk.Deck:
    """Footprints of (a sample of) the table to click on, over a mosaic of their small thumbnails;
    `highlighted` chips (the gallery page) are outlined in orange."""
    layers = [mosaic_layer(chips, small_pngs)] if small_pngs else []
    marked = set(highlighted)
    rows = [_row(chip, GALLERY_COLOUR, f"{_date(chip)} · in the gallery", 10)
            if chip.chip_id in marked else
            _row(chip, CHIP_COLOUR, f"{_date(chip)} · click to search", 10, line_alpha=70)
            for chip in chips]
    # Highlighted last, so their outlines draw on top.
    rows.sort(key=lambda row: row["chip_id"] in marked)
    layers.append(_polygon_layer(CHIPS_LAYER, rows, 1))
    return _deck(layers, chips, basemap_url, width_px)


def proposals_deck(chips: Sequence[ChipRecord], captions: Sequence[str], thumbnails: Mapping[str, bytes | None],
                   labels: Mapping[str, str], basemap_url: str | None = None, show_thumbnails: bool = True,
                   context: Sequence[ChipRecord] = (), context_pngs: Mapping[str, bytes] | None = None,
                   width_px: int = 900) -> pdk.Deck:
    """A round's proposals where they lie: over their thumbnails, outlined orange until labelled,
    then green / red (`labels`), on a faded mosaic of other chips (`context`); `captions` (rank,
    score) are their tooltips."""
    layers = []
    if show_thumbnails and context and context_pngs:
        layers.append(mosaic_layer(context, context_pngs, opacity=0.45))
    if show_thumbnails:
        layers += thumbnail_layers(chips, thumbnails)
    rows = []
    for chip, caption in zip(chips, captions):
        label = labels.get(chip.chip_id)
        colour = LABEL_COLOURS.get(label, GALLERY_COLOUR)
        text = caption.replace("*", "") + (f" · labelled {label}" if label else " · click to search from it")
        rows.append(_row(chip, colour, text, LABEL_FILL_ALPHA if label else 30))
    layers.append(_polygon_layer(PROPOSALS_LAYER, rows, 2))
    return _deck(layers, chips, basemap_url, width_px)


def selected_chip_id(selection: Mapping | None, layer_ids: Sequence[str]) -> str | None:
    """The chip id of the object clicked on one of the layers, from a pydeck selection state."""
    if not selection:
        return None
    objects = (selection.get("selection") or {}).get("objects") or {}
    for layer_id in layer_ids:
        for picked in objects.get(layer_id) or []:
            chip_id = picked.get("chip_id") if isinstance(picked, Mapping) else None
            if chip_id:
                return str(chip_id)
    return None
