"""Replayed UNets (fastgen.graphs): what a graph is keyed by, which modules are never graphed, how the engine turns
them on; CPU traces give the eager run's pixels on the shipped mini family, and on a CUDA machine only, so do CUDA
graphs."""

import pytest
import torch

from fastgen import graphs
from fastgen.__main__ import main
from fastgen.adapters import clean_twin
from fastgen.engine import Engine
from fastgen.registry import get_family

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_a_graph_is_keyed_by_shapes_dtypes_and_every_other_argument():
    x = torch.zeros(2, 4, 8, 8)
    key = graphs.signature(((x, torch.tensor(5)), {"added": {"time_ids": torch.zeros(2, 6)}, "return_dict": False}))
    same = graphs.signature(((torch.ones(2, 4, 8, 8), torch.tensor(981)),
                             {"added": {"time_ids": torch.ones(2, 6)}, "return_dict": False}))
    assert key == same  # values of tensors are copied in, not captured
    for other in [((torch.zeros(1, 4, 8, 8), torch.tensor(5)), {"added": {"time_ids": torch.zeros(2, 6)},
                                                                 "return_dict": False}),
                  ((x.half(), torch.tensor(5)), {"added": {"time_ids": torch.zeros(2, 6)}, "return_dict": False}),
                  ((x, torch.tensor(5)), {"added": {"time_ids": torch.zeros(2, 6)}, "return_dict": True}),
                  ((x, torch.tensor(5)), {"added": {"text_embeds": torch.zeros(2, 6)}, "return_dict": False})]:
        assert graphs.signature(other) != key


def test_outputs_keep_their_types_when_cloned():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    hidden = torch.ones(1, 3, 4)
    out = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=torch.ones(1, 4),
                                     hidden_states=(hidden, hidden * 2))
    copy = graphs._map(torch.clone, out)
    assert isinstance(copy, BaseModelOutputWithPooling) and copy[0] is not hidden
    assert torch.equal(copy.hidden_states[-1], hidden * 2) and len(graphs.tensors(copy)) == 4


def unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)


def test_modules_with_adapters_are_not_graphed_and_a_twin_leaves_the_graph_behind():
    from peft import LoraConfig

    class Pipe:
        def __init__(self, unet):
            self.unet, self.text_encoder = unet, None

    plain, adapted = unet(), unet()
    adapted.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]), adapter_name="lcm")
    assert not graphs.has_adapters(plain) and graphs.has_adapters(adapted)
    assert graphs.attach(Pipe(adapted)) == [] and "forward" not in adapted.__dict__

    graphed = graphs.attach(Pipe(plain))
    assert len(graphed) == 1 and plain.__dict__["forward"] is graphed[0]
    assert graphs.attach(Pipe(plain)) == graphed  # shared modules are graphed once
    twin = clean_twin(plain)  # what the cache makes before the first adapter lands on a graphed UNet
    assert "forward" not in twin.__dict__ and plain.__dict__["forward"] is graphed[0]
    graphed[0].remove()
    assert "forward" not in plain.__dict__
    plain._fastgen_eager = True  # what a failed capture leaves: never graphed again
    assert graphs.attach(Pipe(plain)) == [] and "forward" not in plain.__dict__


def test_a_trace_replays_any_tensor_values_and_rebuilds_the_output_but_leaves_plain_numbers_eager():
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    class Pipe:
        def __init__(self, unet):
            self.unet, self.text_encoder = unet, torch.nn.Linear(2, 2)

    torch.manual_seed(0)
    module = unet().eval()
    traced, = graphs.attach(Pipe(module), traced=True)  # the UNet only: text encoders stay eager on a CPU
    assert isinstance(traced, graphs.Traced) and module.__dict__["forward"] is traced
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        module(x, torch.tensor(10), encoder_hidden_states=context, return_dict=False)  # captured at t = 10
        assert len(traced.graphs) == 1
        for t in (torch.tensor(990), torch.tensor(1)):  # other timesteps and latents replay the same trace
            y = x * t / 500
            got, = module(y, t, encoder_hidden_states=context, return_dict=False)
            assert torch.equal(got, traced.eager(y, t, encoder_hidden_states=context, return_dict=False)[0])
        output = module(x, torch.tensor(5), encoder_hidden_states=context)  # return_dict: a second signature
        assert isinstance(output, UNet2DConditionOutput) and len(traced.graphs) == 2
        assert torch.equal(output.sample, traced.eager(x, torch.tensor(5), encoder_hidden_states=context).sample)
        module(x, 10.0, encoder_hidden_states=context, return_dict=False)  # a number would be baked in: eager
        assert len(traced.graphs) == 2
    module(x, torch.tensor(10), encoder_hidden_states=context, return_dict=False)[0].sum().backward()  # training
    assert module.conv_in.weight.grad is not None


@pytest.mark.slow
def test_traced_runs_give_the_eager_pixels_on_the_mini_family():
    import numpy as np

    eager, traced = Engine(device="cpu"), Engine(device="cpu", traced=True)
    prompt = "a small green square on a yellow background"
    for method, steps, guidance in [("turbo", 2, None), ("lcm", 4, None), ("lcm-lora", 4, None),
                                    ("baseline", 8, None), ("baseline", 4, 1.0)]:  # guidance 1: no CFG batch
        for seed in (3, 4):  # the first run captures (after a 1-step warm-up), the second replays
            a = eager.run("mini", method, prompt, seed=seed, steps=steps, guidance=guidance).image
            b = traced.run("mini", method, prompt, seed=seed, steps=steps, guidance=guidance).image
            assert np.array_equal(np.asarray(a), np.asarray(b)), (method, steps, guidance, seed)
    family = get_family("mini")
    for method, replayed in [("baseline", True), ("lcm", True), ("turbo", True), ("lcm-lora", False)]:
        pipe, keys, loras, scales = traced._pipeline(family, family.method(method))
        with traced.cache.hold(keys), traced.adapters.active(loras, scales):
            forward = pipe.unet.__dict__.get("forward")
            assert isinstance(forward, graphs.Traced) == replayed, method  # an adapted UNet runs eagerly
    assert "forward" not in pipe.text_encoder.__dict__  # text encoders stay eager on a CPU
    baseline, *_ = traced._pipeline(family, family.method("baseline"))
    assert len(baseline.unet.forward.graphs) == 2  # with and without the CFG batch


def test_the_engine_turns_graphs_on_only_on_cuda(monkeypatch, capsys):
    with pytest.raises(ValueError, match="`cuda_graphs` needs a CUDA device"):
        Engine(device="cpu", cuda_graphs=True)
    monkeypatch.setenv("FASTGEN_CUDA_GRAPHS", "1")  # a host's switch: a CPU fallback ignores it
    assert Engine(device="cpu").cuda_graphs is False
    assert main(["bench", "--family", "mini", "--methods", "turbo", "--device", "cpu", "--cuda-graphs"]) == 2
    assert "`cuda_graphs` needs a CUDA device" in capsys.readouterr().err


def test_the_engine_traces_only_on_the_cpu(monkeypatch):
    with pytest.raises(ValueError, match="`traced` is for the CPU"):
        Engine(device="cuda", traced=True)
    assert Engine(device="cpu").traced is False
    monkeypatch.setenv("FASTGEN_TRACED", "1")
    assert Engine(device="cpu").traced is True and Engine(device="cpu", traced=False).traced is False


@cuda
def test_graphed_runs_give_the_eager_pixels(fake_hub):
    import numpy as np

    args = dict(width=64, height=64, seed=3)
    eager = Engine(device="cuda", dtype="float16", cuda_graphs=False)
    graphed = Engine(device="cuda", dtype="float16", cuda_graphs=True)
    for method in ["turbo", "lcm", "lcm-lora", "baseline"]:
        a = eager.run("sdxl", method, "a red circle", **args).image
        b = graphed.run("sdxl", method, "a red circle", **args).image
        assert np.array_equal(np.asarray(a), np.asarray(b)), method
    family = get_family("sdxl")
    pipe, *_ = graphed._pipeline(family, family.method("turbo"))
    assert isinstance(pipe.unet.__dict__.get("forward"), graphs.Graphed) and pipe.unet.forward.graphs
