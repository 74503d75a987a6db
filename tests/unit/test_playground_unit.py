"""Playground pieces that need no running service: ranking and input parsing,
the gRPC -> HTTP error mapping, sign-in, and the offline page assets."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from services.common.config import load_settings
from services.common.errors import Status, StatusError
from services.playground.app import STATIC_DIR, create_app
from services.playground.cli import InputError, parse_flags, parse_likert, parse_ranking, read_batch
from services.playground.client import FLAG_NAMES, Judgement, ranks_from_groups, request_id_for


def test_ranks_from_groups_are_dense_and_leave_unranked_at_zero():
    assert ranks_from_groups([[2], [0, 3], [1]], 4) == [2, 3, 1, 2]
    assert ranks_from_groups([[1], [0]], 4) == [2, 1, 0, 0]


@pytest.mark.parametrize(
    "text, ranks",
    [("C A=D B", [2, 3, 1, 2]), ("c,a,d,b", [2, 4, 1, 3]), ("3 1=4 2", [2, 3, 1, 2]), ("B A", [2, 1, 0, 0])],
)
def test_parse_ranking(text, ranks):
    assert parse_ranking(text, 4) == ranks


@pytest.mark.parametrize(
    "text, fragment", [("A E", "unknown sample 'E'"), ("A A", "appears twice"), ("  ", "type a ranking")]
)
def test_parse_ranking_rejects_what_it_cannot_read(text, fragment):
    with pytest.raises(InputError, match=fragment):
        parse_ranking(text, 4)


def test_parse_likert_and_flags():
    assert parse_likert("A=6 c=2", 4) == {0: 6, 2: 2}
    assert parse_flags("B:hallucination,harmful-advice", 4) == {
        1: ["LABEL_FLAG_HALLUCINATION", "LABEL_FLAG_HARMFUL_ADVICE"]
    }
    with pytest.raises(InputError, match="write SAMPLE=SCORE"):
        parse_likert("A6", 4)
    with pytest.raises(InputError, match="unknown flag 'rude'"):
        parse_flags("A:rude", 4)


def test_read_batch_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("# a comment\nfirst prompt\n\nsecond prompt\n")
    assert read_batch(text) == [(2, {"prompt": "first prompt"}), (4, {"prompt": "second prompt"})]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    assert [n for n, _ in read_batch(jsonl)] == [1, 2]
    jsonl.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(InputError, match='p.jsonl:1: each line needs a "prompt"'):
        read_batch(jsonl)


def test_request_ids_are_stable_and_valid_for_the_feedback_service():
    rid = request_id_for("batch", "abc", "3")
    assert rid == request_id_for("batch", "abc", "3") != request_id_for("batch", "abc", "4")
    assert re.fullmatch(r"[0-9a-f]{32}", rid)


def test_a_judgement_travels_as_one_value_and_names_a_bad_flag():
    proto = Judgement("task-1-s0", 6, 1, ("LABEL_FLAG_HALLUCINATION",)).to_proto(0)
    assert (proto.sample_id, proto.likert, proto.rank, list(proto.flags)) == ("task-1-s0", 6, 1, [2])
    with pytest.raises(StatusError) as info:
        Judgement("task-1-s1", 6, 1, ("LABEL_FLAG_NOPE",)).to_proto(3)
    assert info.value.status is Status.INVALID_ARGUMENT and info.value.message.startswith("judgements[3].flags:")


@pytest.fixture
def web(tmp_path):
    # Targets nobody listens on: these routes must answer without the services.
    settings = load_settings(
        {
            "RLHF_HOME": str(tmp_path),
            "RLHF_TOKENS": "tok-u=u1:user,tok-lab=lab1:labeler",
            "RLHF_POLICY_TARGET": "127.0.0.1:9",
            "RLHF_FEEDBACK_TARGET": "127.0.0.1:9",
            "RLHF_LABELING_TARGET": "127.0.0.1:9",
        }
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_sign_in_checks_the_token(web):
    assert web.post("/api/session", headers={"Authorization": "Bearer tok-lab"}).json() == {
        "user_id": "lab1",
        "role": "labeler",
        "labeler": True,
    }
    assert web.post("/api/session", headers={"Authorization": "Bearer tok-u"}).json()["labeler"] is False
    bad = web.post("/api/session", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"] == {
        "code": "UNAUTHENTICATED",
        "message": "unknown bearer token",
        "service": "playground",
    }
    assert web.post("/api/session").status_code == 401


def test_labeling_routes_need_a_labeler(web):
    reply = web.get("/api/task", headers={"Authorization": "Bearer tok-u"})
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "PERMISSION_DENIED"


def test_bad_body_names_the_field(web):
    reply = web.post(
        "/api/task",
        json={"task_id": "t", "judgements": [{"sample_id": "s", "likert": 3, "rank": -1}]},
        headers={"Authorization": "Bearer tok-lab"},
    )
    assert reply.status_code == 422
    assert reply.json()["error"]["message"].startswith("judgements.0.rank:")


def test_unreachable_service_is_reported_not_swallowed(web):
    reply = web.get("/api/task", headers={"Authorization": "Bearer tok-lab"})
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "UNAVAILABLE" and reply.json()["error"]["service"] == "labeling"


def test_page_is_offline_and_labelled(web):
    page = web.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("index.html", "app.js", "app.css"):
        text = (STATIC_DIR / asset).read_text()
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), f"{asset} loads something from elsewhere"
        assert "@import" not in text and "url(http" not in text
    assert web.get("/static/app.js").status_code == 200
    # every form control has a label
    html = page.text
    for control in re.findall(r'<(?:input|textarea|select)[^>]*\bid="([^"]+)"', html):
        assert f'for="{control}"' in html, f"#{control} has no <label for>"
    flags = web.get("/api/config").json()["flags"]
    assert [f["name"] for f in flags] == FLAG_NAMES and flags[0]["label"] == "Fails to follow instruction"
