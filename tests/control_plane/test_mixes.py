"""Saved mixes through AdminService, Authorize resolving a mix name, and the hints that invalidate them.

A mix is a tenant's name for a mix of adapters: its members are resolved as the tenant sees them when it
is saved and again whenever it is used, so visibility follows the adapters."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import pytest
import redis

from openlora.cli import main
from openlora.hints import HINTS_STREAM, Hint
from openlora.v1 import admin_pb2, inference_pb2, worker_pb2

BASE = "tiny-llama"


def _tenant_with_key(cp) -> tuple[str, str]:
    """A fresh tenant and an admin key of it (admin keys may also infer)."""
    name = f"mx-{uuid.uuid4().hex[:8]}"
    with cp.admin() as admin:
        admin.create_tenant(name)
        return name, admin.create_api_key(name, admin=True).secret


def _authorize(cp, api_key: str, names: list[str]) -> worker_pb2.AuthorizeResponse:
    return cp.worker_stub().Authorize(
        worker_pb2.AuthorizeRequest(api_key=api_key, adapters=names, base_model=BASE),
        metadata=cp.worker_metadata(),
    )


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _hints(redis_url: str, **match: str) -> list[Hint]:
    client = redis.Redis.from_url(redis_url)
    try:
        entries = [fields for _, fields in reversed(client.xrevrange(HINTS_STREAM, count=2000))]
    finally:
        client.close()
    hints = [Hint.from_fields(fields) for fields in entries]
    return [h for h in hints if all(getattr(h, k) == v for k, v in match.items())]


def test_create_list_and_delete_a_mix(cp, adapters_root) -> None:
    tenant, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "a", BASE)
        admin.upload_adapter(adapters_root / "b", "b", BASE)
        mix = admin.create_mix("blend", [("a", 0.6), ("b", 0.4)], method="ties", density=0.5)
        assert (mix.name, mix.tenant, mix.method) == ("blend", tenant, inference_pb2.MIX_METHOD_TIES)
        assert [(m.adapter, round(m.weight, 6)) for m in mix.members] == [("a", 0.6), ("b", 0.4)]
        assert mix.density == pytest.approx(0.5)
        assert mix.majority_sign_method == inference_pb2.MAJORITY_SIGN_METHOD_TOTAL
        assert mix.combine == inference_pb2.ENSEMBLE_COMBINE_UNSPECIFIED  # not an ensemble's option
        plain = admin.create_mix("plain", [("a", 1.0)])
        # Unspecified is saved as linear; linear keeps everything, so no density.
        assert plain.method == inference_pb2.MIX_METHOD_LINEAR and not plain.HasField("density")
        assert [m.name for m in admin.list_mixes()] == ["blend", "plain"]
        assert admin.delete_mix("blend").id == mix.id
        assert [m.name for m in admin.list_mixes()] == ["plain"]
        code, _ = _code(lambda: admin.delete_mix("blend"))
        assert code == grpc.StatusCode.NOT_FOUND


def test_a_merge_method_without_density_is_saved_with_density_one(cp, adapters_root) -> None:
    _, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "a", BASE)
        assert admin.create_mix("d", [("a", 1.0)], method="dare_linear").density == pytest.approx(1.0)


def test_a_mix_naming_another_tenants_private_adapter_is_not_found(cp, adapters_root) -> None:
    _, owner_key = _tenant_with_key(cp)
    _, key = _tenant_with_key(cp)
    with cp.admin(owner_key) as admin:
        admin.upload_adapter(adapters_root / "a", "secret", BASE)
        admin.upload_adapter(adapters_root / "b", "shared", BASE, public=True)
    with cp.admin(key) as admin:
        code, details = _code(lambda: admin.create_mix("m", [("shared", 0.5), ("secret", 0.5)]))
        # The same answer as for a name that never existed.
        assert code == grpc.StatusCode.NOT_FOUND and "secret" in details
        assert admin.list_mixes() == []
        assert admin.create_mix("m", [("shared", 1.0)]).members[0].adapter == "shared"


def test_a_member_naming_the_tenants_own_saved_mix_is_refused_even_where_a_public_adapter_has_the_name(
    cp, adapters_root
) -> None:
    """Generate resolves a name to the caller's own saved mix before anyone's public adapter and refuses a
    saved mix as a member; CreateMix resolves members alike (it bound the name to the other owner's public
    adapter, so the saved mix served that owner's weights under a name meaning the tenant's own mix)."""
    _, owner_key = _tenant_with_key(cp)
    _, key = _tenant_with_key(cp)
    with cp.admin(owner_key) as admin:
        admin.upload_adapter(adapters_root / "b", "popular", BASE, public=True)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "own", BASE)
        admin.create_mix("popular", [("own", 1.0)])
        code, details = _code(lambda: admin.create_mix("outer", [("own", 0.5), ("popular", 0.5)]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "members[1].adapter" in details
        assert [m.name for m in admin.list_mixes()] == ["popular"]


def test_a_description_of_lines_and_tabs_is_kept(cp, adapters_root) -> None:
    _, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "a", BASE)
        saved = admin.create_mix("m", [("a", 1.0)], description="one\ttwo\nthree ünïcode")
    assert saved.description == "one\ttwo\nthree ünïcode"


@pytest.mark.parametrize(
    ("members", "kwargs", "field"),
    [
        ([("a", 1.0)], {"method": "ties", "density": 1.5}, "density"),
        ([("a", 1.0)], {"method": "ties", "density": 0.0}, "density"),
        ([("a", 1.0)], {"method": "dare_ties", "density": 1e-9}, "density"),
        ([(f"x{i}", 1.0) for i in range(9)], {}, "members"),
        ([], {}, "members"),
        ([("a", 1.0), ("a", 2.0)], {}, "members[1].adapter"),
        ([("a", float("nan"))], {}, "members[0].weight"),
        ([("a", float("inf"))], {}, "members[0].weight"),
        # What Generate refuses, CreateMix refuses: a saved mix no request could use.
        ([("a", 3e38), ("b", 1.0)], {}, "members[0].weight"),
        ([("a", 1.0), ("b", -1001.0)], {"method": "ties"}, "members[1].weight"),
        ([("a", 1.0), ("b", -0.5)], {"method": "ensemble"}, "members[1].weight"),
        ([("a", 0.0), ("b", 0.0)], {}, "members"),
        ([("", 1.0), ("a", 1.0)], {"method": "ties"}, "members[0].adapter"),
        ([("a", 1.0)], {"name": "bad name"}, "name"),
        ([("a", 1.0)], {"name": ".."}, "name"),
        ([("a", 1.0)], {"name": "-m"}, "name"),
        ([(".", 1.0)], {}, "members[0].adapter"),
        # An option for a method it does not apply to is refused, not silently ignored.
        ([("a", 1.0)], {"density": 0.5}, "density"),
        (
            [("a", 1.0)],
            {"method": "dare_linear", "majority_sign_method": "frequency"},
            "majority_sign_method",
        ),
        ([("a", 1.0)], {"method": "ties", "combine": "logprobs"}, "combine"),
        # Other tenants may read it: an escape sequence would drive their terminal.
        ([("a", 1.0)], {"description": "a\x1b[31mb\r\n"}, "description"),
    ],
)
def test_bad_mixes_are_invalid_argument_naming_the_field(cp, adapters_root, members, kwargs, field) -> None:
    _, key = _tenant_with_key(cp)
    name = kwargs.pop("name", "m")
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "a", BASE)
        admin.upload_adapter(adapters_root / "b", "b", BASE)
        code, details = _code(lambda: admin.create_mix(name, members, **kwargs))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}:")


@pytest.mark.parametrize("method", ["linear", "ties", "ensemble"])
def test_a_mix_of_one_content_under_two_names_is_refused(cp, adapters_root, method) -> None:
    """Two names for the same files: Generate refuses such a mix every time, so CreateMix does too."""
    _, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "a", BASE)
        admin.upload_adapter(adapters_root / "a", "a-again", BASE)
        code, details = _code(lambda: admin.create_mix("dup", [("a", 0.5), ("a-again", 0.5)], method=method))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("members[1].adapter:") and "same content" in details


def test_a_linear_mix_past_the_workers_rank_is_refused_and_a_merge_of_the_same_is_saved(
    cp, base_spec, tmp_path
) -> None:
    """A linear mix is served as one adapter of its members' ranks added up: one past the largest rank a
    worker serves was saved, and every call to it refused."""
    from .conftest import register_worker, write_peft_adapter

    _, key = _tenant_with_key(cp)
    register_worker(cp, base_spec, worker_id="narrow-worker", max_lora_rank=64)  # live: 64 is the limit
    with cp.admin(key) as admin:
        for i in range(3):
            write_peft_adapter(tmp_path / f"r24-{i}", seed=10 + i, rank=24, targets=["q_proj"])
            admin.upload_adapter(tmp_path / f"r24-{i}", f"r24-{i}", BASE)
        members = [(f"r24-{i}", 1.0) for i in range(3)]  # 72 > 64
        code, details = _code(lambda: admin.create_mix("wide", members))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("members:") and "72 here, above 64" in details
        assert admin.create_mix("narrow", members[:2]).name == "narrow"  # 48
        assert admin.create_mix("merged", members, method="ties", density=0.5).name == "merged"
        assert admin.create_mix("voted", members, method="ensemble").name == "voted"
        assert [m.name for m in admin.list_mixes()] == ["merged", "narrow", "voted"]


def test_an_unknown_method_is_invalid_argument(cp) -> None:
    _, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        request = admin_pb2.CreateMixRequest(
            name="m", members=[inference_pb2.AdapterWeight(adapter="a", weight=1)], method=99
        )
        code, details = _code(lambda: admin._call("CreateMix", request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("method:")


def test_adapters_and_mixes_of_a_tenant_share_one_namespace(cp, adapters_root) -> None:
    _, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "a", BASE)
        code, _ = _code(lambda: admin.create_mix("a", [("a", 1.0)]))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        admin.create_mix("m", [("a", 1.0)])
        code, _ = _code(lambda: admin.create_mix("m", [("a", 1.0)]))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        code, details = _code(lambda: admin.upload_adapter(adapters_root / "b", "m", BASE))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "mix" in details


def test_an_ensemble_may_have_the_base_model_as_a_member(cp, adapters_root) -> None:
    _, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "a", BASE)
        mix = admin.create_mix("ens", [("", 0.5), ("a", 0.5)], method="ensemble", combine="logprobs")
    assert [m.adapter for m in mix.members] == ["", "a"]
    assert mix.combine == inference_pb2.ENSEMBLE_COMBINE_LOGPROBS
    answer = _authorize(cp, key, ["ens"]).adapters[0]
    assert not answer.mix.members[0].HasField("adapter") and answer.mix.members[1].adapter.name == "a"
    assert answer.mix.method == inference_pb2.MIX_METHOD_ENSEMBLE


def test_authorize_answers_a_mix_name_with_its_members_and_parameters(cp, adapters_root) -> None:
    _, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        a = admin.upload_adapter(adapters_root / "a", "a", BASE).adapter
        b = admin.upload_adapter(adapters_root / "b", "b", BASE).adapter
        mix = admin.create_mix(
            "blend",
            [("a", 0.6), ("b", 0.4)],
            method="dare_ties",
            density=0.7,
            majority_sign_method="frequency",
        )
    answer = _authorize(cp, key, ["blend", "a"])
    resolved, plain = answer.adapters
    assert (resolved.name, resolved.adapter_id, resolved.sha256) == ("blend", mix.id, "")
    assert [(m.adapter.adapter_id, m.adapter.sha256, m.adapter.rank) for m in resolved.mix.members] == [
        (a.id, a.sha256, a.rank),
        (b.id, b.sha256, b.rank),
    ]
    assert [round(m.weight, 6) for m in resolved.mix.members] == [0.6, 0.4]
    assert resolved.mix.method == inference_pb2.MIX_METHOD_DARE_TIES
    assert resolved.mix.density == pytest.approx(0.7)
    assert resolved.mix.majority_sign_method == inference_pb2.MAJORITY_SIGN_METHOD_FREQUENCY
    assert not plain.HasField("mix") and plain.sha256 == a.sha256


def test_a_mix_is_another_tenants_unknown_name(cp, adapters_root) -> None:
    _, owner_key = _tenant_with_key(cp)
    _, other_key = _tenant_with_key(cp)
    with cp.admin(owner_key) as admin:
        admin.upload_adapter(adapters_root / "a", "a", BASE, public=True)
        admin.create_mix("mine", [("a", 1.0)])
    code, _ = _code(lambda: _authorize(cp, other_key, ["mine"]))
    assert code == grpc.StatusCode.NOT_FOUND


def test_a_mix_follows_its_members_replaced_deleted_or_hidden(cp, adapters_root, adapter_copy) -> None:
    _, owner_key = _tenant_with_key(cp)
    _, key = _tenant_with_key(cp)
    with cp.admin(owner_key) as admin:
        admin.upload_adapter(adapters_root / "a", "pub", BASE, public=True)
    with cp.admin(key) as admin:
        own = admin.upload_adapter(adapters_root / "b", "own", BASE).adapter
        admin.create_mix("m", [("own", 0.5), ("pub", 0.5)])
        assert _authorize(cp, key, ["m"]).adapters[0].mix.members[0].adapter.sha256 == own.sha256
        # Replaced: the mix serves the new content.
        new = admin.upload_adapter(_unique_copy(adapter_copy, "b"), "own", BASE).adapter
        assert new.sha256 != own.sha256
        assert _authorize(cp, key, ["m"]).adapters[0].mix.members[0].adapter.sha256 == new.sha256
    # The public member turns private: the mix is refused as that adapter would be.
    with cp.admin(owner_key) as admin:
        admin.upload_adapter(adapters_root / "a", "pub", BASE, public=False)
    code, details = _code(lambda: _authorize(cp, key, ["m"]))
    assert code == grpc.StatusCode.NOT_FOUND and "pub" in details
    with cp.admin(owner_key) as admin:
        admin.upload_adapter(adapters_root / "a", "pub", BASE, public=True)
    assert len(_authorize(cp, key, ["m"]).adapters[0].mix.members) == 2
    with cp.admin(key) as admin:
        admin.delete_adapter("own")
    code, details = _code(lambda: _authorize(cp, key, ["m"]))
    assert code == grpc.StatusCode.NOT_FOUND and "own" in details


def test_a_mix_saved_over_a_public_adapter_serves_the_tenants_own_adapter_of_that_name_once_it_has_one(
    cp, adapters_root, adapter_copy
) -> None:
    """Members are resolved by name as the tenant sees them at each call (its own adapter before another
    tenant's public one): the mix kept serving the other tenant's weights (and royalty) by the member
    row's adapter id, while the same name spelled out in a call served the tenant's own."""
    _, owner_key = _tenant_with_key(cp)
    _, key = _tenant_with_key(cp)
    with cp.admin(owner_key) as admin:
        public = admin.upload_adapter(adapters_root / "a", "shadowed", BASE, public=True).adapter
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "b", "mine", BASE)
        admin.create_mix("m", [("shadowed", 0.5), ("mine", 0.5)])
        assert _authorize(cp, key, ["m"]).adapters[0].mix.members[0].adapter.sha256 == public.sha256
        own = admin.upload_adapter(_unique_copy(adapter_copy, "b", 0.375), "shadowed", BASE).adapter
    assert own.sha256 != public.sha256
    spelled_out = _authorize(cp, key, ["shadowed"]).adapters[0].sha256
    assert spelled_out == own.sha256
    assert _authorize(cp, key, ["m"]).adapters[0].mix.members[0].adapter.sha256 == own.sha256
    # The public adapter's owner still gets its own.
    with cp.admin(owner_key) as admin:
        admin.create_mix("m", [("shadowed", 1.0)])
    assert _authorize(cp, owner_key, ["m"]).adapters[0].mix.members[0].adapter.sha256 == public.sha256


def test_a_member_nobody_may_use_is_not_found_naming_its_place(cp, adapters_root) -> None:
    _, owner_key = _tenant_with_key(cp)
    _, key = _tenant_with_key(cp)
    with cp.admin(owner_key) as admin:
        admin.upload_adapter(adapters_root / "a", "hidden", BASE)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "b", "mine", BASE)
        for missing in ("hidden", "never-existed"):
            code, details = _code(lambda m=missing: admin.create_mix("m", [("mine", 0.5), (m, 0.5)]))
            assert code == grpc.StatusCode.NOT_FOUND
            assert details == f"members[1].adapter: {missing!r} not found"


def _unique_copy(adapter_copy, name: str, nudge: float = 0.125) -> Path:
    """A copy of a fixture adapter with content no other test uploads (its alpha nudged; a test uploading
    one another test deletes passes its own `nudge`, so the content is not still served by it)."""
    path = adapter_copy(name)
    config = path / "adapter_config.json"
    data = json.loads(config.read_text())
    data["lora_alpha"] = data["lora_alpha"] + nudge
    config.write_text(json.dumps(data))
    return path


def test_deleting_or_replacing_a_member_names_the_content_merges_are_built_from(
    cp, redis_url, adapter_copy
) -> None:
    _, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        first = admin.upload_adapter(_unique_copy(adapter_copy, "a"), "x", BASE).adapter
        admin.create_mix("m", [("x", 1.0)], method="ties", density=0.5)
        admin.upload_adapter(_unique_copy(adapter_copy, "b"), "x", BASE)
        [replaced] = _hints(redis_url, adapter_id=first.id)
        assert (replaced.kind, replaced.source_sha256) == ("invalidate", first.sha256)
        second = admin.get_adapter("x")
        admin.delete_adapter("x")
        deleted = _hints(redis_url, adapter_id=first.id)[-1]
        assert (deleted.kind, deleted.source_sha256) == ("invalidate", second.sha256)
        mix = admin.list_mixes()[0]
        admin.delete_mix("m")
    # Workers forget their answers for the mix itself.
    assert [h.kind for h in _hints(redis_url, adapter_id=mix.id)] == ["invalidate"]


def test_mixes_commands(capsys, cp, adapters_root) -> None:
    _, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "a", BASE)
        admin.upload_adapter(adapters_root / "b", "b", BASE)
    flags = ["--admin-target", cp.target, "--api-key", key]
    argv = ["mixes", "create", "blend", "--mix", "a=0.6,b=0.4", "--method", "ties", "--density", "0.5"]
    assert main([*argv, *flags], environ={}) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "TENANT", "METHOD", "OPTIONS", "MEMBERS"]
    # TIES without --majority-sign-method is saved with PEFT's default, and shown so
    assert out.splitlines()[1].split()[2:] == ["ties", "density=0.5,majority-sign=total", "a=0.6,b=0.4"]
    more = {
        "signs": ["--method", "dare_ties", "--density", "0.25", "--majority-sign-method", "frequency"],
        "voters": ["--method", "ensemble", "--combine", "logprobs"],
        "plain": [],
    }
    for name, options in more.items():
        assert main(["mixes", "create", name, "--mix", "a=0.6,b=0.4", *options, *flags], environ={}) == 0
    capsys.readouterr()
    assert main(["mixes", "list", *flags], environ={}) == 0
    listed = {line.split()[0]: line.split()[2:4] for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed == {  # every option a mix was saved with is shown
        "blend": ["ties", "density=0.5,majority-sign=total"],
        "signs": ["dare_ties", "density=0.25,majority-sign=frequency"],
        "voters": ["ensemble", "combine=logprobs"],
        "plain": ["linear", "-"],
    }
    for name in more:
        assert main(["mixes", "rm", name, *flags], environ={}) == 0
    assert main(["mixes", "create", "m2", "--mix", "a=0.5,nope=0.5", *flags], environ={}) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["mixes", "rm", "blend", *flags], environ={}) == 0
    assert "deleted mix blend" in capsys.readouterr().out
    assert main(["mixes", "list", *flags], environ={}) == 0
    assert "blend" not in capsys.readouterr().out


def test_up_saves_its_demo_mixes_once_for_the_demo_tenant(cp, adapters_root) -> None:
    from openlora.commands.demo_setup import DEMO_MIXES, create_demo_mixes

    tenant, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        names = sorted({name for fields in DEMO_MIXES.values() for name, _ in fields["members"]})
        assert len(names) <= 2
        for name, files in zip(names, ("a", "b"), strict=False):  # distinct content, as a mix needs
            admin.upload_adapter(adapters_root / files, name, BASE)
        create_demo_mixes(cp.target, cp.admin_key, tenant)
        create_demo_mixes(cp.target, cp.admin_key, tenant)  # a restart keeps them
        saved = {m.name: m for m in admin.list_mixes()}
    assert set(saved) == set(DEMO_MIXES)
    for name, fields in DEMO_MIXES.items():
        assert [(m.adapter, m.weight) for m in saved[name].members] == list(fields["members"])
        assert saved[name].method == fields["method"]


def test_deleting_content_another_tenant_still_serves_names_no_content_for_merges(
    cp, redis_url, adapters_root
) -> None:
    """Merges are built from content; another tenant's adapter with the same bytes keeps those merges
    valid, so deleting one copy must not make workers drop (and rebuild) the other tenant's merges: the
    hint names the deleter's own cache key of the content alone, and no source content."""
    _, key_a = _tenant_with_key(cp)
    _, key_b = _tenant_with_key(cp)
    with cp.admin(key_a) as admin:
        kept = admin.upload_adapter(adapters_root / "a", "kept", BASE).adapter
    with cp.admin(key_b) as admin:
        copy = admin.upload_adapter(adapters_root / "a", "copy", BASE).adapter
        assert copy.sha256 == kept.sha256
        admin.delete_adapter("copy")
    [deleted] = _hints(redis_url, adapter_id=copy.id)
    assert (deleted.kind, deleted.sha256, deleted.source_sha256, deleted.key_only) == (
        "invalidate",
        copy.sha256,
        "",
        True,
    )
    assert (
        deleted.cache_scope and deleted.cache_scope != _authorize(cp, key_a, ["kept"]).adapters[0].cache_scope
    )


def test_concurrent_deletes_of_one_mix_delete_it_once(cp, adapters_root) -> None:
    """Unlocked, each delete found the mix, deleted it again (0 rows: only a warning) and answered OK with
    the mix, as if each had deleted it (and each published its invalidation)."""
    import threading

    _, key = _tenant_with_key(cp)
    with cp.admin(key) as admin:
        admin.upload_adapter(adapters_root / "a", "a", BASE)

    def delete(barrier: threading.Barrier, outcomes: list) -> None:
        with cp.admin(key) as admin:
            barrier.wait()
            try:
                outcomes.append(admin.delete_mix("gone").id)
            except grpc.RpcError as error:
                outcomes.append(error.code())

    for _ in range(3):
        with cp.admin(key) as admin:
            made = admin.create_mix("gone", [("a", 1.0)])
        barrier, outcomes = threading.Barrier(8), []
        threads = [threading.Thread(target=delete, args=(barrier, outcomes)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert outcomes.count(grpc.StatusCode.NOT_FOUND) == 7 and made.id in outcomes, outcomes
        with cp.admin(key) as admin:
            assert admin.list_mixes() == []
