"""CUDA graphs (fastgen.graphs): what a graph is keyed by, which modules are never graphed, how the engine turns
them on, and, on a CUDA machine only, that a graphed run gives the eager run's pixels."""

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


def test_modules_with_adapters_are_not_graphed_and_a_twin_leaves_the_graph_behind():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    def unet():
        return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                    norm_num_groups=4, attention_head_dim=2)

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


def test_the_engine_turns_graphs_on_only_on_cuda(monkeypatch, capsys):
    with pytest.raises(ValueError, match="`cuda_graphs` needs a CUDA device"):
        Engine(device="cpu", cuda_graphs=True)
    monkeypatch.setenv("FASTGEN_CUDA_GRAPHS", "1")  # a host's switch: a CPU fallback ignores it
    assert Engine(device="cpu").cuda_graphs is False
    assert main(["bench", "--family", "mini", "--methods", "turbo", "--device", "cpu", "--cuda-graphs"]) == 2
    assert "`cuda_graphs` needs a CUDA device" in capsys.readouterr().err


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
