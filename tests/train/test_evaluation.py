import csv
import os

import torch
import torch.nn as nn

import cnnkit
from cnnkit.train.evaluation import evaluate_model


class _Fixed(nn.Module):
    """Logits that put every image's class last: top-1 always wrong, top-5 right only when k covers it."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes

    def forward(self, images):
        return torch.arange(self.classes, dtype=torch.float32).flip(0).expand(len(images), -1).clone()


def test_top5_is_none_with_five_classes_or_fewer_where_it_is_one_by_definition():
    labels = torch.tensor([4, 4, 3])
    stats = evaluate_model(_Fixed(5), [(torch.zeros(3, 1), labels)], 5, torch.device("cpu"), None)
    assert stats.top5 is None and stats.acc == 0.0
    stats = evaluate_model(_Fixed(6), [(torch.zeros(3, 1), labels)], 6, torch.device("cpu"), None)
    assert stats.top5 == 1.0
    stats = evaluate_model(_Fixed(7), [(torch.zeros(3, 1), torch.tensor([6, 6, 0]))], 7, torch.device("cpu"), None)
    assert abs(stats.top5 - 1 / 3) < 1e-9


def test_a_run_of_four_classes_leaves_val_top5_empty(tmp_path, image_folder):
    run = cnnkit.train(model="cnn_bn", data=image_folder, epochs=1, batch_size=8, progress=False,
                       out=str(tmp_path / "run"))
    with open(os.path.join(run.run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows and all(row["val_top5"] == "" for row in rows), rows
    assert rows[0]["val_acc"] != ""
    assert cnnkit.evaluate(run.run_dir).top5 is None
