import copy

import pytest
import torch
import torch.nn.functional as F

from cnnkit.models import create_model
from cnnkit.train.optim import make_optimizer


@pytest.mark.parametrize("name,lr", [("sgd", 0.05), ("adamw", 1e-3)])
def test_optimizers_use_the_fused_kernels_and_step_as_the_plain_loop_does(name, lr):
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=10)
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    fused = make_optimizer(model, name, lr, 5e-4)
    assert all(group["fused"] for group in fused.param_groups)
    # The same groups (decay on weights only, head and backbone), stepped by PyTorch's per-tensor loop.
    plain = make_optimizer(reference, name, lr, 5e-4)
    for group in plain.param_groups:
        group["fused"], group["foreach"] = None, False
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for net, opt in ((model, fused), (reference, plain)):
        torch.manual_seed(1)  # the same dropout masks
        for _ in range(5):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    moved = 0
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        # Rounding apart (Adam divides by the root of tiny second moments for weights that saw little gradient):
        # within 1e-5 of each other after moves of 1e-3 and more.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
        moved += not torch.equal(a, initial[n])
    assert moved == len(list(model.parameters()))
