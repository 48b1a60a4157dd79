"""Graph quality: passages joined through shared entities and within hops of each other."""

from __future__ import annotations

from collections import Counter

import networkx as nx

from cluster.eval.graph_quality import link_distance, linkage, passage_entities


def graph() -> nx.MultiDiGraph:
    """Passage a names tesla and edison; b is about edison (its title); c names westinghouse,
    whom edison's rival tesla worked with; d names only paris, related to nothing."""
    g = nx.MultiDiGraph()
    for key, chunks in {
        "tesla": ["a#0"],
        "edison": ["a#0", "b#0", "b#1"],
        "westinghouse": ["c#0"],
        "paris": ["d#0"],
        "smiljan": ["e#0"],
    }.items():
        g.add_node(key, chunks=Counter(chunks))
    g.add_edge("tesla", "edison", key="co_occurs")
    g.add_edge("westinghouse", "tesla", key="hired")  # edge direction does not matter
    g.add_edge("smiljan", "westinghouse", key="co_occurs")
    return g


def test_passages_hold_the_entities_their_chunks_mention() -> None:
    entities = passage_entities(graph())
    assert entities["a"] == {"tesla", "edison"} and entities["b"] == {"edison"}
    assert entities["d"] == {"paris"}


def test_link_distance_counts_relations_between_the_passages_entities() -> None:
    g = nx.Graph(graph().to_undirected())
    assert link_distance(g, {"tesla", "edison"}, {"edison"}, 2) == 0
    assert link_distance(g, {"edison"}, {"westinghouse"}, 2) == 2  # edison - tesla - westinghouse
    assert link_distance(g, {"edison"}, {"smiljan"}, 2) is None  # three hops
    assert link_distance(g, {"edison"}, {"paris"}, 2) is None


def test_linkage_shares_per_question_type() -> None:
    qrels = {
        "q1": {"a": 1, "b": 1},  # a shared entity
        "q2": {"b": 1, "c": 1},  # two hops
        "q3": {"a": 1, "d": 1},  # not linked
        "q4": {"a": 1},  # one passage: not a multi-passage question
        "q5": {"a": 1, "b": 1, "c": 1, "z": 0},  # the worst pair decides; grade 0 is not relevant
    }
    types = {"q1": "bridge", "q2": "bridge", "q3": "comparison"}
    report = linkage(graph(), qrels, types)
    assert report["all"] == {"questions": 4, "linked@0": 0.25, "linked@1": 0.25, "linked@2": 0.75}
    assert report["bridge"] == {"questions": 2, "linked@0": 0.5, "linked@1": 0.5, "linked@2": 1.0}
    assert report["comparison"] == {"questions": 1, "linked@0": 0.0, "linked@1": 0.0, "linked@2": 0.0}
