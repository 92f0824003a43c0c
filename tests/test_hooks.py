from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from conftest import hook_count, tiny_cnn
from lightning_prism.hooks import ModuleTaps, wrappers_allowed


def wrapped_modules(model: nn.Module) -> int:
    return sum("forward" in vars(m) for m in model.modules())


def calls_around(model: nn.Module, x: torch.Tensor, *, wrap: bool) -> list[tuple[str, str, tuple[int, ...]]]:
    """(event, module name, tensor shape) for every call, entry and exit, in order."""
    names = {m: n for n, m in model.named_modules()}
    events: list[tuple[str, str, tuple[int, ...]]] = []
    with ModuleTaps() as taps:
        for module in model.modules():
            if module is model:
                continue
            taps.around(
                module,
                lambda m, args: events.append(("enter", names[m], tuple(args[0].shape))),
                lambda m, args, output: events.append(("exit", names[m], tuple(output.shape))),
                wrap=wrap,
            )
        with torch.no_grad():
            model(x)
    return events


def test_wrappers_see_what_hooks_see_in_the_same_order():
    model, x = torchvision.models.resnet18().eval(), torch.rand(1, 3, 32, 32)
    wrapped, hooked = calls_around(model, x, wrap=True), calls_around(model, x, wrap=False)
    assert wrapped == hooked
    assert wrapped[0] == ("enter", "conv1", (1, 3, 32, 32)) and wrapped[-1] == ("exit", "fc", (1, 1000))
    assert hook_count(model) == 0


def test_keyword_arguments_are_seen_when_there_are_no_positional_ones():
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(input=x)

    model = Keywords()
    for wrap in (True, False):
        seen: list[tuple[int, ...]] = []
        enter = seen.append
        with ModuleTaps() as taps:
            taps.around(
                model.inner,
                lambda m, args, enter=enter: enter(tuple(args[0].shape)),
                lambda *a: None,
                wrap=wrap,
            )
            model(torch.rand(2, 3, 5, 5))
        assert seen == [(2, 3, 5, 5)]


def test_everything_is_removed_after_success_and_after_an_exception():
    model = tiny_cnn()
    model[3].register_forward_hook(lambda *args: None)  # the user's own hook stays
    before = hook_count(model)
    with pytest.raises(RuntimeError), ModuleTaps() as taps:
        for module in model:
            taps.around(module, lambda m, args: None, lambda m, args, output: None, wrap=True)
        taps.after(model, lambda *args: None)
        assert hook_count(model) > before
        assert wrapped_modules(model) == len(model) - 1  # all but the one with its own hook
        model(torch.rand(1, 5, 32, 32))  # wrong channel count: the first conv raises
    assert hook_count(model) == before
    taps.remove()  # idempotent
    assert hook_count(model) == before


def test_an_instance_forward_is_put_back_exactly():
    model = tiny_cnn()
    own = model[6].forward
    model[6].forward = own  # a forward set on the instance, as some libraries do
    with ModuleTaps() as taps:
        taps.around(model[6], None, lambda m, args, output: None, wrap=True)
        assert vars(model[6])["forward"] is not own  # wrapped
        model(torch.rand(1, 3, 32, 32))
    assert vars(model[6])["forward"] is own
    assert not any("forward" in vars(m) for i, m in enumerate(model) if i != 6)


def test_wrappers_are_not_allowed_with_global_hooks_or_data_parallel():
    model = tiny_cnn()
    assert wrappers_allowed(model.modules())
    assert not wrappers_allowed(nn.DataParallel(model).modules())
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not wrappers_allowed(model.modules())
    finally:
        handle.remove()
