"""fastnet's global pooling: the same numbers as adaptive max-pooling, in an operation every exporter knows."""

import torch

import cnnkit
from cnnkit.models.fast import GlobalMaxPool


def test_global_max_pool_gives_adaptive_max_pools_values_and_gradients():
    x = torch.randn(3, 5, 7, 6, requires_grad=True)
    y = torch.randn(3, 5, 7, 6).requires_grad_(True)
    with torch.no_grad():
        y.copy_(x)
    a = GlobalMaxPool()(x)
    b = torch.nn.AdaptiveMaxPool2d(1)(y)
    assert a.shape == b.shape == (3, 5, 1, 1)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert torch.equal(x.grad, y.grad)


def test_the_exported_fastnet_graph_has_no_adaptive_max_pool():
    # torch 2.11's ONNX exporter (onnxscript's torch_lib) has no adaptive_max_pool2d: `cnnkit export --format
    # onnx` of a fast-recipe run failed there in its step 3/3. Newer torch decomposes the op first; the model
    # no longer depends on that.
    model = cnnkit.create_model("fastnet", num_classes=10, input_size=32).eval()
    program = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "adaptive_max_pool" in t], targets
    assert any("max_pool2d" in t for t in targets)
