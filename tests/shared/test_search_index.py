"""shared.search past EXACT_BELOW matching rows, where the HNSW index answers: the tenant is a
condition of the index scan itself (another tenant's nearer vectors never appear and never starve
the answer), and a scan that gives up early is answered exactly. Real Postgres with pgvector."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import event, text

from shared.db import session_scope
from shared.search import EXACT_BELOW, Query, search
from shared.tables import Embedding
from tests.support.api import insert_job

MODEL = "test-index-model"
N = EXACT_BELOW + 200  # rows per tenant: past the exact path


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture()
def stored(sessions, make_tenant):
    """Tenant `mine`: N random vectors, half tagged group=x. Tenant `theirs`: N vectors all
    nearer the query than any of mine."""
    rng = np.random.default_rng(7)
    query = unit(rng.normal(size=512))
    mine_t, theirs_t = make_tenant(), make_tenant()
    mine = unit(rng.normal(size=(N, 512)))
    theirs = unit(query + 0.05 * rng.normal(size=(N, 512)))
    for tenant, vectors, owner in ((mine_t, mine, "mine"), (theirs_t, theirs, "theirs")):
        job_id = insert_job(sessions, tenant, status="succeeded")
        with session_scope(sessions) as session:
            session.add_all(Embedding(tenant_id=tenant.tenant_id, job_id=job_id, model=MODEL, dims=512,
                                      metadata_={"i": str(i), "owner": owner, "group": "x" if i % 2 else "y"},
                                      embedding=v.tolist()) for i, v in enumerate(vectors))
    return query, mine_t.tenant_id, mine


def exact_top(mine: np.ndarray, query: np.ndarray, k: int, keep=lambda i: True) -> list[str]:
    order = np.argsort(-(mine @ query))
    return [str(i) for i in order if keep(i)][:k]


def test_the_index_answers_only_with_the_tenants_rows(sessions, stored):
    query, tenant_id, mine = stored
    with sessions() as session, session.begin():
        hits = search(session, tenant_id, Query(vector=query.tolist(), model=MODEL, limit=10))
    assert len(hits) == 10 and all(h.metadata["owner"] == "mine" for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    found = {h.metadata["i"] for h in hits}
    assert len(found & set(exact_top(mine, query, 10))) >= 8  # approximate, but close to exact


def test_a_scan_that_gives_up_early_is_answered_exactly(sessions, stored):
    query, tenant_id, mine = stored
    with sessions() as session, session.begin():
        # the fault: the index may visit only 50 tuples, nearly all of them the other tenant's
        session.execute(text("SET LOCAL hnsw.max_scan_tuples = 50"))
        hits = search(session, tenant_id, Query(vector=query.tolist(), model=MODEL, limit=10, ef_search=20))
    assert [h.metadata["i"] for h in hits] == exact_top(mine, query, 10)


def test_filters_narrow_the_index_scan(sessions, stored):
    query, tenant_id, mine = stored
    with sessions() as session, session.begin():
        hits = search(session, tenant_id, Query(vector=query.tolist(), model=MODEL, limit=20,
                                                metadata={"group": "x"}))
    assert len(hits) == 20 and all(h.metadata["group"] == "x" and h.metadata["owner"] == "mine" for h in hits)
    want = exact_top(mine, query, 20, keep=lambda i: i % 2 == 1)
    assert len({h.metadata["i"] for h in hits} & set(want)) >= 16


def test_the_half_precision_index_serves_the_query_and_scores_are_exact(sessions, stored):
    """The candidates come from the HNSW index over half-precision copies (migration 0009), not a
    scan and a sort; the scores are the exact fp32 cosine, as numpy computes it."""
    query, tenant_id, mine = stored
    engine = sessions.kw["bind"]
    seen: list[tuple[str, dict]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "halfvec" in statement:
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with sessions() as session, session.begin():
            hits = search(session, tenant_id, Query(vector=query.tolist(), model=MODEL, limit=10))
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(seen) == 1
    statement, parameters = seen[0]
    with engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SET LOCAL enable_sort = off")
        plan = "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters))
    assert "ix_embeddings_hnsw_half_512" in plan, plan
    for hit in hits:
        assert hit.score == pytest.approx(float(mine[int(hit.metadata["i"])] @ query), abs=1e-5)
