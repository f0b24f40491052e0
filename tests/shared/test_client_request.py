"""The Python client's request builder: a value the wire format cannot carry is refused before anything is
sent, naming the field (protobuf alone says only "Value out of range: -1")."""

import pytest

from openlora.client import build_request


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seed": -1}, "sampling.seed"),
        ({"seed": 1 << 64}, "sampling.seed"),
        ({"max_tokens": 1 << 31}, "sampling.max_tokens"),
        ({"top_k": -(1 << 31) - 1}, "sampling.top_k"),
        ({"temperature": "hot"}, "sampling.temperature"),
        ({"prompt_token_ids": [1, 2, 1 << 40]}, "prompt_token_ids[2]"),
        ({"stop": ["ok", 7]}, "sampling.stop[1]"),
        ({"mix": {"a": 0.5, "b": "half"}}, "mix[1].weight"),
        ({"density": "x", "mix": {"a": 1.0}, "mix_method": "ties"}, "density"),
    ],
)
def test_value_the_field_cannot_carry_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=r"^" + field.replace("[", r"\[").replace("]", r"\]") + ":"):
        build_request("hi", **kwargs)


def test_values_in_range_are_carried():
    request = build_request(
        "hi",
        seed=(1 << 64) - 1,
        max_tokens=7,
        top_k=3,
        temperature=0.5,
        stop=["x"],
        mix={"a": 0.25, "b": 0.75},
    )
    assert request.sampling.seed == (1 << 64) - 1
    assert request.sampling.max_tokens == 7
    assert request.sampling.top_k == 3
    assert request.sampling.HasField("temperature") and not request.sampling.HasField("top_p")
    assert list(request.sampling.stop) == ["x"]
    assert [(m.adapter, m.weight) for m in request.mix] == [("a", 0.25), ("b", 0.75)]


def test_admin_request_value_the_field_cannot_carry_names_the_field():
    from openlora.admin_client import AdminClient
    from openlora.v1 import admin_pb2

    client = AdminClient("127.0.0.1:1", "k")  # nothing is sent: the request is refused while built
    try:
        with pytest.raises(ValueError, match=r"^prompt_micros_per_million_tokens: "):
            client.set_price("m", 1 << 70, 1)
        with pytest.raises(ValueError, match=r"^members\[1\]\.weight: "):
            client.create_mix("x", [("a", 1.0), ("b", "heavy")])
    finally:
        client.close()
    from openlora.wire import message

    assert (
        message(
            admin_pb2.SetPriceRequest, base_model="m", prompt_micros_per_million_tokens=5
        ).prompt_micros_per_million_tokens
        == 5
    )
