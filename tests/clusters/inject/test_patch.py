"""JSON Patch: `diff` then `apply` (ours, and the `jsonpatch` package) gives back the target."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
from hypothesis import given
from hypothesis import strategies as st

from clusters.inject.patch import apply, diff, pointer

_keys = st.sampled_from(["a", "b", "c", "x/y", "m~n", ""])
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=20,
)


@given(_json, _json)
def test_diff_then_apply_gives_the_target(old: Any, new: Any) -> None:
    ops = diff(old, new)
    assert apply(copy.deepcopy(old), ops) == new
    assert jsonpatch.apply_patch(old, ops) == new


@given(_json)
def test_an_unchanged_document_has_an_empty_patch(doc: Any) -> None:
    assert diff(doc, copy.deepcopy(doc)) == []


def test_a_list_grown_around_its_elements_gets_adds_not_a_replacement() -> None:
    old = {"c": [{"name": "app"}]}
    new = {"c": [{"name": "init"}, {"name": "proxy"}, {"name": "app"}, {"name": "tail"}]}
    assert diff(old, new) == [
        {"op": "add", "path": "/c/0", "value": {"name": "init"}},
        {"op": "add", "path": "/c/1", "value": {"name": "proxy"}},
        {"op": "add", "path": "/c/3", "value": {"name": "tail"}},
    ]


def test_pointers_escape_slash_and_tilde() -> None:
    assert pointer(("metadata", "annotations", "fedgate.io/injected")) == (
        "/metadata/annotations/fedgate.io~1injected"
    )
    assert pointer(("a~b", 0)) == "/a~0b/0"


_pods = st.fixed_dictionaries(
    {"apiVersion": st.just("v1"), "kind": st.just("Pod")},
    optional={"metadata": _json, "spec": _json},
)


@given(_pods, _json)
def test_review_of_any_pod_answers_or_raises_admission_error(pod: Any, namespace: Any) -> None:
    """The webhook faces the network: whatever the object holds, it answers or says why not."""
    from clusters.inject.admission import AdmissionError, review
    from clusters.inject.spec import InjectSettings

    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u",
            "kind": {"kind": "Pod"},
            "operation": "CREATE",
            "namespace": namespace,
            "object": pod,
        },
    }
    try:
        answer = review(body, InjectSettings("east", "ctl:15012"))
    except AdmissionError:
        return
    assert answer["response"]["uid"] == "u"
    assert answer["response"]["allowed"] is True
