"""ConsistencyDEQ.as_module: a fixed-budget student that torch.export and ONNX (Runtime) accept and
that matches eager; and the student's fixed budget on the meta device (no host synchronisation)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from cdeq import models
from cdeq.consistency import ConsistencyDEQ
from cdeq.state import as_tuple
from conftest import ToyDEQ, ToyGraphDEQ, ToyTupleDEQ, assert_onnx_matches_eager, count_layer_calls

FAMILIES = {"toy": (ToyDEQ, (4, 8)), "tuple": (ToyTupleDEQ, (4, 6)), "graph": (ToyGraphDEQ, (1, 20, 5))}


def perturbed_student(family: str, structure: str = "anderson", init: str = "zeros"):
    """A student whose W is off the identity (so h differs from f and the time column matters)."""
    cls, shape = FAMILIES[family]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    student = ConsistencyDEQ(cls(), structure=structure, init=init, example=x).eval()
    with torch.no_grad():
        for p in student.proj.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return student, x


@pytest.mark.parametrize("family, structure", [("toy", "anderson"), ("toy", "plain"), ("tuple", "anderson"),
                                               ("graph", "anderson")])
def test_as_module_makes_exactly_nfe_calls_and_torch_export_matches_eager(family, structure):
    student, x = perturbed_student(family, structure)
    module = student.as_module(nfe=3)
    calls = count_layer_calls(student.backbone)
    out = module(x)
    assert calls[0] == 3
    torch.testing.assert_close(out, student.predict(x, nfe=3), rtol=0, atol=0)
    exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x), out, rtol=1e-5, atol=1e-5)


def test_as_module_state_output_and_fused_student_exports_eager_ops():
    student, x = perturbed_student("graph", init="linear")
    eager = student.infer(x, nfe=2)
    student.fused = True  # the fused step would compile inside export; as_module never takes it
    module = student.as_module(nfe=2, readout=False)
    exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x), eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="readout: expected True"):
        student.as_module(nfe=2, readout="state")
    with pytest.raises(ValueError, match="nfe: expected an int >= 1"):
        student.as_module(nfe=0)
    with pytest.raises(RuntimeError, match="W is not built"):
        ConsistencyDEQ(ToyDEQ()).as_module(nfe=2)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_runtime_matches_eager(family):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # torch.onnx's exporter
    student, x = perturbed_student(family)
    assert_onnx_matches_eager(ort, student.as_module(nfe=4), x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("structure", ["anderson", "plain"])
def test_student_fixed_budget_runs_on_the_meta_device(family, structure):
    """infer(x, nfe=k) reads nothing on the host (meta tensors have no values): a CPU-only proxy
    for capturing it in a CUDA graph."""
    student, x = perturbed_student(family, structure, init="zeros" if family == "tuple" else "linear")
    student.to("meta")
    z = student.infer(x.to("meta"), nfe=4)
    assert all(p.device.type == "meta" for p in as_tuple(z)) and student.nfe == 4
    assert student.as_module(nfe=2)(x.to("meta")).device.type == "meta"


def _ring(n: int) -> torch.Tensor:
    i = torch.arange(n)
    return torch.stack([torch.cat([i, i]), torch.cat([(i + 1) % n, (i - 1) % n])])


MODELS = {  # tiny configs of cdeq.models
    "ignn": (lambda: models.get("ignn", edge_index=_ring(10), num_nodes=10, in_features=5, num_classes=3, hidden=8),
             lambda: torch.randn(1, 10, 5)),
    "mdeq": (lambda: models.get("mdeq", channels=(8, 16), head_channels=(8, 16, 32), stem_stride=2),
             lambda: torch.randn(2, 1, 16, 16)),
    "deq-transformer": (lambda: models.get("deq-transformer", vocab_size=50, d_model=16, n_heads=2, d_ff=32,
                                           max_len=12), lambda: torch.randint(0, 50, (2, 12))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_model_families_export_and_match_eager(name):
    """Every family, IGNN's sparse adjacency included (exported as a scatter-add over its edges)."""
    make, example = MODELS[name]
    torch.manual_seed(0)
    x = example()
    student = ConsistencyDEQ(make().eval(), example=x).eval()
    module = student.as_module(nfe=3)
    assert not module.training and student.train().as_module(nfe=3).training
    student.eval()
    eager = module(x)
    torch.testing.assert_close(torch.export.export(module, (x,)).module()(x), eager, rtol=1e-5, atol=1e-5)
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the export extra (onnxruntime, onnxscript) is not installed")
    import onnxruntime as ort

    assert_onnx_matches_eager(ort, module, x)
