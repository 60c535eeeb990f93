"""Labelling sessions: named seed sets of positive and negative chips, stored beside the chip table.

Three companion tables of a chip table `<table>` hold them (through `ChipStore`, the only module
that talks to LanceDB): `<table>__sessions` (one row per session), `<table>__labels` (one row per
session and chip) and `<table>__rounds` (the ranking and quality figures of every round).
Labels are keyed by the session's id, not its name, so renaming is one row and a deleted session's
labels can never leak into a new session of the same name.

Concurrent writers (two browser tabs, a tab and a script) on one session: every write is one
atomic merge on (session, chip); labels for different chips are all kept, and for the same chip
the last write wins. Writers in one process (the app's tabs) are serialised; two processes that
first-label the same chip at the same instant may leave two rows, of which reads keep the later.
Reads always see the latest committed labels. A label written while another writer deletes its
session is keyed by the dead session's id and never shows up anywhere.
"""

from __future__ import annotations

import getpass
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import pyarrow as pa

from chipscout.indexer.errors import ChipscoutError, QueryError
from chipscout.indexer.chips import validate_chip_id
from chipscout.indexer.search.engine import SearchEngine
from chipscout.indexer.store import ChipStore
from chipscout.indexer.errors import LabelError  # noqa: F401  (raised here, defined with the others)

POSITIVE, NEGATIVE = "positive", "negative"
SESSIONS, LABELS, ROUNDS = "sessions", "labels", "rounds"
_SESSION_NAME = re.compile(r"^[\w][\w .:@+-]{0,99}$")
_USER_NAME = re.compile(r"^[^\x00-\x1f]{1,100}$")
_LABEL_WORDS = {
    POSITIVE: POSITIVE, "pos": POSITIVE, "p": POSITIVE, "+": POSITIVE, "1": POSITIVE, "yes": POSITIVE,
    NEGATIVE: NEGATIVE, "neg": NEGATIVE, "n": NEGATIVE, "-": NEGATIVE, "0": NEGATIVE, "no": NEGATIVE,
}
_UTC = pa.timestamp("us", tz="UTC")

SESSIONS_SCHEMA = pa.schema([
    pa.field("session_id", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("created", _UTC),
    pa.field("renamed", _UTC),
    pa.field("created_by", pa.string()),
    pa.field("strategy", pa.string()),
    pa.field("notes", pa.string()),
    pa.field("current_round", pa.int32()),
])
LABELS_SCHEMA = pa.schema([
    pa.field("session_id", pa.string(), nullable=False),
    pa.field("chip_id", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("labelled_by", pa.string()),
    pa.field("labelled_at", _UTC),
    pa.field("round", pa.int32()),
    pa.field("score", pa.float64()),
    pa.field("strategy", pa.string()),
    pa.field("origin", pa.string()),
])
ROUNDS_SCHEMA = pa.schema([
    pa.field("session_id", pa.string(), nullable=False),
    pa.field("round", pa.int32(), nullable=False),
    pa.field("created", _UTC),
    pa.field("strategy", pa.string()),
    pa.field("requested_strategy", pa.string()),
    pa.field("note", pa.string()),
    pa.field("n_positive", pa.int32()),
    pa.field("n_negative", pa.int32()),
    pa.field("top_ids", pa.list_(pa.string())),
    pa.field("top_scores", pa.list_(pa.float64())),
    pa.field("cv_method", pa.string()),
    pa.field("cv_precision", pa.float64()),
    pa.field("cv_recall", pa.float64()),
    pa.field("jaccard", pa.float64()),
    pa.field("rank_correlation", pa.float64()),
])


def default_user() -> str:
    """Who labels when nobody says: $USER, else the login name."""
    try:
        return os.environ.get("USER") or getpass.getuser() or "unknown"
    except Exception:  # getpass raises OSError/KeyError without a passwd entry (containers)
        return "unknown"


def normalise_label(value: str | bool) -> str:
    """`positive` or `negative` from a label word (pos/neg, +/-, yes/no, True/False...)."""
    if isinstance(value, bool):
        return POSITIVE if value else NEGATIVE
    word = _LABEL_WORDS.get(str(value).strip().lower()) if isinstance(value, str) else None
    if word is None:
        raise LabelError(f"bad label {value!r}: use 'positive' or 'negative'")
    return word


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _check_session_name(name: Any) -> str:
    if not isinstance(name, str) or not _SESSION_NAME.match(name.strip()):
        raise LabelError(
            f"bad session name {name!r}: 1-100 characters, letters, digits, spaces and _ . : @ + -, "
            "starting with a letter or digit")
    return name.strip()


def _check_user(user: str | None) -> str:
    user = default_user() if user is None else user
    if not isinstance(user, str) or not _USER_NAME.match(user):
        raise LabelError(f"bad user name {user!r}: 1-100 printable characters")
    return user


@dataclass(frozen=True)
class Session:
    session_id: str
    name: str
    table: str
    created: datetime
    renamed: datetime | None
    created_by: str
    strategy: str
    """The ranking strategy the session uses unless told otherwise (`auto`, `rocchio`...)."""
    notes: str
    current_round: int
    """0 while seeding; each `refine.next_round` adds one. New labels carry the current round."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created"] = self.created.isoformat()
        data["renamed"] = self.renamed.isoformat() if self.renamed else None
        return data


@dataclass(frozen=True)
class Label:
    chip_id: str
    label: str
    labelled_by: str
    labelled_at: datetime
    round: int
    score: float | None
    """The chip's score in the ranking it was labelled from (None when labelled by hand)."""
    strategy: str | None
    """The strategy of that ranking."""
    origin: str
    """How the label came: `manual`, `cli`, `import:<file>`..."""

    @property
    def is_positive(self) -> bool:
        return self.label == POSITIVE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labelled_at"] = self.labelled_at.isoformat()
        return data


@dataclass(frozen=True)
class RoundRecord:
    """What one round proposed and how good the seed set looked then."""

    round: int
    created: datetime
    strategy: str
    requested_strategy: str
    note: str
    n_positive: int
    n_negative: int
    top_ids: tuple[str, ...]
    """The ranking's top unlabelled chips at that round (for the ranking-change figure)."""
    top_scores: tuple[float, ...]
    cv_method: str | None = None
    cv_precision: float | None = None
    cv_recall: float | None = None
    jaccard: float | None = None
    rank_correlation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created"] = self.created.isoformat()
        data["top_ids"], data["top_scores"] = list(self.top_ids), list(self.top_scores)
        return data


class Strategy(str, Enum):
    """How a session ranks chips from its labels (`chipscout.indexer.seedsets.refine` does the ranking);
    kept here because a session records its strategy."""

    AUTO = "auto"
    SINGLE = "single"
    MEAN = "mean"
    ROCCHIO = "rocchio"
    CLASSIFIER = "classifier"


class LabelStore:
    """The labelling sessions of one chip table."""

    def __init__(self, store: ChipStore):
        self.store = store
        self.store.ensure_exists()  # a session labels chips of an existing table; fail early and clearly

    @classmethod
    def open(cls, db_uri: str, table_name: str, storage_options: dict[str, str] | None = None) -> LabelStore:
        return cls(ChipStore(db_uri, table_name, storage_options))

    @classmethod
    def for_engine(cls, engine: SearchEngine) -> LabelStore:
        """The sessions of the table `engine` searches (sharing its store: one LanceDB connection)."""
        return cls(engine.store)

    @property
    def table_name(self) -> str:
        return self.store.table_name

    # ------------------------------------------------------------------ sessions
    def sessions(self) -> list[Session]:
        """Every session of the table, oldest first."""
        rows = self.store.companion_rows(SESSIONS)
        if rows is None:
            return []
        return sorted((self._session(r) for r in rows.to_pylist()), key=lambda s: (s.created, s.name))

    def session(self, session: str | Session) -> Session:
        """The session named `session` (or the current state of a Session object)."""
        if isinstance(session, Session):
            rows = self.store.companion_rows(SESSIONS, {"session_id": session.session_id})
            if rows is None or rows.num_rows == 0:
                raise LabelError(f"session {session.name!r} of table {self.table_name!r} no longer exists "
                                 "(deleted elsewhere)")
            return self._session(rows.to_pylist()[0])
        name = _check_session_name(session)
        rows = self.store.companion_rows(SESSIONS, {"name": name})
        if rows is None or rows.num_rows == 0:
            # A session id addresses a session too: the way out when two share a name.
            rows = self.store.companion_rows(SESSIONS, {"session_id": name})
        if rows is None or rows.num_rows == 0:
            known = ", ".join(s.name for s in self.sessions()) or "none"
            raise LabelError(f"no labelling session {name!r} for table {self.table_name!r} "
                             f"(sessions: {known}); create it with `chipscout label new`")
        if rows.num_rows > 1:
            ids = ", ".join(sorted(rows["session_id"].to_pylist()))
            raise LabelError(f"{rows.num_rows} sessions of table {self.table_name!r} are named {name!r} "
                             f"(ids {ids}); rename one by its id: `chipscout label rename ID NEW_NAME`")
        return self._session(rows.to_pylist()[0])

    def exists(self, name: str) -> bool:
        rows = self.store.companion_rows(SESSIONS, {"name": _check_session_name(name)}, columns=["name"])
        return rows is not None and rows.num_rows > 0

    def create_session(self, name: str, strategy: str = "auto", notes: str = "",
                       created_by: str | None = None) -> Session:
        name = _check_session_name(name)
        taken = LabelError(f"a labelling session {name!r} already exists for table {self.table_name!r}; "
                           "resume it, or pick another name")
        if self.exists(name):
            raise taken
        session = Session(session_id=uuid.uuid4().hex, name=name, table=self.table_name, created=_now(),
                          renamed=None, created_by=_check_user(created_by), strategy=_check_strategy(strategy),
                          notes=str(notes or ""), current_round=0)
        # Of two writers creating one name at once, one wins; the other is refused, storing nothing.
        if not self.store.companion_insert_new(SESSIONS, self._session_rows([session]), key="name",
                                               identity="session_id"):
            raise taken
        return session

    def rename_session(self, session: str | Session, new_name: str) -> Session:
        current = self.session(session)
        new_name = _check_session_name(new_name)
        if new_name == current.name:
            return current
        if self.exists(new_name):
            raise LabelError(f"cannot rename {current.name!r}: a session {new_name!r} already exists")
        renamed = replace(current, name=new_name, renamed=_now())
        self.store.companion_upsert(SESSIONS, self._session_rows([renamed]), on=["session_id"])
        return renamed

    def update_session(self, session: str | Session, *, strategy: str | None = None,
                       notes: str | None = None) -> Session:
        current = self.session(session)
        updated = replace(current, strategy=current.strategy if strategy is None else _check_strategy(strategy),
                          notes=current.notes if notes is None else str(notes))
        self.store.companion_upsert(SESSIONS, self._session_rows([updated]), on=["session_id"])
        return updated

    def delete_session(self, session: str | Session) -> int:
        """Delete a session with its labels and rounds; returns how many labels went with it."""
        current = self.session(session)
        count = len(self.labels(current))
        # The session row goes first: from then on no writer can add labels to it.
        self.store.companion_delete(SESSIONS, {"session_id": current.session_id})
        self.store.companion_delete(ROUNDS, {"session_id": current.session_id})
        self.store.companion_delete(LABELS, {"session_id": current.session_id})
        return count

    def advance_round(self, session: str | Session) -> Session:
        """Start the next round: later labels carry its number."""
        current = self.session(session)
        advanced = replace(current, current_round=current.current_round + 1)
        self.store.companion_upsert(SESSIONS, self._session_rows([advanced]), on=["session_id"])
        return advanced

    # ------------------------------------------------------------------ labels
    def set_labels(self, session: str | Session, labels: Mapping[str, str | bool], *,
                   scores: Mapping[str, float | None] | None = None, by: str | None = None,
                   round: int | None = None, strategy: str | None = None,
                   origin: str = "manual") -> list[Label]:
        """Label chips ({chip_id: 'positive' | 'negative'}) in one atomic write.

        A chip already labelled in this session gets its new label (never a second row). Every
        chip must exist in the table; if one does not, nothing is written. `scores` are the
        chips' scores in the ranking the user labelled from; `round` defaults to the session's.
        """
        current = self.session(session)
        if not labels:
            return []
        user = _check_user(by)
        wanted = {self._chip_id(c): normalise_label(v) for c, v in labels.items()}
        self._require_chips(list(wanted))
        when = _now()
        round_number = current.current_round if round is None else int(round)
        scores = scores or {}
        written = [Label(chip_id=c, label=v, labelled_by=user, labelled_at=when, round=round_number,
                         score=None if scores.get(c) is None else float(scores[c]), strategy=strategy,
                         origin=origin) for c, v in wanted.items()]
        rows = pa.Table.from_pylist([{"session_id": current.session_id, **asdict(label)} for label in written],
                                    schema=LABELS_SCHEMA)
        self.store.companion_upsert(LABELS, rows, on=["session_id", "chip_id"])
        return written

    def set_label(self, session: str | Session, chip_id: str, label: str | bool,
                  score: float | None = None, **kwargs: Any) -> Label:
        return self.set_labels(session, {chip_id: label}, scores={chip_id: score}, **kwargs)[0]

    def remove_labels(self, session: str | Session, chip_ids: Sequence[str]) -> int:
        """Forget the labels of `chip_ids` in the session; returns how many there were."""
        current = self.session(session)
        ids = [self._chip_id(c) for c in chip_ids]
        labelled = set(self.label_map(current))
        self.store.companion_delete(LABELS, {"session_id": current.session_id}, ("chip_id", ids))
        return len(labelled & set(ids))

    def labels(self, session: str | Session) -> list[Label]:
        """The session's labels, oldest first."""
        current = self.session(session)
        rows = self.store.companion_rows(LABELS, {"session_id": current.session_id})
        if rows is None:
            return []
        latest = [Label(**{k: v for k, v in row.items() if k != "session_id"}) for row in _latest_rows(rows)]
        return sorted(latest, key=lambda label: (label.labelled_at, label.chip_id))

    def label_map(self, session: str | Session) -> dict[str, str]:
        """{chip_id: 'positive' | 'negative'} of the session."""
        return {label.chip_id: label.label for label in self.labels(session)}

    def counts(self, session: str | Session) -> dict[str, int]:
        labels = self.labels(session)
        positives = sum(label.is_positive for label in labels)
        return {POSITIVE: positives, NEGATIVE: len(labels) - positives}

    def counts_by_session(self) -> dict[str, dict[str, int]]:
        """{session_id: {'positive': n, 'negative': n}} of every session with labels, from one read
        of the labels table (the app's session picker shows them on every rerun)."""
        rows = self.store.companion_rows(LABELS, columns=["session_id", "chip_id", "label", "labelled_at"])
        counts: dict[str, dict[str, int]] = {}
        for row in _latest_rows(rows) if rows is not None else []:
            tally = counts.setdefault(row["session_id"], {POSITIVE: 0, NEGATIVE: 0})
            tally[row["label"]] = tally.get(row["label"], 0) + 1
        return counts

    # ------------------------------------------------------------------ rounds
    def record_round(self, session: str | Session, record: RoundRecord) -> None:
        current = self.session(session)
        row = {"session_id": current.session_id, **record.to_dict(), "created": record.created}
        self.store.companion_upsert(ROUNDS, pa.Table.from_pylist([row], schema=ROUNDS_SCHEMA),
                                    on=["session_id", "round"])

    def rounds(self, session: str | Session) -> list[RoundRecord]:
        """The recorded rounds of the session, first to last."""
        current = self.session(session)
        rows = self.store.companion_rows(ROUNDS, {"session_id": current.session_id})
        if rows is None:
            return []
        records = []
        for row in rows.to_pylist():
            row.pop("session_id")
            row["top_ids"], row["top_scores"] = tuple(row["top_ids"] or ()), tuple(row["top_scores"] or ())
            records.append(RoundRecord(**row))
        return sorted(records, key=lambda r: r.round)

    # ------------------------------------------------------------------ helpers
    def _session(self, row: dict[str, Any]) -> Session:
        return Session(session_id=row["session_id"], name=row["name"], table=self.table_name,
                       created=row["created"], renamed=row["renamed"], created_by=row["created_by"] or "",
                       strategy=row["strategy"] or "auto", notes=row["notes"] or "",
                       current_round=int(row["current_round"] or 0))

    @staticmethod
    def _session_rows(sessions: Sequence[Session]) -> pa.Table:
        rows = []
        for s in sessions:
            row = asdict(s)
            row.pop("table")
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=SESSIONS_SCHEMA)

    @staticmethod
    def _chip_id(chip_id: Any) -> str:
        try:
            return validate_chip_id(chip_id)
        except QueryError as err:
            raise LabelError(str(err)) from None

    def _require_chips(self, chip_ids: list[str]) -> None:
        present: set[str] = set()
        for start in range(0, len(chip_ids), 500):
            rows = self.store.fetch(chip_ids[start:start + 500], ["chip_id"])
            present.update(rows["chip_id"].to_pylist())
        missing = [c for c in chip_ids if c not in present]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise LabelError(f"no chip {', '.join(repr(m) for m in missing[:5])}{more} in table "
                             f"{self.table_name!r}; nothing was labelled")


def _latest_rows(rows: pa.Table) -> list[dict[str, Any]]:
    """One row per (session, chip): the latest. Two processes first-labelling one chip at the same
    moment can leave two rows; the later write wins here, and the chip's next write updates both."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows.to_pylist():
        key = (row["session_id"], row["chip_id"])
        kept = latest.get(key)
        if kept is None or (row["labelled_at"], row["label"]) > (kept["labelled_at"], kept["label"]):
            latest[key] = row
    return list(latest.values())


def _check_strategy(strategy: str) -> str:
    try:
        return Strategy(strategy).value
    except ValueError:
        raise LabelError(f"unknown strategy {strategy!r}: use one of "
                         f"{', '.join(s.value for s in Strategy)}") from None
