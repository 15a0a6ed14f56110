"""Convolution arithmetic: how one convolution or pooling layer maps sizes, and receptive fields.

Output size (PyTorch's formula for ``Conv2d``, ``MaxPool2d`` and ``AvgPool2d``, per spatial axis)::

    out = floor((H + 2p - d(k-1) - 1) / s) + 1        (ceil instead of floor with ceil_mode)

Receptive field, carried as a ``Field`` (rf, jump, start) from the input to every layer::

    rf_out    = rf_in + (k_eff - 1) * jump_in          k_eff = d(k-1) + 1, the dilated kernel
    jump_out  = jump_in * s                            input pixels between neighbouring units
    start_out = start_in + ((k_eff - 1) / 2 - p) * jump_in

``start`` is the centre of the first unit's field in input pixels, where the centre of the top-left input
pixel is 0 (so it can be negative, or a half pixel after an even kernel). A unit at index i is centred at
``start + i * jump`` and sees ``rf`` pixels around that centre. Units in the same layer all share rf and jump.

Some operations make every unit depend on every pixel: global pooling, a linear layer after flatten,
attention across positions, and the squeeze-and-excitation gates of EfficientNet, MobileNetV3 and RegNetY
(a globally pooled gate multiplied into a local feature map). ``whole`` marks such fields; ``rf`` then
still counts the local part, the convolutions and pooling windows, as receptive field tables usually do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from cnnkit.errors import UserError

KINDS = ("conv", "maxpool", "avgpool")


@dataclass
class ConvArithmetic:
    """One layer's output size along one axis, with the formula filled in (``formula``, ``steps``)."""

    kind: str
    input_size: int
    kernel: int
    stride: int
    padding: int
    dilation: int
    ceil_mode: bool
    output_size: int
    formula: str
    steps: str


def conv_arithmetic(
    size: int, kernel: int, stride: int | None = None, padding: int = 0, dilation: int = 1, kind: str = "conv",
    ceil_mode: bool = False,
) -> ConvArithmetic:
    """Output size of a convolution (``kind="conv"``) or pooling layer (``maxpool``, ``avgpool``) along one axis.
    ``stride`` None: PyTorch's layers' own default, 1 for a convolution and the kernel size for pooling
    (``nn.MaxPool2d(2)`` halves the input).

    Raises a UserError for settings PyTorch refuses: an output smaller than one unit, a pooling padding over
    half the kernel, dilation for average pooling, non-positive sizes.
    """
    if kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}, not '{kind}'")
    if stride is None:
        stride = 1 if kind == "conv" else kernel
    for label, value, least in (("size", size, 1), ("kernel", kernel, 1), ("stride", stride, 1),
                                ("dilation", dilation, 1), ("padding", padding, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise UserError(f"{label} must be a whole number >= {least}, got {value}")
    if kind == "conv" and ceil_mode:
        raise UserError("convolutions have no ceil_mode; it is an option of pooling layers (--pool max or avg)")
    if kind == "avgpool" and dilation != 1:
        raise UserError("average pooling has no dilation; use --dilation 1 (or max pooling)")
    k_eff = dilation * (kernel - 1) + 1
    if kind != "conv" and padding > kernel // 2:
        raise UserError(f"pooling padding {padding} is more than half the kernel ({kernel}); PyTorch refuses it — "
                        f"use --padding {kernel // 2} or less")
    numerator = size + 2 * padding - k_eff
    by_formula = (-(-numerator // stride) if ceil_mode else numerator // stride) + 1
    # PyTorch drops a last window that would start in the right padding (possible only with ceil_mode)
    dropped = ceil_mode and by_formula > 0 and (by_formula - 1) * stride >= size + padding
    out = by_formula - 1 if dropped else by_formula
    d_term = f"{dilation}*({kernel}-1)" if dilation != 1 else f"({kernel}-1)"
    name = "ceil" if ceil_mode else "floor"
    formula = f"{name}((H + 2p - d(k-1) - 1) / s) + 1"
    steps = (f"{name}(({size} + 2*{padding} - {d_term} - 1) / {stride}) + 1 = {name}({numerator} / {stride}) + 1 "
             f"= {by_formula}")
    if dropped:
        steps += (f", less the last window: it would start at padded position {(by_formula - 1) * stride}, in the "
                  f"right padding (the input covers positions {padding}-{padding + size - 1}) = {out}")
    if out < 1:
        raise UserError(
            f"impossible {kind}: the {'dilated ' if dilation > 1 else ''}kernel ({k_eff}) is larger than the padded "
            f"input ({size} + 2*{padding} = {size + 2 * padding}): {steps}, less than one unit; "
            "use a smaller kernel or dilation, more padding, or a larger input"
        )
    return ConvArithmetic(kind, size, kernel, stride, padding, dilation, ceil_mode, out, formula, steps)


def conv_output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, ceil_mode: bool = False
) -> int:
    """floor((size + 2*padding - dilation*(kernel-1) - 1) / stride) + 1, in units; a UserError below one."""
    return conv_arithmetic(size, kernel, stride, padding, dilation, "conv", ceil_mode).output_size


@dataclass(frozen=True)
class Field:
    """The receptive field of the units of one tensor along one axis, in input pixels (see the module doc).

    Fractions keep adaptive pooling (non-integer strides) exact; ``as_numbers`` gives ints where whole.
    """

    rf: Fraction
    jump: Fraction
    start: Fraction
    whole: bool = False  # also depends on every input pixel, through a global operation

    @staticmethod
    def of_input() -> "Field":
        return Field(Fraction(1), Fraction(1), Fraction(0))

    def through_window(self, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> "Field":
        """After a convolution or pooling window (the formulas of the module doc)."""
        k_eff = dilation * (kernel - 1) + 1
        return Field(self.rf + (k_eff - 1) * self.jump, self.jump * stride,
                     self.start + (Fraction(k_eff - 1, 2) - padding) * self.jump, self.whole)

    def through_transposed(self, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> "Field":
        """After a transposed convolution: units get closer (jump / s); each sees ceil(k_eff / s) input units."""
        k_eff = dilation * (kernel - 1) + 1
        return Field(self.rf + (math.ceil(k_eff / stride) - 1) * self.jump, self.jump / stride,
                     self.start + (padding - Fraction(k_eff - 1, 2)) / stride * self.jump, self.whole)

    def through_adaptive(self, size_in: int, size_out: int) -> "Field":
        """After adaptive pooling from ``size_in`` to ``size_out`` units: windows of up to ceil(in/out) + 1
        units (exactly in/out when it divides), every in/out units."""
        if size_in == size_out:
            return self
        if size_out == 1:
            return self.spanning(size_in)
        windows = [math.ceil((i + 1) * size_in / size_out) - (i * size_in) // size_out for i in range(size_out)]
        kernel, stride = max(windows), Fraction(size_in, size_out)
        return Field(self.rf + (kernel - 1) * self.jump, self.jump * stride,
                     self.start + Fraction(windows[0] - 1, 2) * self.jump, self.whole)

    def spanning(self, size: int) -> "Field":
        """One field that holds all ``size`` units of this axis (global pooling, attention, a linear layer after
        flatten). Its jump is 0: every unit from here on sees the same, whole, region."""
        return Field(self.rf + (size - 1) * self.jump, Fraction(0), self.start + Fraction(size - 1, 2) * self.jump,
                     True)

    def shifted(self, units: int) -> "Field":
        """The same field with unit 0 moved ``units`` units to the right (negative: padding added on the left)."""
        return Field(self.rf, self.jump, self.start + units * self.jump, self.whole)

    def strided(self, step: int) -> "Field":
        """Every ``step``-th unit (a strided slice)."""
        return Field(self.rf, self.jump * step, self.start, self.whole)

    def extent(self, index: int) -> tuple[float, float]:
        """First and last input pixel (fractional where rf is even) seen by unit ``index``."""
        centre = self.start + index * self.jump
        half = (self.rf - 1) / 2
        return float(centre - half), float(centre + half)

    def as_numbers(self) -> tuple[int, int | float, int | float]:
        """(rf, jump, start) as plain numbers: rf rounded up to whole pixels, jump and start exact."""
        return math.ceil(self.rf), _plain(self.jump), _plain(self.start)


def _plain(x: Fraction) -> int | float:
    return int(x) if x.denominator == 1 else float(x)
