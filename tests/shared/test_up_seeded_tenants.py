"""What `up` records as seeded is per database, as its demo keys and prices are (the e2e test in
tests/e2e/test_up_state_dir.py starts `up` on two databases)."""

from __future__ import annotations

from openlora.commands.up import _seeded_tenants

OTHER = "postgresql+psycopg://postgres@db:5432/other"


def test_a_tenant_seeded_in_one_database_is_not_seeded_in_another():
    keys: dict = {}
    _seeded_tenants(keys, None).append("demo")
    assert _seeded_tenants(keys, OTHER) == []
    assert _seeded_tenants(keys, None) == ["demo"]


def test_the_one_list_of_an_older_state_dir_counts_where_the_tenant_has_a_demo_key():
    """The start that seeded a tenant saved its demo key with it: a database without that key is one
    where the seeding never finished."""
    keys = {
        "seeded_tenants": ["demo", "demo2", "demo"],
        "demo_keys_by_database": {
            "embedded": {"demo": "olk_a", "demo2": "olk_b"},
            "postgresql://db:5432/other": {},
        },
    }
    assert _seeded_tenants(keys, OTHER) == []
    assert _seeded_tenants(keys, None) == ["demo", "demo2"]
    assert "seeded_tenants" not in keys


def test_a_database_with_no_record_counts_the_tenants_it_has_demo_keys_for():
    keys = {"demo_keys_by_database": {"embedded": {"demo": "olk_a"}}}
    assert _seeded_tenants(keys, None) == ["demo"]
