"""pydeck maps for the app: chip footprints coloured by similarity, with the chips' own thumbnails
drawn at their footprints, so the map shows imagery even with no basemap (and works offline).

Pure functions from search-API records to `pydeck.Deck` objects; no Streamlit here. Pictures go
into a deck through `image_src` (bytes -> what the browser loads): data URIs by default, short URLs
when the page serves them (`app/images.py`).
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
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
#: Side in pixels of a typical chip in the mosaic picture drawn under the maps.
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


def _small(png: bytes, size_px: int) -> Image.Image:
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").resize((size_px, size_px), Image.Resampling.BOX)


@dataclass(frozen=True)
class Mosaic:
    """Many chips' small thumbnails painted into one picture (`png`) that spans `bounds` (min lon,
    min lat, max lon, max lat): one BitmapLayer under both maps, one picture for the browser to fetch
    and keep, and no per-chip rows in a deck."""

    png: bytes
    bounds: tuple[float, float, float, float]


def _mercator_y(lat: float) -> float:
    lat = max(min(lat, 85.0), -85.0)
    return math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))


def mosaic(chips: Sequence[ChipRecord], thumbnails: Mapping[str, bytes | None], size_px: int = MOSAIC_SIZE_PX,
           max_side_px: int = 4096) -> Mosaic | None:
    """The chips' thumbnails on one transparent picture in web-mercator (what deck.gl stretches a
    BitmapLayer in), a typical chip `size_px` across; the picture's longer side at most `max_side_px`
    (chips far apart then get fewer pixels). None when no chip has a thumbnail.

    Each thumbnail fills its footprint's box; the slight rotation of a UTM chip in lon/lat does not
    show at the zoom where a whole scene fits."""
    drawn = [c for c in chips if thumbnails.get(c.chip_id)]
    if not drawn:
        return None
    min_lon, min_lat, max_lon, max_lat = _bounds(drawn)
    left, top = math.radians(min_lon), _mercator_y(max_lat)
    widths = sorted(math.radians(c.footprint.bounds[2] - c.footprint.bounds[0]) for c in drawn)
    scale = size_px / max(widths[len(widths) // 2], 1e-12)  # pixels per mercator unit
    spans = (math.radians(max_lon - min_lon), top - _mercator_y(min_lat))  # mercator units
    scale *= min(1.0, max_side_px / max(spans[0] * scale, spans[1] * scale, 1.0))
    sheet = Image.new("RGBA", (max(1, round(spans[0] * scale)), max(1, round(spans[1] * scale))), (0, 0, 0, 0))
    for chip in drawn:
        lon0, lat0, lon1, lat1 = chip.footprint.bounds
        x0, x1 = round((math.radians(lon0) - left) * scale), round((math.radians(lon1) - left) * scale)
        y0, y1 = round((top - _mercator_y(lat1)) * scale), round((top - _mercator_y(lat0)) * scale)
        box = (max(1, x1 - x0), max(1, y1 - y0))
        with Image.open(io.BytesIO(thumbnails[chip.chip_id])) as image:
            sheet.paste(image.convert("RGBA").resize(box, Image.Resampling.BOX), (x0, y0))
    out = io.BytesIO()
    sheet.save(out, format="PNG", optimize=True)
    return Mosaic(out.getvalue(), (min_lon, min_lat, max_lon, max_lat))


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


#: Decimals of the lon/lat sent to the browser: 1e-6 degrees is about 0.1 m, far below a pixel.
COORD_DECIMALS = 6


def _lonlat(point: Sequence[float]) -> list[float]:
    return [round(point[0], COORD_DECIMALS), round(point[1], COORD_DECIMALS)]


def _row(chip: ChipRecord, colour: Sequence[int], label: str, fill_alpha: int, line_alpha: int = 255) -> dict:
    return {"chip_id": chip.chip_id, "polygon": [_lonlat(p) for p in chip.footprint.exterior.coords],
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


ImageSource = Callable[[bytes], str]


def thumbnail_layers(chips: Sequence[ChipRecord], thumbnails: Mapping[str, bytes | None],
                     image_src: ImageSource = png_data_uri) -> list[pdk.Layer]:
    """One BitmapLayer per chip with a stored thumbnail, on the chip's footprint corners."""
    layers = []
    for chip in chips:
        png = thumbnails.get(chip.chip_id)
        if png:
            # Quoted so pydeck passes the URL through instead of reading it as an accessor.
            layers.append(pdk.Layer("BitmapLayer", id=f"thumb-{chip.chip_id}", image=f"'{image_src(png)}'",
                                    bounds=footprint_corners(chip.footprint)))
    return layers


def mosaic_layer(picture: Mosaic, opacity: float = 1.0, image_src: ImageSource = png_data_uri) -> pdk.Layer:
    """The mosaic picture on its bounds (one layer, one picture, whatever the number of chips)."""
    min_lon, min_lat, max_lon, max_lat = picture.bounds
    return pdk.Layer("BitmapLayer", id="mosaic", image=f"'{image_src(picture.png)}'",
                     bounds=[min_lon, min_lat, max_lon, max_lat], opacity=opacity, pickable=False)


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
                 context_mosaic: Mosaic | None = None,
                 labels: Mapping[str, str] | None = None, image_src: ImageSource = png_data_uri) -> pdk.Deck:
    """The example (magenta) and its look-alikes (viridis by similarity; green / red when `labels`
    marks them positive / negative) over their own thumbnails, on a faded mosaic of other chips
    (`context_mosaic`) for orientation."""
    chips = [query, *(r.chip for r in results)]
    layers = []
    if show_thumbnails and context_mosaic is not None:
        layers.append(mosaic_layer(context_mosaic, opacity=0.45, image_src=image_src))
    if show_thumbnails:
        layers += thumbnail_layers(chips, thumbnails, image_src)
    layers.append(_polygon_layer(RESULTS_LAYER, result_rows(results, labels), 2))
    layers.append(_polygon_layer(QUERY_LAYER, [
        _row(query, QUERY_COLOUR, f"example · {_date(query)}", 30)], 3))
    return _deck(layers, chips, basemap_url, width_px)


def overview_deck(chips: Sequence[ChipRecord], picture: Mosaic | None = None,
                  highlighted: Sequence[str] = (), basemap_url: str | None = None, width_px: int = 1000,
                  image_src: ImageSource = png_data_uri) -> pdk.Deck:
    """Footprints of (a sample of) the table to click on, over a mosaic of their small thumbnails;
    `highlighted` chips (the gallery page) are outlined in orange."""
    layers = [mosaic_layer(picture, image_src=image_src)] if picture is not None else []
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
                   context_mosaic: Mosaic | None = None,
                   width_px: int = 900, image_src: ImageSource = png_data_uri) -> pdk.Deck:
    """A round's proposals where they lie: over their thumbnails, outlined orange until labelled,
    then green / red (`labels`), on a faded mosaic of other chips (`context_mosaic`); `captions` (rank,
    score) are their tooltips."""
    layers = []
    if show_thumbnails and context_mosaic is not None:
        layers.append(mosaic_layer(context_mosaic, opacity=0.45, image_src=image_src))
    if show_thumbnails:
        layers += thumbnail_layers(chips, thumbnails, image_src)
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
