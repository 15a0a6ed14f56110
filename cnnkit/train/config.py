"""TrainConfig: every option of a training run; TrainResult: what a run reports.

``config.json`` in a run folder is ``dataclasses.asdict(TrainConfig)``, and ``--json`` prints
``dataclasses.asdict(TrainResult)``: one source of truth for the CLI and the Python API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    model: str = "simple_cnn"
    model_options: dict[str, Any] = field(default_factory=dict)
    # transfer learning
    pretrained: bool = False  # torchvision's default weights for the model
    weights: str | None = None  # a state dict, torchvision file, .safetensors file or cnnkit run to start from
    freeze: str | None = None  # "backbone": train only the classifier head
    unfreeze: str | None = None  # comma-separated module names: train only these
    lr_backbone: float | None = None  # a lower learning rate for everything but the head
    stages: str | None = None  # staged fine-tuning, e.g. "fc:3@1e-3,layer4+fc:5@1e-4" (overrides epochs/lr)
    # data
    data: str = "shapes"
    data_dir: str | None = None
    download: bool = False
    val_data: str | None = None
    val_split: float | None = None
    input_size: int | None = None  # pixels, square; None: the data's own size
    channels: int | None = None  # 1 or 3; None: the data's own
    num_samples: int | None = None  # training images to use (for shapes: to generate)
    crop_pad: int | None = None  # random-translation padding in pixels; None: size // 8
    flip: bool | None = None  # random horizontal flips; None: on, except for digits
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    lr: float | str | None = None  # peak learning rate; None: 0.05 for SGD, 2e-3 for AdamW; "auto": lr_find's
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    clip_grad: float | None = None  # clip the gradient norm to this value (the norm before clipping is logged)
    # machinery
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    eval_batch_size: int = 500
    workers: int = 2  # loader processes, only for sets too large for memory
    out: str | None = None  # run folder; None: runs/<timestamp>-<model>
    save_every: int = 0  # also write last.pt every N steps (0: at the end of each epoch only)
    nan: str = "stop"  # a non-finite loss: stop (keeping the last good checkpoint) or skip the batch
    bad_images: str = "skip"  # broken images in a folder: skip (listed in bad_images.txt) or error
    progress: bool = True
    sync_bn: bool = False  # with several processes on CUDA: BatchNorm statistics over the global batch
    # speed
    recipe: str | None = None  # a named set of options (cnnkit.train.recipes), e.g. "fast"; explicit options win
    compile: bool = False  # torch.compile the training step's model (pays off on some machines and models only)
    alternate_flip: bool = False  # flips alternate per image from epoch to epoch instead of coin tosses
    cutout: int = 0  # side in pixels of a zeroed square per training image (0: none)
    tta: bool = False  # the final validation also averages mirrored and shifted views (tta_val_acc)
    # class balance and data checks
    class_weights: str | None = None  # "auto": loss weights n / (k * class count), recorded in class_weights.json
    balanced_sampler: bool = False  # training batches drawn with every class equally likely (with replacement)
    check_data: bool = True  # before training: class counts, train/val duplicates, model mismatches (warnings)
    # showing the run (cnnkit/report/); opt-in, since drawing costs a few seconds that short runs notice
    plots: bool = False  # plots/ at the end: curves, learning rate, confusion matrix, top losses
    report: bool = False  # report.html at the end (with the plots)
    tensorboard: bool = False  # TensorBoard events in <run>/tensorboard (needs the tensorboard extra)


@dataclass
class TrainResult:
    val_acc: float
    val_loss: float
    best_val_acc: float
    best_epoch: int
    epochs: int
    train_acc: float
    train_loss: float
    train_time_s: float
    images_per_s: float
    run_dir: str
    model: str
    data: str
    precision: str
    num_train: int
    num_val: int
    params: int
    skipped_images: int = 0
    skipped_batches: int = 0  # batches with a non-finite loss, with nan="skip"
    tta_val_acc: float | None = None  # the last epoch's validation accuracy with test-time augmentation
    wall_time_s: float = 0.0  # from the call to train() to its return: data loading, set-up and evaluation included
