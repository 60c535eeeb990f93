"""`chipscout.indexer.geo`: the one parser each for a bbox, an instant and an interval."""

from datetime import date, datetime, timezone

import pytest

from chipscout.indexer.errors import QueryError, StacSearchError
from chipscout.indexer.geo import BBox, as_utc, format_interval, parse_bbox, parse_datetime, parse_interval


def test_bboxes_parse_from_text_numbers_or_a_bbox():
    box = BBox(-76.0, 37.5, -75.5, 38.0)
    assert parse_bbox("-76, 37.5, -75.5, 38") == parse_bbox((-76, 37.5, -75.5, 38)) == parse_bbox(box) == box
    assert BBox.parse("-76,37.5,-75.5,38").as_tuple() == (-76.0, 37.5, -75.5, 38.0)


@pytest.mark.parametrize("text, message", [
    ("1,2,3", "MINLON"), ("a,b,c,d", "four numbers"), ("nan,0,1,1", "finite"),
    ("0,0,200,10", "longitudes"), ("0,-95,10,10", "latitudes"), ("10,10,5,20", "inverted"),
])
def test_bad_bboxes_say_what_is_wrong(text, message):
    with pytest.raises(QueryError, match=message):
        parse_bbox(text)
    with pytest.raises(StacSearchError, match=message):
        parse_bbox(text, "--bbox", StacSearchError)


def test_instants_are_aware_utc():
    assert parse_datetime("2024-06-01") == datetime(2024, 6, 1, tzinfo=timezone.utc)
    assert parse_datetime("2024-06-01T12:00:00+02:00") == datetime(2024, 6, 1, 10, tzinfo=timezone.utc)
    assert parse_datetime("2024:06:01 10:30:00").hour == 10  # TIFF's own format
    assert as_utc(date(2024, 6, 1), end_of_day=True) == datetime(2024, 6, 1, 23, 59, 59, 999999, tzinfo=timezone.utc)
    assert as_utc(datetime(2024, 6, 1, 5)) == datetime(2024, 6, 1, 5, tzinfo=timezone.utc)
    assert as_utc("2024-06-01T05:00:00", end_of_day=True).hour == 5  # a time is not a bare date
    assert as_utc(None) is None and as_utc("") is None
    with pytest.raises(QueryError, match="bad start date"):
        as_utc("yesterday", "start date")
    with pytest.raises(QueryError, match="bad start date"):
        as_utc(3, "start date")


def test_intervals_follow_stac():
    start, end = parse_interval("2024-06/..")
    assert start == datetime(2024, 6, 1, tzinfo=timezone.utc) and end is None
    assert format_interval(*parse_interval("2024")) == "2024-01-01T00:00:00Z/2024-12-31T23:59:59.999999Z"
    assert format_interval(*parse_interval("2024-06-15T10:30:00Z")) == "2024-06-15T10:30:00Z"
    for bad in ("2024-06-01/2024-05-01", "last summer", "a/b/c", "../..", ".."):
        with pytest.raises(QueryError, match="bad datetime"):
            parse_interval(bad)
