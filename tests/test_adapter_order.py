"""One injection order (`finesam.adapters.order`): HQ-SAM first, then the LoRAs; the command line (`load_model`,
`export`) and the server's adapter switching both follow it, and ejecting restores the base exactly."""

import argparse

import pytest
import torch

from finesam.adapters import HQSAMAdapter, SAMLoraAdapter
from finesam.adapters.order import inject_in_order, injection_order
from finesam.cli.common import load_model
from finesam.serve.host import ModelHost
from finesam.weights import save_hq, save_lora, save_sam
from finesam.weights.loading import sam_from_state_dict


@pytest.fixture
def adapted(official_small):
    model = sam_from_state_dict(official_small.state_dict())
    return model, HQSAMAdapter(model), SAMLoraAdapter(model, name="a", rank=2)  # "a" sorts before "hq"


def recorded(monkeypatch, adapters: dict[str, object]) -> list[str]:
    calls: list[str] = []
    for name, adapter in adapters.items():
        for verb in ("inject", "eject"):
            method = getattr(adapter, verb)
            monkeypatch.setattr(
                adapter, verb, lambda *a, _m=method, _c=f"{verb} {name}", **k: calls.append(_c) or _m(*a, **k)
            )
    return calls


def test_injection_order_is_hq_then_loras_as_given():
    assert injection_order("hq", ["b", "a"]) == ["hq", "b", "a"]
    assert injection_order(None, ["b"]) == ["b"]


def test_inject_in_order(adapted, monkeypatch):
    _, hq, lora = adapted
    calls = recorded(monkeypatch, {"hq": hq, "a": lora})
    assert inject_in_order(hq, [lora]) == [hq, lora]
    assert calls == ["inject hq", "inject a"]


def test_the_server_switches_adapters_in_the_one_order(adapted, monkeypatch):
    model, hq, lora = adapted
    base = {k: v.clone() for k, v in model.state_dict().items()}
    host = ModelHost(model, hq=hq, loras=[lora])
    calls = recorded(monkeypatch, {"hq": hq, "a": lora})
    host._switch(True, ["a"])
    assert host._injected == ["hq", "a"] and calls == ["inject hq", "inject a"]
    host._switch(False, ["a"])  # HQ-SAM out: the LoRA after it comes out and goes back in
    assert host._injected == ["a"] and calls[2:] == ["eject a", "eject hq", "inject a"]
    host._switch(True, [])
    assert host._injected == ["hq"] and calls[5:] == ["eject a", "inject hq"]
    host._switch(False, [])
    state = model.state_dict()
    assert list(state) == list(base) and all(torch.equal(state[k], base[k]) for k in state)


def test_the_command_line_injects_hq_then_its_loras(official_small, tmp_path, monkeypatch):
    model = sam_from_state_dict(official_small.state_dict())
    weights = save_sam(model, tmp_path / "base.safetensors")
    hq = save_hq(HQSAMAdapter(model), tmp_path / "base.hq.safetensors")
    lora = save_lora(SAMLoraAdapter(model, name="a", rank=2), tmp_path / "a.lora.safetensors")
    injected: list[str] = []
    for cls in (HQSAMAdapter, SAMLoraAdapter):
        inject = cls.inject
        monkeypatch.setattr(
            cls, "inject", lambda self, *a, _i=inject, **k: injected.append(type(self).__name__) or _i(self, *a, **k)
        )
    args = argparse.Namespace(
        weights=weights, hq=hq, hq_only=False, device="cpu", dtype="float32", lora=[lora], compile=False
    )
    load_model(args)
    assert injected == ["HQSAMAdapter", "SAMLoraAdapter"]
