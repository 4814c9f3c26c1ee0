"""A named query of sql/queries.sql as a SQLAlchemy statement: the one builder the MySQL adapter uses."""

from __future__ import annotations

from functools import cache

import sqlalchemy as sa

from flashsale.adapters.mysql import sql


@cache  # a statement is immutable: built once, not parsed again for every batch
def query(name: str, *expanding: str) -> sa.TextClause:
    """The query `name`; each parameter in `expanding` takes a list (`IN :tokens`)."""
    clause = sa.text(sql.query(name))
    if expanding:
        clause = clause.bindparams(*(sa.bindparam(p, expanding=True) for p in expanding))
    return clause
