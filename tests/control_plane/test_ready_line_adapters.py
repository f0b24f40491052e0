"""The adapters `up`'s ready line and context file offer are the demo tenant's own adapters of the base
model being served: a state dir that served another model keeps that model's adapters, and the line
offered `generate --adapter count` for a model that refuses it (FAILED_PRECONDITION)."""

from __future__ import annotations

from openlora.base_model import BaseModelSpec
from openlora.commands.demo_setup import own_adapter_names
from tests.control_plane.conftest import BASE_MODEL, register_worker, tiny_llama_dict


def test_only_the_served_base_models_adapters_are_offered(cp, adapters_root) -> None:
    register_worker(cp, BaseModelSpec.from_hf_config(tiny_llama_dict(), "other-llama"), worker_id="other")
    with cp.admin() as admin:
        admin.create_tenant("ready")
        key = admin.create_api_key("ready", admin=True).secret
    with cp.admin(key) as tenant:
        tenant.upload_adapter(adapters_root / "a", name="served", base_model=BASE_MODEL)
        tenant.upload_adapter(adapters_root / "b", name="elsewhere", base_model="other-llama")
    assert own_adapter_names(cp.target, key, "ready", BASE_MODEL) == ["served"]
    assert own_adapter_names(cp.target, key, "ready", "other-llama") == ["elsewhere"]


def test_workers_of_a_new_base_model_registering_at_once_all_register(cp) -> None:
    """A fleet started together registers one new base model from many workers at once: each found no
    row and inserted one, and all but the first got INTERNAL from the unique key (the same for one worker
    id registering twice at once)."""
    import threading
    import uuid

    import grpc

    for worker_id in ("", "same-worker"):
        spec = BaseModelSpec.from_hf_config(tiny_llama_dict(), f"fleet-{uuid.uuid4().hex[:8]}")
        barrier, codes, lock = threading.Barrier(8), [], threading.Lock()

        def register(spec=spec, worker_id=worker_id, barrier=barrier, codes=codes, lock=lock) -> None:
            barrier.wait()
            try:
                register_worker(cp, spec, worker_id=worker_id)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=register) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes == [grpc.StatusCode.OK] * 8, (worker_id, codes)
