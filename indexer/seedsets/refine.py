"""Refine a search from labels: query strategies, the classifier, proposals per round, and how good
the seed set is.

Strategies (each ranking says which one produced it, and why when it fell back):
- `single`: the vector of one example chip (the session's first positive unless one is named).
- `mean`: the mean of the L2-normalised positives.
- `rocchio`: mean(positives) - beta * mean(negatives), normalised (GeoVibes' 2 pos - neg is beta 0.5).
- `classifier`: logistic regression (balanced classes) trained on the labels, re-ranking a candidate
  pool drawn from the vector index: the union of each positive's nearest neighbours and the Rocchio
  query's. It needs `MIN_PER_CLASS` labels of each kind; with fewer it falls back to Rocchio.
- `auto`: the strongest of these the labels allow.

Rankings cover unlabelled chips only, so a labelled chip is never proposed again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from chipscout.indexer.seedsets.labels import NEGATIVE, POSITIVE, LabelError, LabelStore, RoundRecord, Session, Strategy
from chipscout.indexer.search.engine import MAX_K, ChipRecord, SearchEngine, SearchFilters
from chipscout.indexer.search.spread import cap_per_cell
from chipscout.indexer.store import unit_rows


#: Weight of the negatives' mean in Rocchio; see BENCHMARKS.md (seedset) for the comparison.
DEFAULT_BETA = 0.5
#: Labels of each kind the classifier needs before it is used (below: Rocchio, and a note saying so).
MIN_PER_CLASS = 3
#: Candidates the classifier re-ranks: about this many chips near the positives and the Rocchio query.
DEFAULT_POOL_SIZE = 1000
#: Positives (the most recent) whose neighbourhoods make up the classifier's pool.
POOL_QUERIES = 32
#: Inverse regularisation strength of the logistic regression (scikit-learn's C). In the seed-set
#: benchmark 10 beat 1; 30 was a little better still but within the noise, and pushes
#: probabilities towards 0 and 1, which blunts "most uncertain" picks and candidate thresholds.
DEFAULT_C = 10.0
#: Length of the top list each round records, to measure how much the ranking moves.
TRACK_N = 100
COSINE, PROBABILITY = "cosine similarity", "probability"


# ----------------------------------------------------------------------------- query vectors
def _unit_copy(vectors: np.ndarray) -> np.ndarray:
    """A float64 copy of `vectors` (one row or many) with unit rows: the store's `unit_rows`,
    which scales in place, on a copy, so callers' (and sklearn's) arrays are never changed."""
    return unit_rows(np.array(vectors, dtype=np.float64, ndmin=2))


def mean_query(positives: np.ndarray) -> np.ndarray:
    """The normalised mean of the normalised positives (a single positive gives itself)."""
    if len(positives) == 0:
        raise LabelError("a query needs at least one positive example")
    return _normalised(_unit_copy(positives).mean(axis=0), "the positives' mean")


def rocchio_query(positives: np.ndarray, negatives: np.ndarray, beta: float = DEFAULT_BETA) -> np.ndarray:
    """mean(unit positives) - beta * mean(unit negatives), normalised."""
    beta = _check_beta(beta)
    if len(positives) == 0:
        raise LabelError("a query needs at least one positive example")
    query = _unit_copy(positives).mean(axis=0)
    if len(negatives):
        query = query - beta * _unit_copy(negatives).mean(axis=0)
    return _normalised(query, "mean(positives) - beta * mean(negatives)")


def _normalised(vector: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-12:
        raise LabelError(f"{what} is a zero vector (positives and negatives cancel out); "
                         "label more chips or lower beta")
    return vector / norm


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not np.isfinite(beta) or not 0 <= beta <= 10:
        raise LabelError(f"beta must be a number within 0..10, got {beta!r}")
    return float(beta)


def _strategy(value: str | Strategy) -> Strategy:
    try:
        return Strategy(value)
    except ValueError:
        raise LabelError(f"unknown strategy {value!r}: use one of "
                         f"{', '.join(s.value for s in Strategy)}") from None


def choose_strategy(requested: str | Strategy, n_positive: int, n_negative: int,
                    min_per_class: int = MIN_PER_CLASS) -> tuple[Strategy, str]:
    """The strategy the labels allow for `requested`, and a note when it is not the one asked."""
    requested = _strategy(requested)
    if n_positive == 0:
        raise LabelError("no positive labels yet: label at least one chip positive (or name an example chip)")
    enough = n_positive >= min_per_class and n_negative >= min_per_class
    have = f"have {n_positive} positive, {n_negative} negative"
    if requested is Strategy.AUTO:
        if enough:
            return Strategy.CLASSIFIER, ""
        fallback = Strategy.ROCCHIO if n_negative else (Strategy.MEAN if n_positive > 1 else Strategy.SINGLE)
        return fallback, (f"auto: the classifier needs at least {min_per_class} positive and "
                          f"{min_per_class} negative labels ({have}); used {fallback.value}")
    if requested is Strategy.CLASSIFIER and not enough:
        fallback = Strategy.ROCCHIO if n_negative else Strategy.MEAN
        return fallback, (f"the classifier needs at least {min_per_class} positive and {min_per_class} "
                          f"negative labels ({have}); fell back to {fallback.value}")
    if requested is Strategy.ROCCHIO and n_negative == 0:
        return Strategy.MEAN, "rocchio needs a negative label (none yet); used mean"
    return requested, ""


# ----------------------------------------------------------------------------- classifier
def _centre_rows(vectors: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return _unit_copy(np.asarray(vectors, dtype=np.float64) - centre)


def make_classifier(c: float = DEFAULT_C):
    """Logistic regression (balanced class weights) on the vectors minus the training labels'
    mean, renormalised. Embeddings share a large common direction (raw RCF vectors sit at cosine
    ~0.9 from each other); removing it let the classifier find 0.48 instead of 0.34 of a class
    in the seed-set benchmark (BENCHMARKS.md (seedset)). Centring happens inside the pipeline, so
    cross-validation centres each fold on its own training labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    return make_pipeline(FunctionTransformer(_unit_copy), _LabelMeanCentring(),
                         LogisticRegression(class_weight="balanced", C=c, max_iter=5000))


class _LabelMeanCentring:
    """A scikit-learn transformer: subtract the training rows' mean, renormalise. (Duck-typed, so
    importing this module does not import scikit-learn.)"""

    def fit(self, features, target=None):
        self.mean_ = np.asarray(features, dtype=np.float64).mean(axis=0)
        return self

    def transform(self, features):
        return _centre_rows(features, self.mean_)

    def fit_transform(self, features, target=None):
        return self.fit(features).transform(features)

    def get_params(self, deep=True):
        return {}

    def set_params(self, **params):
        return self


def train_classifier(positives: np.ndarray, negatives: np.ndarray, c: float = DEFAULT_C):
    """A fitted classifier (predict_proba's column 1 = positive). Needs both kinds of label."""
    if len(positives) == 0 or len(negatives) == 0:
        raise LabelError(f"a classifier needs positive and negative labels; have {len(positives)} "
                         f"positive and {len(negatives)} negative")
    features = _unit_copy(np.vstack([positives, negatives]))
    target = np.r_[np.ones(len(positives), int), np.zeros(len(negatives), int)]
    return make_classifier(c).fit(features, target)


@dataclass(frozen=True)
class CrossValidation:
    method: str | None
    """`stratified 5-fold`, `leave-one-out`... or None when undefined."""
    precision: float | None
    recall: float | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Fewer labels than this are cross-validated leave-one-out (k-fold would waste too many).
LEAVE_ONE_OUT_BELOW = 10


def cross_validate(positives: np.ndarray, negatives: np.ndarray, c: float = DEFAULT_C) -> CrossValidation:
    """Cross-validated precision and recall (of the positive class) of the classifier on the labels.

    Stratified k-fold with k = min(5, the smaller class's count); leave-one-out below
    LEAVE_ONE_OUT_BELOW labels; undefined (None, with a note) with fewer than 2 of a kind.
    Predictions of every fold are pooled before precision and recall are computed.
    """
    from sklearn.model_selection import LeaveOneOut, StratifiedKFold, cross_val_predict

    n_pos, n_neg = len(positives), len(negatives)
    smaller = min(n_pos, n_neg)
    if smaller < 2:
        return CrossValidation(None, None, None, _too_few_to_validate(n_pos, n_neg))
    features = _unit_copy(np.vstack([positives, negatives]))
    target = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    if n_pos + n_neg < LEAVE_ONE_OUT_BELOW:
        splitter, method = LeaveOneOut(), "leave-one-out"
    else:
        folds = min(5, smaller)
        splitter, method = StratifiedKFold(folds, shuffle=True, random_state=0), f"stratified {folds}-fold"
    predicted = cross_val_predict(make_classifier(c), features, target, cv=splitter)
    true_pos = int(((predicted == 1) & (target == 1)).sum())
    predicted_pos = int((predicted == 1).sum())
    precision = true_pos / predicted_pos if predicted_pos else None
    note = "" if predicted_pos else NO_PREDICTED_POSITIVES
    return CrossValidation(method, precision, true_pos / n_pos, note)


NO_PREDICTED_POSITIVES = "precision undefined: the classifier predicted no positives"


def _too_few_to_validate(n_pos: int, n_neg: int) -> str:
    return (f"undefined: cross-validation needs at least 2 positive and 2 negative labels "
            f"(have {n_pos} and {n_neg})")


# ----------------------------------------------------------------------------- rankings
@dataclass(frozen=True)
class RankedChip:
    chip: ChipRecord
    score: float
    """Cosine similarity to the query, or the classifier's probability of `positive`."""
    probability: float | None = None


@dataclass(frozen=True)
class Ranking:
    """Unlabelled chips, best first, and what produced the order."""

    strategy: str
    requested_strategy: str
    note: str
    """Why `strategy` differs from the one asked (empty when it does not)."""
    score_kind: str
    items: tuple[RankedChip, ...]
    n_positive: int
    n_negative: int
    query_vector: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def chip_ids(self) -> list[str]:
        return [item.chip.chip_id for item in self.items]

    def describe(self) -> str:
        text = f"{self.strategy} ({self.n_positive} positive, {self.n_negative} negative)"
        return f"{text}; {self.note}" if self.note else text


@dataclass(frozen=True)
class _Labelled:
    positive_ids: list[str]
    positives: np.ndarray
    negative_ids: list[str]
    negatives: np.ndarray


def _labelled_vectors(engine: SearchEngine, positives: Sequence[str], negatives: Sequence[str]) -> _Labelled:
    both = set(positives) & set(negatives)
    if both:
        raise LabelError(f"chip(s) {', '.join(sorted(both)[:5])} are labelled both positive and negative")
    pos_ids, pos = engine.vectors(positives)
    neg_ids, neg = engine.vectors(negatives)
    missing = [c for c in [*positives, *negatives] if c not in set(pos_ids) | set(neg_ids)]
    if missing:
        raise LabelError(f"labelled chip(s) {', '.join(missing[:5])} are not in table "
                         f"{engine.store.table_name!r} (was it re-indexed?)")
    return _Labelled(pos_ids, pos, neg_ids, neg)


def _neighbours(engine: SearchEngine, vector: np.ndarray, k: int, skip: set[str],
                filters: SearchFilters | None) -> list[RankedChip]:
    """Nearest unlabelled chips: asks for k more than the labelled count and drops the labelled,
    so a long label list never becomes a long SQL filter."""
    fetch = min(k + len(skip), MAX_K)
    # No query expansion: the vector already pools the labelled examples, and folding unlabelled
    # neighbours into it would dilute what the labels say.
    response = engine.similar_to_vector(vector, fetch, filters, expand=0)
    return [RankedChip(r.chip, r.similarity) for r in response.results if r.chip.chip_id not in skip][:k]


def rank(engine: SearchEngine, positives: Sequence[str], negatives: Sequence[str] = (), *,
         strategy: str | Strategy = Strategy.AUTO, beta: float = DEFAULT_BETA, depth: int = 200,
         filters: SearchFilters | None = None, example: str | None = None,
         exclude: Iterable[str] = (), pool_size: int = DEFAULT_POOL_SIZE,
         min_per_class: int = MIN_PER_CLASS, c: float = DEFAULT_C) -> Ranking:
    """Rank the chips not in `positives`, `negatives` or `exclude`, best first.

    depth: how many chips a similarity ranking returns. The classifier ranks its whole candidate
        pool (about `pool_size` chips), so "most uncertain" candidates can be picked from it.
    example: the chip of the `single` strategy (default: the first positive); it may be unlabelled.
    """
    requested = _strategy(strategy)
    labelled = _labelled_vectors(engine, positives, negatives)
    if example is not None and requested is Strategy.SINGLE:
        chosen, note = Strategy.SINGLE, ""  # an example needs no positive label
    else:
        chosen, note = choose_strategy(requested, len(labelled.positives), len(labelled.negatives),
                                       min_per_class)
    skip = set(positives) | set(negatives) | set(exclude)
    if chosen is Strategy.CLASSIFIER:
        return _classifier_ranking(engine, labelled, beta, filters, skip, pool_size, c, requested, note)
    if chosen is Strategy.SINGLE:
        example = example or labelled.positive_ids[0]
        ids, vectors = engine.vectors([example])
        if not ids:
            raise LabelError(f"no chip {example!r} in table {engine.store.table_name!r}")
        query = _unit_copy(vectors)[0]
        skip.add(example)
    elif chosen is Strategy.MEAN:
        query = mean_query(labelled.positives)
    else:
        query = rocchio_query(labelled.positives, labelled.negatives, beta)
    items = _neighbours(engine, query, depth, skip, filters)
    return Ranking(chosen.value, requested.value, note, COSINE, tuple(items), len(labelled.positives),
                   len(labelled.negatives), query)


def _classifier_ranking(engine: SearchEngine, labelled: _Labelled, beta: float,
                        filters: SearchFilters | None, skip: set[str], pool_size: int, c: float,
                        requested: Strategy, note: str) -> Ranking:
    model = train_classifier(labelled.positives, labelled.negatives, c)
    query = rocchio_query(labelled.positives, labelled.negatives, beta)
    pool: dict[str, ChipRecord] = {}
    for item in _neighbours(engine, query, pool_size, skip, filters):
        pool[item.chip.chip_id] = item.chip
    seeds = labelled.positives[-POOL_QUERIES:]
    per_seed = max(16, pool_size // len(seeds))
    for vector in seeds:
        for item in _neighbours(engine, vector, per_seed, skip, filters):
            pool.setdefault(item.chip.chip_id, item.chip)
    ids, vectors = engine.vectors(list(pool))
    if ids:
        features = _unit_copy(vectors)
        probability = model.predict_proba(features)[:, 1]
        margin = model.decision_function(features)  # orders chips whose probability saturates at 1
        order = np.argsort(-margin, kind="stable")
        items = tuple(RankedChip(pool[ids[i]], float(probability[i]), float(probability[i])) for i in order)
    else:
        items = ()
    return Ranking(Strategy.CLASSIFIER.value, requested.value, note, PROBABILITY, items,
                   len(labelled.positives), len(labelled.negatives), query)


def _split_labels(labels: dict[str, str]) -> tuple[list[str], list[str]]:
    return ([c for c, v in labels.items() if v == POSITIVE], [c for c, v in labels.items() if v == NEGATIVE])


def rank_session(engine: SearchEngine, session: str | Session, *, strategy: str | Strategy | None = None,
                 labels: LabelStore | None = None, **options: Any) -> Ranking:
    """`rank` on a session's labels (strategy: the session's own unless given)."""
    store = labels or LabelStore.for_engine(engine)
    current = store.session(session)
    ordered = store.labels(current)  # oldest first: the `single` strategy's example is the first positive
    positives, negatives = _split_labels({label.chip_id: label.label for label in ordered})
    return rank(engine, positives, negatives, strategy=strategy or current.strategy, **options)


# ----------------------------------------------------------------------------- spread
def spread_items(items: Iterable[RankedChip], cell_km: float | None, per_cell: int, count: int,
                 taken: Counter | None = None) -> list[RankedChip]:
    """The first `count` items, at most `per_cell` per grid cell of `cell_km` (no spreading when
    cell_km is None); `taken` carries cell counts across calls."""
    if count <= 0:
        return []
    if cell_km is None:
        return list(items)[:count]
    return cap_per_cell(items, cell_km, per_cell, count, taken)


# ----------------------------------------------------------------------------- quality
NO_EARLIER_ROUND = "undefined: no earlier round to compare with"
TOP_LIST_LABELLED = "undefined: every chip of the last round's top list is labelled now"


@dataclass(frozen=True)
class RankingChange:
    previous_round: int | None
    compared: int
    """How many top chips were compared (the last round's top list less the chips labelled since)."""
    jaccard: float | None
    """|previous top ∩ current top| / |previous top ∪ current top| (1 = same set)."""
    rank_correlation: float | None
    """Spearman correlation of the ranks of the chips both top lists share (None below 3 shared)."""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ranking_change(previous_ids: Sequence[str], current_ids: Sequence[str], labelled: set[str],
                   previous_round: int | None = None) -> RankingChange:
    """How much the ranking of the still-unlabelled chips moved since the previous round."""
    if previous_round is None and not previous_ids:
        return RankingChange(None, 0, None, None, NO_EARLIER_ROUND)
    before = [c for c in previous_ids if c not in labelled]
    if not before:
        return RankingChange(previous_round, 0, None, None, TOP_LIST_LABELLED)
    after = list(current_ids[:len(before)])
    union = set(before) | set(after)
    shared = [c for c in before if c in set(after)]
    correlation = None
    if len(shared) >= 3:
        from scipy.stats import spearmanr

        position = {c: i for i, c in enumerate(after)}
        value = spearmanr(range(len(shared)), [position[c] for c in shared]).statistic
        correlation = None if not np.isfinite(value) else float(value)
    return RankingChange(previous_round, len(before), len(shared) / len(union) if union else None, correlation)


@dataclass(frozen=True)
class SeedSetMetrics:
    session: str
    round: int
    n_positive: int
    n_negative: int
    cross_validation: CrossValidation
    ranking_change: RankingChange

    def to_dict(self) -> dict[str, Any]:
        return {"session": self.session, "round": self.round, "n_positive": self.n_positive,
                "n_negative": self.n_negative, "cross_validation": self.cross_validation.to_dict(),
                "ranking_change": self.ranking_change.to_dict()}


def seed_set_metrics(engine: SearchEngine, session: str | Session, *, strategy: str | None = None,
                     labels: LabelStore | None = None, track_n: int = TRACK_N, **options: Any) -> SeedSetMetrics:
    """Cross-validated precision/recall of the classifier on the session's labels, and how the
    current ranking differs from the last recorded round's."""
    store = labels or LabelStore.for_engine(engine)
    current = store.session(session)
    label_map = store.label_map(current)
    positives, negatives = _split_labels(label_map)
    labelled = _labelled_vectors(engine, positives, negatives)
    validation = cross_validate(labelled.positives, labelled.negatives, options.get("c", DEFAULT_C))
    rounds = store.rounds(current)
    if not positives:
        change = RankingChange(None, 0, None, None, "undefined: no positive labels, so no ranking")
    else:
        ranking = rank(engine, positives, negatives, strategy=strategy or current.strategy,
                       depth=track_n, **options)
        change = ranking_change(rounds[-1].top_ids if rounds else (), ranking.chip_ids[:track_n],
                                set(label_map), rounds[-1].round if rounds else None)
    return SeedSetMetrics(current.name, current.current_round, len(positives), len(negatives),
                          validation, change)


def recorded_metrics(session: str, record: RoundRecord) -> SeedSetMetrics:
    """The figures `next_round` measured when `record`'s round started, from the rounds table (so
    a resumed session or another browser tab shows them without recomputing), with the notes
    `next_round` gave. `ranking_change.compared` is not recorded and reads 0."""
    if record.cv_method is None:
        validation = CrossValidation(None, None, None, _too_few_to_validate(record.n_positive, record.n_negative))
    else:
        validation = CrossValidation(record.cv_method, record.cv_precision, record.cv_recall,
                                     "" if record.cv_precision is not None else NO_PREDICTED_POSITIVES)
    previous = record.round - 1 if record.round > 1 else None
    note = "" if record.jaccard is not None else (NO_EARLIER_ROUND if previous is None else TOP_LIST_LABELLED)
    change = RankingChange(previous, 0, record.jaccard, record.rank_correlation, note)
    return SeedSetMetrics(session, record.round, record.n_positive, record.n_negative, validation, change)


# ----------------------------------------------------------------------------- proposals
@dataclass(frozen=True)
class Proposal:
    rank: int
    chip: ChipRecord
    score: float
    kind: str
    """`top` (best-scoring) or `uncertain` (classifier probability nearest 0.5)."""

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "kind": self.kind, "score": round(self.score, 6), **self.chip.to_dict()}


@dataclass(frozen=True)
class Proposals:
    session: str
    round: int
    strategy: str
    requested_strategy: str
    note: str
    score_kind: str
    proposals: list[Proposal]
    metrics: SeedSetMetrics | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"session": self.session, "round": self.round, "strategy": self.strategy,
                "requested_strategy": self.requested_strategy, "note": self.note,
                "score_kind": self.score_kind, "proposals": [p.to_dict() for p in self.proposals],
                "metrics": self.metrics.to_dict() if self.metrics else None}


def select_proposals(ranking: Ranking, n: int, uncertain: int = 0, spread_km: float | None = None,
                     per_cell: int = 1) -> tuple[list[Proposal], str]:
    """The next `n` chips to label from a ranking: the best `n - uncertain`, then the `uncertain`
    ones whose classifier probability is nearest 0.5; at most `per_cell` per `spread_km` cell.
    Returns the proposals and a note (e.g. why no uncertain ones could be picked)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_K:
        raise LabelError(f"number of proposals must be within 1..{MAX_K}, got {n!r}")
    if isinstance(uncertain, bool) or not isinstance(uncertain, int) or not 0 <= uncertain <= n:
        raise LabelError(f"uncertain proposals must be within 0..{n}, got {uncertain!r}")
    note = ""
    if uncertain and ranking.strategy != Strategy.CLASSIFIER.value:
        note = f"no uncertain proposals: they need the classifier, and this round used {ranking.strategy}"
        uncertain = 0
    taken: Counter = Counter()
    top = spread_items(ranking.items, spread_km, per_cell, n - uncertain, taken)
    chosen = {item.chip.chip_id for item in top}
    rest = [item for item in ranking.items if item.chip.chip_id not in chosen]
    rest.sort(key=lambda item: abs((item.probability if item.probability is not None else 1.0) - 0.5))
    doubtful = spread_items(rest, spread_km, per_cell, uncertain, taken)
    proposals = [Proposal(i, item.chip, item.score, "top") for i, item in enumerate(top, start=1)]
    proposals += [Proposal(len(top) + i, item.chip, item.score, "uncertain")
                  for i, item in enumerate(doubtful, start=1)]
    return proposals, note


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def propose(engine: SearchEngine, session: str | Session, n: int = 20, *, uncertain: int = 0,
            strategy: str | None = None, spread_km: float | None = None, per_cell: int = 1,
            labels: LabelStore | None = None, **options: Any) -> Proposals:
    """The next chips to label in a session, without recording anything (safe to call on every
    app rerun). Options: beta, filters, example, pool_size, min_per_class, c."""
    store = labels or LabelStore.for_engine(engine)
    current = store.session(session)
    ranking = rank_session(engine, current, strategy=strategy, labels=store,
                           depth=_depth(n, spread_km, options.pop("depth", None)), **options)
    proposals, note = select_proposals(ranking, n, uncertain, spread_km, per_cell)
    return Proposals(current.name, current.current_round, ranking.strategy, ranking.requested_strategy,
                     _join(ranking.note, note), ranking.score_kind, proposals)


def next_round(engine: SearchEngine, session: str | Session, n: int = 20, *, uncertain: int = 0,
               strategy: str | None = None, spread_km: float | None = None, per_cell: int = 1,
               labels: LabelStore | None = None, track_n: int = TRACK_N, **options: Any) -> Proposals:
    """Start the session's next round: rank, propose, measure the seed set, and record the round
    (its top `track_n` list and figures) so the next round can say how much the ranking moved.
    Labels given after this carry the new round's number."""
    store = labels or LabelStore.for_engine(engine)
    current = store.session(session)
    label_map = store.label_map(current)
    positives, negatives = _split_labels(label_map)
    ranking = rank_session(engine, current, strategy=strategy, labels=store,
                           depth=max(track_n, _depth(n, spread_km, options.pop("depth", None))), **options)
    proposals, note = select_proposals(ranking, n, uncertain, spread_km, per_cell)
    labelled = _labelled_vectors(engine, positives, negatives)
    validation = cross_validate(labelled.positives, labelled.negatives, options.get("c", DEFAULT_C))
    rounds = store.rounds(current)
    change = ranking_change(rounds[-1].top_ids if rounds else (), ranking.chip_ids[:track_n], set(label_map),
                            rounds[-1].round if rounds else None)
    advanced = store.advance_round(current)
    store.record_round(advanced, RoundRecord(
        round=advanced.current_round, created=datetime.now(timezone.utc), strategy=ranking.strategy,
        requested_strategy=ranking.requested_strategy, note=ranking.note, n_positive=len(positives),
        n_negative=len(negatives), top_ids=tuple(ranking.chip_ids[:track_n]),
        top_scores=tuple(item.score for item in ranking.items[:track_n]), cv_method=validation.method,
        cv_precision=validation.precision, cv_recall=validation.recall, jaccard=change.jaccard,
        rank_correlation=change.rank_correlation))
    metrics = SeedSetMetrics(advanced.name, advanced.current_round, len(positives), len(negatives),
                             validation, change)
    return Proposals(advanced.name, advanced.current_round, ranking.strategy, ranking.requested_strategy,
                     _join(ranking.note, note), ranking.score_kind, proposals, metrics)


def _depth(n: int, spread_km: float | None, depth: int | None) -> int:
    if depth is not None:
        return depth
    # Spreading drops chips from crowded cells, so look further down the ranking.
    return min(MAX_K, max(200, n * (16 if spread_km is not None else 4)))
