"""The gauges the Gateway API Inference Extension scrapes (vLLM's names), on the API's /metrics."""

from __future__ import annotations

import random
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from data_plane.server.metrics import AdapterActivity
from tests.openai.conftest import EnginePause, start_http_worker

NUM_ADAPTER_SLOTS = 6


def _scrape(base_url: str) -> dict[str, list]:
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _lora_labels(base_url: str) -> tuple[str, str]:
    (info,) = _scrape(base_url)["vllm:lora_requests_info"]
    return info.labels["running_lora_adapters"], info.labels["waiting_lora_adapters"]


def _wait(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


class _Stream:
    """A streamed completion read to its end in a thread; `started` once its first event came."""

    def __init__(self, client: httpx.Client, model: str) -> None:
        self.started = threading.Event()
        body = {"model": model, "prompt": "hello world", "max_tokens": 40, "stream": True}
        self._thread = threading.Thread(target=self._read, args=(client, body), daemon=True)
        self._thread.start()

    def _read(self, client: httpx.Client, body: dict) -> None:
        with client.stream("POST", "/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.started.set()

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive()


def test_lora_info_names_the_adapters_the_engine_runs_and_queues(system, tmp_path, tenant):
    from data_plane.server.config import EngineSettings

    http = start_http_worker(
        system,
        tmp_path,
        http_metrics=True,
        engine=EngineSettings(
            num_kv_blocks=128, max_num_seqs=2, max_lora_rank=16, num_adapter_slots=NUM_ADAPTER_SLOTS
        ),
    )
    pause = EnginePause(http.worker)
    headers = {"Authorization": f"Bearer {tenant[2]}"}
    client = httpx.Client(base_url=http.base_url, headers=headers, timeout=60)
    scheduler = http.worker.engine.engine.scheduler
    try:
        pause.pause()
        first, second = _Stream(client, "ad0"), _Stream(client, "ad1")
        _wait(lambda: scheduler.num_waiting == 2)
        while not (first.started.is_set() and second.started.is_set()):
            pause.step()  # admits both (the engine runs two sequences at most) and makes their first tokens
            time.sleep(0.05)
        third = _Stream(client, "ad2")
        _wait(lambda: scheduler.num_waiting == 1)
        names = {sha: name for name, sha in system.adapters.items()}
        running = sorted(names[s.adapter_key] for s in scheduler.running)
        waiting = sorted(names[s.adapter_key] for s in scheduler.waiting)
        assert (running, waiting) == (["ad0", "ad1"], ["ad2"])  # what the engine holds now

        metrics = _scrape(http.base_url)
        (info,) = metrics["vllm:lora_requests_info"]
        assert info.labels == {
            "max_lora": str(NUM_ADAPTER_SLOTS),
            "running_lora_adapters": ",".join(running),
            "waiting_lora_adapters": ",".join(waiting),
        }
        assert abs(info.value - time.time()) < 60  # a timestamp: when the lists last changed
        assert metrics["vllm:num_requests_running"][0].value == 2
        assert metrics["vllm:num_requests_waiting"][0].value == 1
        for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
            assert 0 < metrics[name][0].value <= 1
        pause.resume()
        for stream in (first, second, third):
            stream.join()
        _wait(lambda: _lora_labels(http.base_url) == ("", ""))
    finally:
        pause.restore()
        client.close()
        system.loop.run(http.worker.stop(1.0))


def test_adapter_activity_moves_names_from_waiting_to_running_and_out():
    activity = AdapterActivity()
    a = activity.add(["ad0"])
    b = activity.add(["ad1", "ad0"])
    assert (activity.names.running, activity.names.waiting) == ((), ("ad0", "ad1"))
    activity.mark_running(a)
    assert (activity.names.running, activity.names.waiting) == (("ad0",), ("ad0", "ad1"))
    activity.remove(b)
    activity.add([])  # the base model names no adapter
    assert (activity.names.running, activity.names.waiting) == (("ad0",), ())
    activity.remove(a)
    assert (activity.names.running, activity.names.waiting) == ((), ())


def test_adapter_activity_agrees_with_the_union_of_the_requests_in_flight_over_random_changes():
    """The counted sets against their definition (the union of the names of the requests waiting, and of those
    running), after every change of a random sequence of adds (duplicates and empty lists among them), moves
    to running (twice, or of an unknown handle) and removals (twice, or unknown)."""
    rng = random.Random(7)
    activity = AdapterActivity()
    in_flight: dict[int, tuple[list[str], bool]] = {}
    for _ in range(2_000):
        action = rng.random()
        if action < 0.45 or not in_flight:
            names = [f"ad{rng.randrange(12)}" for _ in range(rng.randrange(4))]
            in_flight[activity.add(names)] = (names, False)
        elif action < 0.75:
            handle = rng.choice([*in_flight, 10**6])
            activity.mark_running(handle)
            if handle in in_flight:
                in_flight[handle] = (in_flight[handle][0], True)
        else:
            handle = rng.choice([*in_flight, 10**6])
            activity.remove(handle)
            in_flight.pop(handle, None)
        running = sorted({n for names, r in in_flight.values() if r for n in names})
        waiting = sorted({n for names, r in in_flight.values() if not r for n in names})
        assert (list(activity.names.running), list(activity.names.waiting)) == (running, waiting)
