import json

import pytest
import torch

import cnnkit
from cnnkit.audit import audit, format_audit
from cnnkit.checkpoint import make_payload, save_checkpoint
from cnnkit.errors import UserError
from tests.conftest import run_cli


def frozen_backbone_in_train_mode():
    """The silent bug: parameters frozen by hand, then a bare model.train()."""
    model = cnnkit.create_model("cnn_bn")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    return model.train()


def test_frozen_batchnorm_in_train_mode_is_named_and_the_model_left_alone():
    model = frozen_backbone_in_train_mode()
    flags = [p.requires_grad for p in model.parameters()]
    a = audit(model)
    (view,) = a.views
    assert [b.name for b in view.batchnorms if b.updates_stats and b.frozen] == ["features.1", "features.5"]
    assert len(a.warnings) == 1 and "features.1, features.5" in a.warnings[0]
    # A training step really does move them: what the audit warns about is what happens.
    before = model.features[1].running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(before, model.features[1].running_mean)

    # As cnnkit train sets it up, the same plan keeps frozen BatchNorm layers in eval mode: nothing to warn about.
    view = audit(model, freeze="backbone").views[0]
    assert not view.warnings and not any(b.updates_stats for b in view.batchnorms)
    assert {m.name for m in view.modes if not m.training} == {"features.1", "features.5"}
    assert [p.requires_grad for p in model.parameters()] == flags and model.features[1].training


def test_a_run_is_audited_stage_by_stage(tmp_path):
    model = cnnkit.create_model("cnn_bn")
    config = {"stages": "classifier:2@1e-3,all:3@1e-4", "freeze": None, "unfreeze": None, "epochs": 10}
    path = tmp_path / "run.pt"
    save_checkpoint(make_payload(model, [str(i) for i in range(10)], 32, 3, [0.5] * 3, [0.25] * 3, config=config),
                    str(path))
    first, second = audit(str(path)).views
    assert first.label.startswith("stage 1 of 2, epochs 1-2: trains classifier")
    assert second.label.startswith("stage 2 of 2, epochs 3-5: trains all")
    assert [b.updates_stats for b in first.batchnorms] == [False, False]
    assert [b.updates_stats for b in second.batchnorms] == [True, True]
    assert first.frozen_params > 0 and second.frozen_params == 0

    proc = run_cli("audit", path, "--plain-train", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["views"]) == 2 and len(result["warnings"]) == 1  # only stage 1 freezes anything
    assert result["warnings"][0].startswith("stage 1 of 2")
    text = format_audit(audit(str(path)))
    assert audit(str(path)).table() == text  # as Summary and ReceptiveField print themselves
    assert "of which 0 update their running statistics" in text and "warning" not in text


def test_audit_bad_input_is_one_line():
    proc = run_cli("audit", "cnn_bn", "--unfreeze", "layer9")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "layer9" in proc.stderr


def test_the_readmes_python_call_of_audit_works():
    import os
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    call = re.search(r"`(cnnkit(?:\.\w+)+)\(model\)` audits an `nn.Module`", readme).group(1)
    target = cnnkit
    for name in call.split(".")[1:]:
        target = getattr(target, name)
    a = target(frozen_backbone_in_train_mode())
    assert a.warnings and "frozen BatchNorm" in a.warnings[0]


def test_a_model_name_is_audited_as_built_with_its_model_options(capsys, tmp_path):
    """A model trained with --model-opt head_from=layer3,layer4 has another head (and so another frozen backbone)
    than the plain one, but `cnnkit audit` refused --model-opt: the model audited was not the one trained."""
    from cnnkit.cli import main

    plain = audit("resnet18", freeze="backbone").views[0]
    head2toe = audit("resnet18", freeze="backbone", head_from=("layer3", "layer4")).views[0]
    assert plain.trainable_params == 512 * 10 + 10 and head2toe.trainable_params > plain.trainable_params
    assert main(["audit", "resnet18", "--freeze", "backbone", "--model-opt", "head_from=layer3,layer4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["views"][0]["trainable_params"] == head2toe.trainable_params
    model = cnnkit.create_model("cnn_bn")
    path = tmp_path / "run.pt"
    save_checkpoint(make_payload(model, [str(i) for i in range(10)], 32, 3, [0.5] * 3, [0.25] * 3), str(path))
    for target in (str(path), model):
        with pytest.raises(UserError, match="model options apply to model names"):
            audit(target, head_from=("layer3",))
