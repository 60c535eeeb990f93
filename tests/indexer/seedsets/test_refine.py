"""Query strategies, the classifier's re-ranking, proposals per round, spread and seed-set quality,
on small tables whose right answers are known."""

import numpy as np
import pytest

from chipscout.indexer.seedsets import refine
from chipscout.indexer.seedsets.labels import LabelError, LabelStore
from chipscout.indexer.seedsets.refine import RankedChip, Strategy
from chipscout.indexer.search import SearchEngine
from chipscout.indexer.search import grid_cell
from tests.synthetic import clustered_table, write_table


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """One positive, one negative, and two candidates: `near_neg` is a little closer to the
    positive than `away`, but lies towards the negative, so the negative must push it down."""
    e = np.eye(4)
    vectors = {
        "pos": e[0], "neg": _unit(e[0] + e[1]),
        "near_neg": _unit(e[0] + 0.5 * e[1]),  # cos to pos 0.894
        "away": _unit(e[0] + 0.55 * e[2]),  # cos to pos 0.876
        "far1": _unit(e[3] + 0.2 * e[0]), "far2": _unit(e[3] - 0.1 * e[2]),
    }
    db = str(tmp_path_factory.mktemp("pushed") / "db")
    ids = list(vectors)
    write_table(db, "pushed", ids, np.array([vectors[c] for c in ids]),
                [(5.0 + 0.1 * i, 50.0) for i in range(len(ids))])
    return SearchEngine(db, "pushed")


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("clusters") / "db")
    members = clustered_table(db, "clusters", per_cluster=12)
    return SearchEngine(db, "clusters"), members


@pytest.fixture()
def session(clusters):
    engine, members = clusters
    store = LabelStore.for_engine(engine)
    name = f"s{np.random.default_rng().integers(1 << 30)}"
    store.create_session(name)
    yield store, name, members
    store.delete_session(name)


def test_query_vectors_follow_their_formulas():
    pos = np.array([[2.0, 0, 0], [0, 1.0, 0]])
    neg = np.array([[0, 0, 3.0]])
    assert np.allclose(refine.mean_query(pos), _unit([1, 1, 0]))
    assert np.allclose(refine.rocchio_query(pos, neg, beta=0.5), _unit([0.5, 0.5, -0.5]))
    assert np.allclose(refine.rocchio_query(pos, neg[:0]), refine.mean_query(pos))
    with pytest.raises(LabelError, match="zero vector"):
        refine.rocchio_query(pos[:1], pos[:1], beta=1.0)
    with pytest.raises(LabelError, match="beta"):
        refine.rocchio_query(pos, neg, beta=-1)


def test_negatives_push_the_ranking_away(pushed):
    single = refine.rank(pushed, ["pos"], ["neg"], strategy="single")
    mean = refine.rank(pushed, ["pos"], ["neg"], strategy="mean")
    rocchio = refine.rank(pushed, ["pos"], ["neg"], strategy="rocchio", beta=0.5)
    assert single.chip_ids[:2] == mean.chip_ids[:2] == ["near_neg", "away"]
    assert rocchio.chip_ids[:2] == ["away", "near_neg"]
    assert (single.strategy, mean.strategy, rocchio.strategy) == ("single", "mean", "rocchio")
    assert rocchio.score_kind == "cosine similarity" and rocchio.items[0].score > rocchio.items[1].score
    for ranking in (single, mean, rocchio):
        assert not {"pos", "neg"} & set(ranking.chip_ids)  # labelled chips are never ranked
    # A named example needs no label; it is left out of its own ranking.
    assert refine.rank(pushed, [], strategy="single", example="away").chip_ids[0] == "pos"


def test_strategy_fallbacks_say_why():
    assert refine.choose_strategy("auto", 1, 0) == (Strategy.SINGLE, refine.choose_strategy("auto", 1, 0)[1])
    chosen, note = refine.choose_strategy("auto", 2, 0)
    assert chosen is Strategy.MEAN and "classifier needs at least 3" in note
    chosen, note = refine.choose_strategy("classifier", 5, 2)
    assert chosen is Strategy.ROCCHIO and "fell back to rocchio" in note and "2 negative" in note
    assert refine.choose_strategy("rocchio", 2, 0)[0] is Strategy.MEAN
    assert refine.choose_strategy("auto", 3, 3) == (Strategy.CLASSIFIER, "")
    with pytest.raises(LabelError, match="no positive labels"):
        refine.choose_strategy("mean", 0, 4)
    with pytest.raises(LabelError, match="unknown strategy"):
        refine.choose_strategy("knn", 1, 1)


def test_classifier_needs_both_classes():
    with pytest.raises(LabelError, match="positive and negative labels; have 3 positive and 0 negative"):
        refine.train_classifier(np.ones((3, 4)), np.zeros((0, 4)))


def test_classifier_reranks_the_pool(clusters):
    engine, members = clusters
    positives, negatives = members["a"][:3], members["b"][:2] + members["c"][:2]
    ranking = refine.rank(engine, positives, negatives, strategy="auto")
    assert ranking.strategy == "classifier" and ranking.requested_strategy == "auto"
    assert ranking.score_kind == "probability"
    ids = ranking.chip_ids
    rest_of_a = set(members["a"]) - set(positives)
    assert set(ids[:len(rest_of_a)]) == rest_of_a  # every unlabelled `a` first
    assert not set(positives + negatives) & set(ids)
    probabilities = [item.probability for item in ranking.items]
    assert all(0 <= p <= 1 for p in probabilities)
    assert probabilities == sorted(probabilities, reverse=True)
    below = refine.rank(engine, positives, negatives[:2], strategy="classifier")  # 2 negatives
    assert below.strategy == "rocchio" and "fell back" in below.note


def test_rounds_never_repropose_labelled_chips(session, clusters):
    store, name, members = session
    engine, _ = clusters
    store.set_labels(name, {members["a"][0]: "positive"})
    seen = set()
    for _ in range(4):
        result = refine.next_round(engine, name, 6)
        proposed = [p.chip.chip_id for p in result.proposals]
        labelled = set(store.label_map(name))
        assert len(proposed) == 6 and not labelled & set(proposed) and not seen & set(proposed)
        seen |= set(proposed)
        store.set_labels(name, {c: "positive" if c[0] == "a" else "negative" for c in proposed},
                         scores={p.chip.chip_id: p.score for p in result.proposals}, strategy=result.strategy)
    labels = store.labels(name)
    assert {label.round for label in labels} == {0, 1, 2, 3, 4}
    assert store.session(name).current_round == 4
    rounds = store.rounds(name)
    assert [r.round for r in rounds] == [1, 2, 3, 4]
    assert rounds[0].strategy == "single" and rounds[-1].strategy == "classifier"
    assert rounds[-1].jaccard is not None and 0 <= rounds[-1].jaccard <= 1
    # propose() is a preview: it records nothing and keeps the round.
    refine.propose(engine, name, 3)
    assert store.session(name).current_round == 4 and len(store.rounds(name)) == 4


def test_uncertain_proposals_are_nearest_one_half(session, clusters):
    store, name, members = session
    engine, _ = clusters
    store.set_labels(name, {**{c: "positive" for c in members["a"][:3]}, **{c: "negative" for c in members["b"][:3]}})
    result = refine.propose(engine, name, 6, uncertain=2)
    kinds = [p.kind for p in result.proposals]
    assert kinds == ["top"] * 4 + ["uncertain"] * 2 and result.strategy == "classifier"
    ranking = refine.rank_session(engine, name)
    top = {p.chip.chip_id for p in result.proposals[:4]}
    rest = sorted((item for item in ranking.items if item.chip.chip_id not in top),
                  key=lambda item: abs(item.probability - 0.5))
    assert [p.chip.chip_id for p in result.proposals[4:]] == [item.chip.chip_id for item in rest[:2]]
    store.remove_labels(name, members["b"][:3])
    fallback = refine.propose(engine, name, 4, uncertain=2)
    assert [p.kind for p in fallback.proposals] == ["top"] * 4 and "need the classifier" in fallback.note


def test_spread_limits_proposals_per_cell(session, clusters):
    store, name, members = session
    engine, _ = clusters
    store.set_labels(name, {members["a"][0]: "positive"})
    result = refine.propose(engine, name, 5, spread_km=5.0, per_cell=1)
    cells = [grid_cell(p.chip.center_lon, p.chip.center_lat, 5.0) for p in result.proposals]
    assert len(cells) == len(set(cells)) == 5
    crowded = refine.propose(engine, name, 5)
    assert len({grid_cell(p.chip.center_lon, p.chip.center_lat, 5.0) for p in crowded.proposals}) < 5


def test_spread_items_is_pure(clusters):
    engine, members = clusters
    chips = engine.get_chips(members["a"])  # one row, 0.02 degrees (~1.6 km) apart
    items = [RankedChip(chip, 1.0 - i / 100) for i, chip in enumerate(chips)]
    assert [i.chip.chip_id for i in refine.spread_items(items, None, 1, 3)] == members["a"][:3]
    kept = refine.spread_items(items, 10.0, 2, 12)
    assert 2 <= len(kept) < 12
    assert all(n <= 2 for n in np.unique([grid_cell(i.chip.center_lon, i.chip.center_lat, 10.0)
                                          for i in kept], axis=0, return_counts=True)[1])


def test_cross_validation_methods_and_undefined_cases():
    rng = np.random.default_rng(0)
    pos = rng.normal(1.0, 0.3, (4, 6))
    neg = rng.normal(-1.0, 0.3, (4, 6))
    tiny = refine.cross_validate(pos, neg)
    assert tiny.method == "leave-one-out" and tiny.precision == 1.0 and tiny.recall == 1.0
    more = refine.cross_validate(rng.normal(1.0, 0.3, (12, 6)), rng.normal(-1.0, 0.3, (7, 6)))
    assert more.method == "stratified 5-fold" and more.recall == 1.0
    three = refine.cross_validate(rng.normal(1.0, 0.3, (9, 6)), rng.normal(-1.0, 0.3, (3, 6)))
    assert three.method == "stratified 3-fold"
    undefined = refine.cross_validate(pos, neg[:1])
    assert undefined.method is None and undefined.precision is None and "at least 2" in undefined.note


def test_ranking_change():
    first = refine.ranking_change([], ["a", "b"], set())
    assert first.jaccard is None and "no earlier round" in first.note
    same = refine.ranking_change(["x", "a", "b", "c", "d"], ["a", "b", "c", "d", "e"], {"x"}, 1)
    assert same.compared == 4 and same.jaccard == 1.0 and same.rank_correlation == pytest.approx(1.0)
    moved = refine.ranking_change(["a", "b", "c", "d"], ["d", "c", "b", "a"], set(), 2)
    assert moved.jaccard == 1.0 and moved.rank_correlation == pytest.approx(-1.0)
    half = refine.ranking_change(["a", "b"], ["a", "z"], set(), 3)
    assert half.jaccard == pytest.approx(1 / 3) and half.rank_correlation is None
    gone = refine.ranking_change(["a"], ["z"], {"a"}, 3)
    assert gone.jaccard is None and "labelled now" in gone.note


def test_metrics_of_a_session(session, clusters):
    store, name, members = session
    engine, _ = clusters
    store.set_labels(name, {members["a"][0]: "positive"})
    early = refine.seed_set_metrics(engine, name)
    assert early.cross_validation.method is None and early.ranking_change.jaccard is None
    store.set_labels(name, {**{c: "positive" for c in members["a"][1:4]}, **{c: "negative" for c in members["c"][:3]}})
    refine.next_round(engine, name, 3)
    metrics = refine.seed_set_metrics(engine, name)
    assert metrics.n_positive == 4 and metrics.n_negative == 3 and metrics.round == 1
    assert metrics.cross_validation.method == "leave-one-out" and metrics.cross_validation.recall == 1.0
    assert metrics.ranking_change.previous_round == 1 and metrics.ranking_change.jaccard == 1.0
    assert set(metrics.to_dict()) >= {"cross_validation", "ranking_change", "n_positive"}


def test_recorded_metrics_repeat_what_the_round_reported(session, clusters):
    """A resumed session (or another browser tab) reads a round's figures back from the rounds table."""
    store, name, members = session
    engine, _ = clusters
    store.set_labels(name, {members["a"][0]: "positive", members["c"][0]: "negative"})
    first = refine.next_round(engine, name, 3)
    store.set_labels(name, {**{c: "positive" for c in members["a"][1:4]}, **{c: "negative" for c in members["c"][1:4]}})
    second = refine.next_round(engine, name, 3)
    records = store.rounds(name)
    assert [r.round for r in records] == [1, 2]
    for reported, record in zip((first.metrics, second.metrics), records):
        recorded = refine.recorded_metrics(name, record)
        assert (recorded.round, recorded.n_positive, recorded.n_negative) == \
            (reported.round, reported.n_positive, reported.n_negative)
        assert recorded.cross_validation == reported.cross_validation
        assert (recorded.ranking_change.previous_round, recorded.ranking_change.jaccard,
                recorded.ranking_change.rank_correlation, recorded.ranking_change.note) == \
            (reported.ranking_change.previous_round, reported.ranking_change.jaccard,
             reported.ranking_change.rank_correlation, reported.ranking_change.note)
    assert "at least 2" in refine.recorded_metrics(name, records[0]).cross_validation.note
    assert "no earlier round" in refine.recorded_metrics(name, records[0]).ranking_change.note
    assert refine.recorded_metrics(name, records[1]).cross_validation.method == "leave-one-out"


def test_ranking_on_a_real_table(indexed_db):
    """The strategies run on the real 98-chip RCF table (read only: nothing is labelled there)."""
    engine = SearchEngine(indexed_db, "chips")
    ids = [c.chip_id for c in engine.sample(8, seed=1)]
    for strategy in ("single", "mean", "rocchio", "classifier"):
        ranking = refine.rank(engine, ids[:4], ids[4:], strategy=strategy, depth=20)
        assert ranking.strategy == strategy and ranking.items
        assert not set(ids) & set(ranking.chip_ids)
