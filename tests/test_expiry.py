"""Expiry: sliding TTLs under writes, names re-created elsewhere, concurrent creates, skewed clocks."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from app.models import StreamConflictError
from app.settings import Settings
from app.store import NewStream, Store

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("settings", ["postgres"], indirect=True)
async def test_concurrent_creates_of_one_name_on_postgres(settings: Settings) -> None:
    async with Store.open(settings) as one, Store.open(settings) as two:
        for i in range(30):
            same = NewStream(namespace="race", name=f"race/same-{i}", content_type="text/plain")
            made = await asyncio.gather(one.create(same), two.create(same))
            assert sorted(created for _, created in made) == [False, True]
            assert made[0][0].id == made[1][0].id
            other = dataclasses.replace(same, name=f"race/other-{i}", content_type="application/json")
            results = await asyncio.gather(
                one.create(dataclasses.replace(other, content_type="text/plain")),
                two.create(other),
                return_exceptions=True,
            )
            conflicts = [r for r in results if isinstance(r, StreamConflictError)]
            assert len(conflicts) == 1, results
            assert [r[1] for r in results if isinstance(r, tuple)] == [True]
