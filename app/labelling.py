"""Seed-set labelling in the app: the session picker, label buttons, rounds, metrics and downloads.

A thin Streamlit layer over `chipscout.indexer.seedsets` (sessions and labels; rankings, rounds and
metrics; GeoJSON / GeoParquet export). Labels are read from the store on every run and
never kept in `st.session_state`, so a label given in another browser tab shows on the next rerun.
A label button acts on the label the page showed: if the store holds another one by the time of the
click (another tab or a script labelled that chip meanwhile), the click changes nothing and says so,
so no tab overwrites a label it has not seen.

The page draws in fragments (`st.fragment`): the session picker in the sidebar (`sidebar`), the
panel with the example and its look-alikes, and the gallery. A label click reruns only the
fragments that show that chip or the session's counts (`label_buttons`, `start_fragment`), so the rest of
the page is neither rebuilt nor re-sent; each fragment reads the open session's labels itself
(`open_seed`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import streamlit as st

from chipscout.app.state import code_span, markdown_text
from chipscout.indexer import seedsets
from chipscout.indexer.errors import ChipscoutError
from chipscout.indexer.search import ChipRecord, SearchEngine, SearchFilters
from chipscout.indexer.seedsets import (FORMATS, NEGATIVE, POSITIVE, ExportSummary, Label, LabelStore, Session,
                                        default_user, export_formats)

# st.session_state keys (per-session widgets add `-<session id>` to theirs).
SESSION = "label_session"
"""The picker's value: the open session's id, or "" when labelling is off."""
NOTICES = "label_notices"
"""[(kind, text, toast)] written by callbacks, shown once at the top of the next run."""
SHOWN_ROUND = "label_shown_round"
"""(session id, seedsets.Proposals, recorded?) shown as the proposals grid."""
MEASURED = "label_measured"
"""(session id, labels fingerprint, seedsets.SeedSetMetrics) from "Measure now"."""
CONFIRM_DELETE = "label_confirm_delete"
"""The id of the session waiting for "Yes, delete"."""
LABELLED_BY = "label_by"
FROM_LINK = "label_session_from_link"
"""The session id the page's link named on its first run, until the picker has checked it."""
LINK_PARAM = "session"
"""The URL parameter of the open session."""
SIDEBAR_FRAGMENT = "seed-sidebar"
"""The key of the sidebar's session fragment (picker and counts), rerun with every label click."""
PANEL_FRAGMENT = "panel"
"""The key of the page's fragment that holds `panel` (the session's figures), rerun with every label click."""
SHOWN_IN = "label_shown_in"
"""{fragment key: ids of the chips it drew label buttons for in its last run}: the other parts of the
page a label click must redraw."""

STRATEGIES = {
    "auto": "auto: the strongest the labels allow",
    "single": "single: the example chip (else the first positive)",
    "mean": "mean of the positives",
    "rocchio": "Rocchio: positives − β × negatives",
    "classifier": "classifier: logistic regression on the labels",
}
DOWNLOADS = {"geojson": ("GeoJSON", "geojson", "application/geo+json"),
             "geoparquet": ("GeoParquet", "parquet", "application/vnd.apache.parquet")}
# Material icons, not emoji: Streamlit ships their font, so they show on machines without emoji fonts.
# Words, not Material icons: a screen reader announces an icon by its ligature text ("thumb_up"),
# and emoji need a font that headless and minimal Linux browsers lack.
ICONS = {POSITIVE: "Yes", NEGATIVE: "No"}
BADGES = {POSITIVE: ":green-badge[positive]", NEGATIVE: ":red-badge[negative]", None: ":gray-badge[unlabelled]"}
#: The highlighted (current-label) button is green for positive, red for negative. Keyed elements
#: carry an `st-key-<key>` class; label buttons' keys are `label-<grid>-<label>-<chip id>`.
BUTTON_STYLE = """<style>
div[class*="st-key-label-"][class*="-positive-"] button[kind="primary"] {background: #2e7d32; border-color: #2e7d32;}
div[class*="st-key-label-"][class*="-negative-"] button[kind="primary"] {background: #c62828; border-color: #c62828;}
</style>"""
DEFAULT_PROPOSALS = 12


@dataclass(frozen=True)
class Seed:
    """The open session and its labels, as the store had them at the start of this run."""

    store: LabelStore
    session: Session
    labels: dict[str, Label]

    def label_of(self, chip_id: str) -> str | None:
        label = self.labels.get(chip_id)
        return label.label if label else None

    @property
    def label_map(self) -> dict[str, str]:
        """{chip id: positive | negative} (what the maps colour footprints by)."""
        return {chip_id: label.label for chip_id, label in self.labels.items()}

    @property
    def counts(self) -> tuple[int, int]:
        positives = sum(label.is_positive for label in self.labels.values())
        return positives, len(self.labels) - positives

    def map_legend(self, chip_ids: Sequence[str]) -> str:
        """The legend line of a map showing `chip_ids`: how many of them this session labelled, and how."""
        shown = [self.label_of(chip_id) for chip_id in chip_ids]
        return (f"Labelled in “{markdown_text(self.session.name)}”: :green[{shown.count(POSITIVE)} positive] filled green, "
                f":red[{shown.count(NEGATIVE)} negative] filled red.")

    @property
    def fingerprint(self) -> str:
        """Changes whenever a label, the session's name or its round does (keys cached exports)."""
        text = repr((self.session.name, self.session.current_round, self.session.strategy,
                     sorted((c, x.label, x.labelled_at.isoformat(), x.round) for c, x in self.labels.items())))
        return hashlib.sha1(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- messages from callbacks
def notice(kind: str, text: str, toast: bool = False) -> None:
    """Queue a message (`kind`: error, warning, info or success) for the top of the next run."""
    st.session_state.setdefault(NOTICES, []).append((kind, text, toast))


def show_notices() -> None:
    for kind, text, toast in st.session_state.pop(NOTICES, []):
        getattr(st, kind)(text)
        if toast:  # the click may have come from far down the page
            st.toast(text, icon=":material/warning:" if kind in ("warning", "error") else ":material/check_circle:")


def _labelled_by() -> str | None:
    return str(st.session_state.get(LABELLED_BY) or "").strip() or None


# ----------------------------------------------------------------------------- the sidebar: sessions
def open_from_link(session_id: str | None) -> None:
    """Open the session a shared link names (checked against the store by `sidebar`)."""
    if session_id and session_id.strip():
        st.session_state[SESSION] = st.session_state[FROM_LINK] = session_id.strip()


@st.fragment(key=SIDEBAR_FRAGMENT)
def sidebar(engine: SearchEngine) -> None:
    """The session picker with each session's counts, new/rename/delete. A fragment: a label click
    reruns it for the new counts; what changes the open session reruns the whole page."""
    st.header("Seed set")
    try:
        store = LabelStore.for_engine(engine)
        sessions = store.sessions()
        counts = store.counts_by_session()
    except ChipscoutError as err:
        st.caption(f"Labelling is unavailable: {err}")
        return
    by_id = {s.session_id: s for s in sessions}
    from_link = st.session_state.pop(FROM_LINK, None)
    if st.session_state.get(SESSION) and st.session_state[SESSION] not in by_id:
        if from_link:
            notice("warning", f"The link names labelling session {code_span(from_link)}, which table "
                              f"`{engine.table_name}` does not have (deleted, or another table's); "
                              "labelling is off.")
        else:
            notice("warning", "The labelling session open in this tab no longer exists: it was deleted in "
                              "another tab or by a script, with its labels.")
        st.session_state[SESSION] = ""

    def describe(session_id: str) -> str:
        if not session_id:
            return "none (labelling off)"
        tally = counts.get(session_id, {})
        session = by_id[session_id]
        # Short, so the sidebar's box shows it whole; the caption below spells it out.
        return (f"{session.name} ({tally.get(POSITIVE, 0)}+ {tally.get(NEGATIVE, 0)}− · "
                f"r{session.current_round})")

    # The browser shows the text the option had when picked; setting the value again every run makes it
    # redraw the current text (counts, a rename from another tab). A value set this way wins over the
    # widget's, which is the same value here.
    st.session_state[SESSION] = st.session_state.get(SESSION, "")
    st.selectbox("Labelling session", ["", *by_id], format_func=describe, key=SESSION, on_change=_session_changed,
                 help="Labels go into this session; each line counts its labels.")
    with st.expander("New session", expanded=not sessions):
        st.text_input("Name", key="label_new_name", placeholder="e.g. solar farms", max_chars=100)
        st.button("Create session", on_click=_create_session, args=(store,))

    chosen = st.session_state.get(SESSION)
    if not chosen:
        st.caption("Open or create a session to label chips: Yes / No buttons (positive / negative) then appear under every thumbnail.")
        return
    session = by_id[chosen]
    tally = counts.get(chosen, {})
    st.caption(f"**{session.name}**: {tally.get(POSITIVE, 0)} positive, {tally.get(NEGATIVE, 0)} negative, "
               f"round {session.current_round}")
    with st.expander("Rename or delete"):
        st.text_input("New name", key="label_rename_to", placeholder=session.name, max_chars=100)
        st.button("Rename", on_click=_rename_session, args=(store, session))
        st.button("Delete session…", on_click=_ask_delete, args=(session.session_id,))
    if st.session_state.get(CONFIRM_DELETE) == session.session_id:
        st.warning(f"Delete session “{markdown_text(session.name)}” and its {sum(tally.values())} labels? This cannot be undone.")
        yes, no = st.columns(2)
        yes.button("Yes, delete", type="primary", on_click=_delete_session, args=(store, session))
        no.button("Cancel", on_click=_cancel_delete)
    st.session_state.setdefault(LABELLED_BY, default_user())
    st.text_input("Labelled by", key=LABELLED_BY, max_chars=100, help="Stored with every label you give.")


def open_seed(engine: SearchEngine) -> Seed | None:
    """The session open in this tab with its labels as the store has them now; None when labelling
    is off or the session is gone (the sidebar says why)."""
    chosen = st.session_state.get(SESSION)
    if not chosen:
        return None
    try:
        store = LabelStore.for_engine(engine)
        session = store.session(chosen)
        return Seed(store, session, {label.chip_id: label for label in store.labels(session)})
    except ChipscoutError:
        return None


def _session_changed() -> None:
    st.session_state.pop(CONFIRM_DELETE, None)
    st.rerun()  # the picker is in a fragment; another session changes the whole page


def _create_session(store: LabelStore) -> None:
    name = str(st.session_state.get("label_new_name") or "")
    try:
        session = store.create_session(name, created_by=_labelled_by())
    except ChipscoutError as err:
        notice("error", f"Cannot create the session: {err}")
        return
    st.session_state[SESSION] = session.session_id
    st.session_state.label_new_name = ""
    notice("success", f"Created session “{markdown_text(session.name)}”. Label chips with the Yes / No "
                      "buttons under any thumbnail, then click Next round.")
    st.rerun()


def _rename_session(store: LabelStore, session: Session) -> None:
    try:
        renamed = store.rename_session(session, str(st.session_state.get("label_rename_to") or ""))
    except ChipscoutError as err:
        notice("error", f"Cannot rename the session: {err}")
        return
    st.session_state.label_rename_to = ""
    notice("success", f"Renamed session “{markdown_text(session.name)}” to “{markdown_text(renamed.name)}”.")
    st.rerun()


def _ask_delete(session_id: str) -> None:
    st.session_state[CONFIRM_DELETE] = session_id


def _cancel_delete() -> None:
    st.session_state.pop(CONFIRM_DELETE, None)


def _delete_session(store: LabelStore, session: Session) -> None:
    st.session_state.pop(CONFIRM_DELETE, None)
    try:
        count = store.delete_session(session)
    except ChipscoutError as err:
        notice("error", f"Cannot delete the session: {err}")
        return
    st.session_state[SESSION] = ""
    notice("success", f"Deleted session “{markdown_text(session.name)}” and its {count} labels.")
    st.rerun()


# ----------------------------------------------------------------------------- label buttons
def start_fragment(fragment: str) -> None:
    """Call first in a page fragment that draws label buttons: forgets the chips its last run showed."""
    st.session_state.setdefault(SHOWN_IN, {})[fragment] = set()


def label_buttons(seed: Seed, chip_id: str, key: str, *, score: float | None = None,
                  strategy: str | None = None, fragment: str | None = None) -> None:
    """The chip's label, and thumbs-up / thumbs-down buttons: the one matching the label is highlighted,
    and clicking it again clears the label. `score` and `strategy`: the ranking the chip was shown in,
    stored with the label. `fragment`: the page fragment drawing the buttons (see `start_fragment`);
    a click then reruns only the fragments showing this chip or the session's counts, else the page."""
    if fragment:
        st.session_state.setdefault(SHOWN_IN, {}).setdefault(fragment, set()).add(chip_id)
    shown = seed.label_of(chip_id)
    st.markdown(BADGES[shown])
    for column, label in zip(st.columns(2, gap="small"), (POSITIVE, NEGATIVE)):
        active = shown == label
        column.button(ICONS[label], key=f"label-{key}-{label}-{chip_id}",
                      type="primary" if active else "secondary",
                      help=f"Clear the {label} label of {chip_id}" if active else f"Label {chip_id} {label}",
                      on_click=_label_clicked, width="stretch",
                      args=(seed.store, seed.session, chip_id, shown, None if active else label, score, strategy,
                            fragment))


def _label_clicked(store: LabelStore, session: Session, chip_id: str, shown: str | None, wanted: str | None,
                   score: float | None, strategy: str | None, fragment: str | None = None) -> None:
    try:
        now = store.label_map(session).get(chip_id)
        if now != shown:
            notice("warning", f"`{chip_id}` was {f'labelled {now}' if now else 'unlabelled'} elsewhere (another "
                              "tab or a script) after this page showed it, so your click changed nothing. "
                              "Its current label is shown now; click again to change it.", toast=True)
        elif wanted is None:
            store.remove_labels(session, [chip_id])
        else:
            store.set_label(session, chip_id, wanted, score=score, strategy=strategy, origin="app",
                            by=_labelled_by())
    except ChipscoutError as err:
        notice("error", f"Cannot label `{chip_id}`: {err}", toast=True)
    if fragment:  # only the parts of the page this label shows in (BENCHMARKS.md, app latency)
        showing = [key for key, chip_ids in st.session_state.get(SHOWN_IN, {}).items() if chip_id in chip_ids]
        st.rerun(list(dict.fromkeys((SIDEBAR_FRAGMENT, PANEL_FRAGMENT, fragment, *showing))))


# ----------------------------------------------------------------------------- the seed-set panel
def panel(seed: Seed, engine: SearchEngine, example_id: str | None,
          grid: Callable[[Sequence[ChipRecord], list[str], str, dict[str, float], str], None],
          filters: SearchFilters | None = None, fragment: str | None = None) -> None:
    """The open session's figures, the round controls, the proposals (drawn by `grid(chips, captions,
    key, scores, strategy)`) and the downloads. Rounds propose only chips `filters` (the sidebar's
    dates, area and quality limits) allow. `fragment`: the page fragment the panel is drawn in,
    rerun with the sidebar's when a round starts."""
    st.html(BUTTON_STYLE)
    st.subheader(f"Seed set · {markdown_text(seed.session.name)}")
    _metrics(seed, engine)
    # Proposals come from several seeds, not one example chip: there is no footprint to avoid.
    filters = replace(filters, exclude_overlapping=False) if filters is not None else None
    _round_controls(seed, engine, example_id, filters, fragment)
    _proposals(seed, grid)
    _downloads(seed, engine)


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _metrics(seed: Seed, engine: SearchEngine) -> None:
    positives, negatives = seed.counts
    measured = st.session_state.get(MEASURED)
    rounds = seed.store.rounds(seed.session)
    if measured and measured[:2] == (seed.session.session_id, seed.fingerprint):
        metrics, source = measured[2], "Measured just now on the current labels"
    elif rounds:
        metrics = seedsets.recorded_metrics(seed.session.name, rounds[-1])
        source = (f"Measured when round {metrics.round} started, on {metrics.n_positive} positive and "
                  f"{metrics.n_negative} negative labels")
    else:
        metrics, source = None, "No round yet"
    validation = metrics.cross_validation if metrics else None
    change = metrics.ranking_change if metrics else None
    columns = st.columns(6)
    columns[0].metric("Round", seed.session.current_round, help="0 while seeding; each Next round adds one.")
    columns[1].metric("Positives", positives)
    columns[2].metric("Negatives", negatives)
    columns[3].metric("CV precision", _figure(validation.precision if validation else None),
                      help="Cross-validated precision of a classifier trained on the labels.")
    columns[4].metric("CV recall", _figure(validation.recall if validation else None),
                      help="Cross-validated recall of a classifier trained on the labels.")
    columns[5].metric("Ranking overlap", _figure(change.jaccard if change else None),
                      help="Jaccard overlap of the still-unlabelled top of the ranking with the previous "
                           "round's (1 = it stopped moving).")
    if metrics is None:
        lines = ["No round yet: label a few chips (at least one positive), then click **Next round**, or "
                 "**Measure now**."]
    else:
        lines = [f"{source}."]
        if validation.method:
            lines.append(f"Classifier cross-validated {validation.method}"
                         + (f" ({validation.note})" if validation.note else "") + ".")
        else:
            lines.append(f"Classifier precision and recall: {validation.note}.")
        if change.jaccard is not None:
            correlation = "" if change.rank_correlation is None else f", Spearman {change.rank_correlation:.2f}"
            lines.append(f"Ranking vs round {change.previous_round}: Jaccard {change.jaccard:.2f}{correlation}.")
        else:
            lines.append(f"Ranking change: {change.note}.")
    text_column, button_column = st.columns([5, 1])
    text_column.caption(" ".join(lines))
    button_column.button("Measure now", on_click=_measure, args=(seed, engine), width="stretch",
                         help="Cross-validate and compare the ranking with the last round on the current labels.")


def _round_options(session_id: str) -> dict[str, Any]:
    """The round controls' values (read in callbacks too, from the previous run's widgets)."""
    value = st.session_state.get
    return {"strategy": value(f"label_strategy-{session_id}"), "n": int(value(f"label_n-{session_id}") or 1),
            "beta": float(value(f"label_beta-{session_id}", seedsets.DEFAULT_BETA)),
            "uncertain": int(value(f"label_uncertain-{session_id}") or 0),
            "spread_km": float(value(f"label_spread_km-{session_id}") or 0.0),
            "per_cell": int(value(f"label_per_cell-{session_id}") or 1)}


def _round_controls(seed: Seed, engine: SearchEngine, example_id: str | None,
                    filters: SearchFilters | None, fragment: str | None) -> None:
    sid = seed.session.session_id
    positives, negatives = seed.counts
    strategy_column, count_column, next_column, preview_column = st.columns([3, 1, 1, 1], vertical_alignment="bottom")
    strategy = strategy_column.selectbox(
        "Strategy", list(STRATEGIES), index=list(STRATEGIES).index(seed.session.strategy),
        format_func=STRATEGIES.get, key=f"label_strategy-{sid}",
        help=f"The classifier needs {seedsets.MIN_PER_CLASS} positive and {seedsets.MIN_PER_CLASS} negative labels; "
             "with fewer the ranking falls back to Rocchio or the mean, and says so.")
    count_column.number_input("Proposals", min_value=1, max_value=100, value=DEFAULT_PROPOSALS, key=f"label_n-{sid}")
    classifier_ready = (strategy in ("auto", "classifier") and positives >= seedsets.MIN_PER_CLASS
                        and negatives >= seedsets.MIN_PER_CLASS)
    with st.expander("Round options"):
        beta_column, uncertain_column, spread_column, per_cell_column = st.columns(4)
        beta_column.slider("Rocchio β", 0.0, 2.0, seedsets.DEFAULT_BETA, step=0.05, key=f"label_beta-{sid}",
                           help="Weight of the negatives' mean (Rocchio, and the classifier's candidate pool).")
        uncertain_column.number_input(
            "of which most uncertain", min_value=0, max_value=100, value=0, key=f"label_uncertain-{sid}",
            disabled=not classifier_ready,
            help="Proposals whose classifier probability is nearest 0.5 (active learning)." if classifier_ready else
                 f"Needs the classifier: strategy auto or classifier, and at least {seedsets.MIN_PER_CLASS} "
                 f"positive and {seedsets.MIN_PER_CLASS} negative labels (have {positives} and {negatives}).")
        spread_column.number_input("Spread cell (km)", min_value=0.0, max_value=1000.0, value=0.0, step=1.0,
                                   key=f"label_spread_km-{sid}", help="At most N proposals per cell; 0 = off.")
        per_cell_column.number_input("Per cell (N)", min_value=1, max_value=100, value=1, key=f"label_per_cell-{sid}")
    next_column.button("Next round ▶", type="primary", on_click=_run_round, args=(seed, engine, example_id, True, filters, fragment),
                       width="stretch", help="Rank the unlabelled chips, propose the best, and record the round "
                                             "with its figures. Labels given afterwards carry its number.")
    preview_column.button("Preview", on_click=_run_round, args=(seed, engine, example_id, False, filters, fragment), width="stretch",
                          help="Show the proposals without recording a round.")


def _ranking_options(seed: Seed, example_id: str | None) -> dict[str, Any]:
    options = _round_options(seed.session.session_id)
    kwargs = {"strategy": options["strategy"], "beta": options["beta"], "labels": seed.store}
    if options["strategy"] == "single" and example_id:
        kwargs["example"] = example_id
    return kwargs


def _run_round(seed: Seed, engine: SearchEngine, example_id: str | None, record: bool,
               filters: SearchFilters | None = None, fragment: str | None = None) -> None:
    options = _round_options(seed.session.session_id)
    spread_km = options["spread_km"] or None
    try:
        proposals = (seedsets.next_round if record else seedsets.propose)(
            engine, seed.session, options["n"], uncertain=min(options["uncertain"], options["n"]),
            spread_km=spread_km, per_cell=options["per_cell"], filters=filters,
            **_ranking_options(seed, example_id))
    except ChipscoutError as err:
        notice("error", f"Cannot rank: {err}")
        return
    st.session_state[SHOWN_ROUND] = (seed.session.session_id, proposals, record)
    if record and fragment:  # the sidebar's picker shows the round number
        st.rerun([SIDEBAR_FRAGMENT, fragment])


def _measure(seed: Seed, engine: SearchEngine) -> None:
    kwargs = _ranking_options(seed, None)
    kwargs.pop("example", None)
    try:
        fresh = seed.store.session(seed.session)
        current = Seed(seed.store, fresh, {label.chip_id: label for label in seed.store.labels(fresh)})
        metrics = seedsets.seed_set_metrics(engine, fresh, **kwargs)
    except ChipscoutError as err:
        notice("error", f"Cannot measure the seed set: {err}")
        return
    st.session_state[MEASURED] = (fresh.session_id, current.fingerprint, metrics)


def _proposals(seed: Seed, grid: Callable[..., None]) -> None:
    shown = st.session_state.get(SHOWN_ROUND)
    if not shown or shown[0] != seed.session.session_id:
        return
    _, proposals, recorded = shown
    st.markdown(f"**Round {proposals.round} proposals**" if recorded
                else "**Preview of the next proposals** (no round recorded)")
    asked = "" if proposals.requested_strategy == proposals.strategy else (
        " (chosen by auto)" if proposals.requested_strategy == "auto"
        else f" instead of {proposals.requested_strategy}")
    st.caption(f"Ranked by the **{proposals.strategy}** strategy{asked}; scores are {proposals.score_kind}.")
    if proposals.note:
        st.info(proposals.note)
    if recorded and proposals.round != seed.session.current_round:
        st.warning(f"The session is at round {seed.session.current_round} now (a round was started in another "
                   f"tab or by a script); these are round {proposals.round}'s proposals.")
    if not proposals.proposals:
        st.warning("Nothing to propose: every chip the ranking reaches is labelled already.")
        return
    done = sum(seed.label_of(p.chip.chip_id) is not None for p in proposals.proposals)
    st.caption(f"{done} of {len(proposals.proposals)} labelled. Label them Yes (positive) or No "
               "(negative), then click Next round.")
    captions = [f"**{p.rank}.** {p.score:.3f}" + (" · uncertain" if p.kind == "uncertain" else "")
                for p in proposals.proposals]
    grid([p.chip for p in proposals.proposals], captions, "proposal",
         {p.chip.chip_id: p.score for p in proposals.proposals}, proposals.strategy)


# ----------------------------------------------------------------------------- downloads
@st.cache_data(show_spinner=False, max_entries=16)
def _exports(_engine: SearchEngine, _session: Session, where: str, fingerprint: str, candidates: int,
             threshold: float | None, strategy: str, beta: float) -> dict[str, tuple[bytes, ExportSummary]]:
    """Both formats, cached on the labels' fingerprint: reruns that change no label reuse the bytes."""
    return export_formats(_engine, _session, FORMATS, candidates=candidates, threshold=threshold,
                          strategy=strategy, beta=beta)


def file_stem(name: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", name).strip("_") or "seed-set"


def _downloads(seed: Seed, engine: SearchEngine) -> None:
    sid = seed.session.session_id
    st.markdown("**Download the seed set**")
    with st.expander("Add candidates"):
        top_column, threshold_column = st.columns(2)
        candidates = top_column.number_input(
            "Top-N unlabelled candidates", min_value=0, max_value=10_000, value=0, step=50,
            key=f"label_candidates-{sid}", help="Adds the session ranking's best unlabelled chips as "
                                                "label = candidate. 0 = none.")
        threshold = threshold_column.number_input(
            "scoring at least", min_value=-1.0, max_value=1.0, value=0.5, step=0.05, key=f"label_threshold-{sid}",
            help="A cosine similarity, or a probability when the ranking is the classifier's.")
    options = _round_options(sid)
    where = f"{engine.db_uri}|{engine.table_name}@{engine.version}|{sid}"
    try:
        files = _exports(engine, seed.session, where, seed.fingerprint, int(candidates),
                         float(threshold) if candidates else None, options["strategy"] or seed.session.strategy,
                         options["beta"])
    except ChipscoutError as err:
        st.info(f"Nothing to download: {err}")
        return
    for column, fmt in zip(st.columns(len(FORMATS)), FORMATS):
        title, suffix, mime = DOWNLOADS[fmt]
        column.download_button(title, files[fmt][0], icon=":material/download:", mime=mime,
                               file_name=f"{file_stem(seed.session.name)}.{suffix}", key=f"download-{fmt}",
                               on_click="ignore", width="stretch")
    summary = files[FORMATS[0]][1]
    parts = [f"{summary.positives} positive and {summary.negatives} negative chips"]
    if candidates:
        parts.append(f"{summary.candidates} candidates ranked by {summary.candidate_strategy}")
    st.caption(" + ".join(parts) + ", with footprints (WGS 84) and provenance." +
               (f" {summary.note}." if summary.note else ""))
