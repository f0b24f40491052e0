"""Admission is fair across tenants: one tenant's flood of requests waits behind its own running work,
not ahead of another tenant's request (a victim's time to first token went from 0.07 s to 11.8 s behind a
flood that stayed within its stream cap). A flood that already holds every running sequence, or every
adapter slot, gives up its newest work (preempted by recompute, its output unchanged) to a tenant below
its fair share (a victim waited 85 s, and 189 s on its own adapter, behind 160 long streams of one
tenant). With one tenant, admission stays in arrival order."""

from __future__ import annotations

from .conftest import greedy, make_engine


def _first_token_order(engine, requests) -> list[str]:
    for request in requests:
        engine.add_request(request)
    order: list[str] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_ids and out.request_id not in order:
                order.append(out.request_id)
    return order


def _request(request_id: str, tenant: str, max_tokens: int = 6, adapters=()):
    request = greedy(request_id, [1, 2, 3, 4], adapters=adapters, max_tokens=max_tokens)
    request.tenant = tenant
    return request


def _step(engine, outputs: dict) -> None:
    """One step, then every adapter load in flight lands (so counts of steps do not depend on how fast
    this machine reads files)."""
    for out in engine.step():
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    engine.loader.wait_for(set(engine.adapter_cache.known_keys()), 10.0)


def _steps_until_first_token(engine, request_id: str, outputs: dict, max_steps: int = 200) -> int:
    for steps in range(1, max_steps + 1):
        _step(engine, outputs)
        if outputs.get(request_id):
            return steps
    raise AssertionError(f"{request_id} got no token in {max_steps} steps")


def _finish(engine, outputs: dict) -> dict:
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    return outputs


def _alone(tiny_llama, requests, **settings) -> dict:
    engine = make_engine(tiny_llama, **settings)
    for request in requests:
        engine.add_request(request)
    return _finish(engine, {})


def test_another_tenants_request_is_admitted_before_a_floods_backlog(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=4)
    flood = [_request(f"flood-{i}", "attacker") for i in range(12)]
    order = _first_token_order(engine, [*flood, _request("victim", "victim")])
    # The first step admits four: the flood's earliest, then the victim (its tenant runs nothing yet).
    assert "victim" in order[:4]
    assert order.index("victim") < order.index("flood-4")


def test_one_tenants_requests_are_admitted_in_arrival_order(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=3)
    requests = [_request(f"r{i}", "only") for i in range(9)]
    assert _first_token_order(engine, requests) == [f"r{i}" for i in range(9)]


def test_tenants_share_the_running_slots_in_turn(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=4)
    a = [_request(f"a{i}", "a") for i in range(6)]
    b = [_request(f"b{i}", "b") for i in range(6)]
    order = _first_token_order(engine, [*a, *b])
    assert sorted(order[:4]) == ["a0", "a1", "b0", "b1"]  # two each, not a's four first


def test_a_flood_holding_every_running_slot_makes_room_for_a_tenant_below_its_share(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=4)
    flood = [_request(f"flood-{i}", "attacker", max_tokens=40) for i in range(4)]
    for request in flood:
        engine.add_request(request)
    outputs: dict = {}
    for _ in range(3):
        _step(engine, outputs)
    engine.add_request(_request("victim", "victim"))
    # Without a share it waited for a flood request to end (37 more steps).
    assert _steps_until_first_token(engine, "victim", outputs) <= 2
    _finish(engine, outputs)
    alone = _alone(tiny_llama, [_request(f"flood-{i}", "attacker", max_tokens=40) for i in range(4)])
    assert {k: v for k, v in outputs.items() if k.startswith("flood")} == alone  # preempted: same tokens
    assert len(outputs["victim"]) == 6


def test_a_flood_holding_every_adapter_slot_gives_one_up_to_a_tenant_below_its_share(tiny_llama):
    settings = dict(max_num_seqs=6, num_adapter_slots=2)
    engine = make_engine(tiny_llama, **settings)

    def flood():
        return [
            _request(f"flood-{name}-{i}", "attacker", max_tokens=40, adapters=[tiny_llama.ref(name)])
            for name in ("r8_all", "r64_all")
            for i in range(3)
        ]

    for request in flood():
        engine.add_request(request)
    outputs: dict = {}
    for _ in range(3):
        _step(engine, outputs)
    assert engine.scheduler.num_running == 6
    engine.add_request(_request("victim", "victim", adapters=[tiny_llama.ref("r16_rslora")]))
    # Without it the victim's adapter waited for every request on one of the flood's adapters to end.
    assert _steps_until_first_token(engine, "victim", outputs) <= 4
    _finish(engine, outputs)
    assert {k: v for k, v in outputs.items() if k.startswith("flood")} == _alone(
        tiny_llama, flood(), **settings
    )
    alone = _alone(tiny_llama, [_request("victim", "victim", adapters=[tiny_llama.ref("r16_rslora")])])
    assert outputs["victim"] == alone["victim"]


def test_tenants_within_their_share_are_never_preempted(tiny_llama):
    """Two tenants at their share (2 of 4 running each) with more waiting from both: nobody is preempted,
    and each tenant still gets its turn (a preemption would only trade one tenant's work for the same)."""
    engine = make_engine(tiny_llama, max_num_seqs=4)
    preempted = _preemptions(engine)
    for i in range(4):
        engine.add_request(_request(f"a{i}", "a", max_tokens=12))
        engine.add_request(_request(f"b{i}", "b", max_tokens=12))
    outputs = _finish(engine, {})
    assert preempted == []
    assert sorted(outputs) == sorted([f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)])


def _preemptions(engine) -> list[str]:
    """Records the request id of every sequence the scheduler preempts."""
    preempted: list[str] = []
    preempt = engine.scheduler._preempt

    def counting(seq):
        preempted.append(seq.request_id)
        preempt(seq)

    engine.scheduler._preempt = counting
    return preempted


def test_kv_pressure_preempts_the_tenant_holding_the_most_kv_not_the_newest_arrival(tiny_llama):
    """Three long generations of one tenant outgrow the KV cache (10 blocks of 16 tokens; each needs 4 at
    its end) while another tenant's short request, admitted last, runs beside them: the flood's own newest
    work is preempted each time, never the neighbour's (before: the most recently admitted unit, the
    neighbour's, was preempted at every squeeze). Outputs equal each request run alone."""
    settings = dict(num_kv_blocks=10, max_num_seqs=8)

    def requests():
        flood = [_request(f"flood{i}", "flood", max_tokens=56) for i in range(3)]
        return [*flood, _request("victim", "victim", max_tokens=40)]

    engine = make_engine(tiny_llama, **settings)
    preempted = _preemptions(engine)
    outputs = {}
    *flood, victim = requests()
    for request in flood:
        engine.add_request(request)
    _step(engine, outputs)  # the flood runs; the victim arrives after it
    engine.add_request(victim)
    _finish(engine, outputs)
    assert preempted and all(request_id.startswith("flood") for request_id in preempted)
    alone = {}
    for request in requests():
        alone.update(_alone(tiny_llama, [request], **settings))
    assert outputs == alone


def test_kv_pressure_with_one_tenant_preempts_the_newest_admitted(tiny_llama):
    """One tenant: the first squeeze preempts the most recently admitted unit (its equal KV holders)."""
    engine = make_engine(tiny_llama, num_kv_blocks=10, max_num_seqs=8)
    preempted = _preemptions(engine)
    for i in range(4):
        engine.add_request(_request(f"r{i}", "only", max_tokens=56 if i < 3 else 40))
    _finish(engine, {})
    assert preempted[0] == "r3"


def test_another_tenants_long_prompts_do_not_hold_back_a_short_requests_first_token(tiny_llama):
    """Prefill chunks of long prompts spend each step's token budget; a tenant running more than another
    whose request waits leaves that request's first chunk room in the step (up to half the budget), so
    its first token comes next step instead of after every long prompt in flight (a victim waited 1.7-6
    s behind a flood of 1,000-token prompts that stayed within its share)."""
    budget = 32
    engine = make_engine(tiny_llama, max_num_seqs=16, max_num_batched_tokens=budget, num_kv_blocks=128)
    outputs: dict = {}
    long_prompt = [(7 * i) % 97 + 1 for i in range(150)]
    for i in range(3):
        request = greedy(f"long-{i}", long_prompt, max_tokens=4)
        request.tenant = "flood"
        engine.add_request(request)
    _step(engine, outputs)  # the flood's prefills take the budget
    victim = _request("victim", "victim", max_tokens=2)
    engine.add_request(victim)
    assert _steps_until_first_token(engine, "victim", outputs) == 1
    # and the flood's prompts still make progress: each step gives them what the victim leaves
    _finish(engine, outputs)
    alone = _alone(tiny_llama, [greedy("long-0", long_prompt, max_tokens=4)], max_num_batched_tokens=budget)
    assert outputs["long-0"] == alone["long-0"]  # chunked differently, same tokens


def test_with_one_tenant_prefill_chunks_keep_arrival_order(tiny_llama):
    """The room above is left for another tenant only: one tenant's later request waits for its earlier
    prompts' prefill, as before."""
    engine = make_engine(tiny_llama, max_num_seqs=16, max_num_batched_tokens=32, num_kv_blocks=128)
    outputs: dict = {}
    long_prompt = [(5 * i) % 89 + 1 for i in range(150)]
    for i in range(3):
        engine.add_request(greedy(f"long-{i}", long_prompt, max_tokens=4))
    _step(engine, outputs)
    engine.add_request(greedy("short", [1, 2, 3, 4], max_tokens=2))
    assert _steps_until_first_token(engine, "short", outputs) > 1


def _ensemble(request_id: str, tenant: str, tiny_llama, max_tokens: int = 40):
    from data_plane.engine.request import Ensemble, EnsembleMember

    request = _request(request_id, tenant, max_tokens=max_tokens)
    request.ensemble = Ensemble(
        (EnsembleMember(tiny_llama.ref("r8_all"), 1.0), EnsembleMember(tiny_llama.ref("r64_all"), 1.0))
    )
    return request


def test_a_flood_of_ensembles_holding_every_slot_gives_one_up_whole(tiny_llama):
    """Ensembles above their tenant's share hold both slots: one is preempted whole (all its members) so
    that the victim's adapter gets a slot; before, a slot held by an ensemble was never freed and the
    victim waited 78 steps, until a whole ensemble ended."""
    settings = dict(max_num_seqs=6, num_adapter_slots=2)
    engine = make_engine(tiny_llama, **settings)

    def flood():
        return [_ensemble(f"flood-{i}", "attacker", tiny_llama) for i in range(3)]

    for request in flood():
        engine.add_request(request)
    outputs: dict = {}
    for _ in range(3):
        _step(engine, outputs)
    assert engine.scheduler.num_running == 3
    engine.add_request(_request("victim", "victim", adapters=[tiny_llama.ref("r16_rslora")]))
    assert _steps_until_first_token(engine, "victim", outputs) <= 4
    _finish(engine, outputs)
    assert {k: v for k, v in outputs.items() if k.startswith("flood")} == _alone(
        tiny_llama, flood(), **settings
    )


def test_a_tenant_within_its_running_share_holding_every_slot_gives_one_up(tiny_llama):
    """Slot share: two tenants, 2 slots, 4 running sequences. The attacker runs its share (2) on 2
    distinct adapters, every slot: the victim's adapter gets one of them within a few steps (it waited 40
    steps, a whole attacker stream), and every output is what it is alone."""
    settings = dict(max_num_seqs=4, num_adapter_slots=2)
    engine = make_engine(tiny_llama, **settings)

    def flood():
        return [
            _request(f"flood-{i}", "attacker", max_tokens=40, adapters=[tiny_llama.ref(name)])
            for i, name in enumerate(("r8_all", "r64_all"))
        ]

    for request in flood():
        engine.add_request(request)
    outputs: dict = {}
    for _ in range(3):
        _step(engine, outputs)
    engine.add_request(_request("victim", "victim", adapters=[tiny_llama.ref("r16_rslora")]))
    assert _steps_until_first_token(engine, "victim", outputs) <= 4
    _finish(engine, outputs)
    assert {k: v for k, v in outputs.items() if k.startswith("flood")} == _alone(
        tiny_llama, flood(), **settings
    )
    alone = _alone(tiny_llama, [_request("victim", "victim", adapters=[tiny_llama.ref("r16_rslora")])])
    assert outputs["victim"] == alone["victim"]


def test_a_tenant_within_its_slot_share_keeps_its_slots(tiny_llama):
    """Each tenant holds one of the two slots: a third adapter of either waits for its own tenant's slot
    to come free; nobody is preempted for it."""
    engine = make_engine(tiny_llama, max_num_seqs=4, num_adapter_slots=2)
    engine.add_request(_request("a-1", "a", max_tokens=20, adapters=[tiny_llama.ref("r8_all")]))
    engine.add_request(_request("b-1", "b", max_tokens=20, adapters=[tiny_llama.ref("r64_all")]))
    outputs: dict = {}
    for _ in range(3):
        _step(engine, outputs)
    preempted = _preemptions(engine)
    engine.add_request(_request("b-2", "b", adapters=[tiny_llama.ref("r16_rslora")]))
    _finish(engine, outputs)
    assert preempted == []
    assert outputs["b-2"]


def _preempted_and_run(engine) -> list[str]:
    """Records, at each step, the request id of every sequence that the step both preempts and runs."""
    both: list[str] = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        scheduled = {id(seq) for seq in batch.seqs}
        both.extend(seq.request_id for seq in batch.preempted if id(seq) in scheduled)
        return batch

    engine.scheduler.schedule = recording
    return both


def test_no_sequence_is_preempted_and_run_again_in_the_same_step(tiny_llama):
    """A flood runs every sequence (8) on every adapter slot (4), then twelve tenants arrive, each on an
    adapter of its own. Regression: the room made for waiting requests was not all kept for them (one
    whose adapter could have a slot but was not promised one yet, a group preempted for one request):
    the flood's sequence just preempted for it was taken in again at once, its whole context computed
    again for nothing (14 times in this run)."""
    from data_plane.engine.request import AdapterRef

    engine = make_engine(tiny_llama, max_num_seqs=8, num_adapter_slots=4)
    both = _preempted_and_run(engine)
    names = ("r4_qv", "r8_all", "r16_rslora", "r64_all")
    for i in range(8):
        engine.add_request(
            _request(f"flood-{i}", "flood", max_tokens=40, adapters=[tiny_llama.ref(names[i % 4])])
        )
    outputs: dict = {}
    for _ in range(3):
        _step(engine, outputs)
    path = tiny_llama.adapter_dirs["r4_qv"]
    for i in range(12):  # the same weights under twelve keys: twelve adapters to the slots
        adapter = AdapterRef(f"late-adapter-{i}", path)
        engine.add_request(_request(f"late-{i}", f"tenant-{i}", adapters=[adapter]))
    while engine.has_unfinished():
        _step(engine, outputs)
    assert both == []
    assert {request_id: len(tokens) for request_id, tokens in outputs.items()} == {
        **{f"flood-{i}": 40 for i in range(8)},
        **{f"late-{i}": 6 for i in range(12)},
    }
