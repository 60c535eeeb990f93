"""The app's settings and their round trip through URL query parameters (pure, no Streamlit)."""

from datetime import date

import pytest

from chipscout.app.state import Settings, from_query_params, search_filters, to_query_params
from chipscout.indexer.errors import QueryError


def test_defaults_make_a_short_link():
    assert to_query_params(Settings(table="demo")) == {"table": "demo"}


def test_every_setting_survives_the_round_trip():
    settings = Settings(table="summer", chip_id="A_r000064_c000064_s64", k=30, date_from=date(2024, 6, 1),
                        date_to=date(2024, 8, 31), bbox="-76,37,-75,38", max_cloud=0.2, max_nodata=0.1,
                        exclude_overlap=False, spread_km=2.5, per_cell=3, expand=5, min_similarity=0.99875)
    params = to_query_params(settings)
    assert params["chip"] == settings.chip_id and params["overlap"] == "0" and params["from"] == "2024-06-01"
    assert from_query_params(params, "chips") == (settings, [])


def test_bad_values_in_a_link_fall_back_to_defaults_with_a_reason():
    settings, problems = from_query_params(
        {"table": "t", "chip": "x'; DROP", "k": "5000", "from": "June", "bbox": "1,2,3", "cloud": "2",
         "overlap": "maybe", "spread_km": "nan", "per_cell": "0", "min_sim": "high", "expand": "21"},
        "chips")
    assert settings == Settings(table="t")
    assert len(problems) == 10 and all(p.startswith("ignored `") for p in problems)


def test_an_inverted_date_range_from_a_link_is_dropped():
    settings, problems = from_query_params({"from": "2024-09-01", "to": "2024-06-01"}, "chips")
    assert settings.date_from is None and settings.date_to is None and "after" in problems[0]


def test_filters_leave_out_settings_at_their_off_values():
    filters = search_filters(Settings(table="t"))
    assert filters.max_cloud_fraction is None and filters.max_nodata_fraction is None and filters.bbox is None
    assert filters.exclude_overlapping is True
    typed = search_filters(Settings(table="t", bbox=" -76, 37, -75, 38 ", max_cloud=0.3, date_to=date(2024, 6, 1)))
    assert typed.bbox.as_tuple() == (-76, 37, -75, 38) and typed.max_cloud_fraction == 0.3
    assert typed.date_to.hour == 23  # a bare end date covers its whole day


def test_a_bad_typed_bbox_is_a_query_error():
    with pytest.raises(QueryError, match="bbox"):
        search_filters(Settings(table="t", bbox="-75,38,-76,37"))


@pytest.mark.parametrize("name", ["from", "to"])
@pytest.mark.parametrize("day", ["0001-01-01", "9999-12-31"])
def test_a_link_date_outside_the_date_widgets_range_is_refused_with_a_reason(name, day):
    settings, problems = from_query_params({name: day}, "chips")
    assert settings == Settings(table="chips") and problems == [
        f"ignored `{name}={day}` from the link: must be within 1970\\-01\\-01\\.\\.2100\\-12\\-31"]


HOSTILE = ["a`b [x](http://evil.example) c", "``k`` ![i](http://evil.example/i.png)", "<img src=x onerror=alert(1)>",
           "line\n# heading\n[x](http://evil.example)", "`", "x\\`<b>bold</b>`"]


@pytest.mark.parametrize("value", HOSTILE)
def test_rejected_link_values_render_as_literal_text_not_markdown(value):
    # Streamlit renders st.warning as CommonMark (+ GFM); parse ours with HTML on, the worst case.
    from markdown_it import MarkdownIt

    from chipscout.app.state import markdown_text

    markdown = MarkdownIt("commonmark", {"html": True})
    _, problems = from_query_params({"chip": value, "k": value, "bbox": value}, "chips")
    assert len(problems) == 3
    for problem in problems + [markdown_text(value)]:
        html = markdown.render(problem)
        assert html.count("<p>") == 1 and "<a " not in html and "<img" not in html and "<b>" not in html
        assert "<h1>" not in html and "\n" not in html.strip()
    for problem in problems:  # bare URLs too (GFM links them): only inside code spans
        assert "://" not in problem.split("from the link:")[1]
    first = markdown.render(problems[0])
    code = first[first.index("<code>") + 6:first.index("</code>")]
    assert code.strip() == ("chip=" + value).replace("\n", "\\n").replace("&", "&amp;").replace(
        "<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
