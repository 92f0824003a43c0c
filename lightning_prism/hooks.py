"""Attaching callbacks to module calls, and detaching them: :class:`ModuleTaps`.

What a recording does with a module call is :mod:`lightning_prism.recording`'s business; this module
only attaches the callbacks and takes them off again, exactly as it found the modules, also after an
exception.

Discovery sees every module call (199 per forward of EfficientNet-Lite0). A forward hook puts a
module on the slow path of ``nn.Module.__call__``, about 5 µs per call inside a forward that streams
megabytes between calls, so :meth:`ModuleTaps.around` sets a wrapper as the module's own ``forward``
attribute, which keeps the fast path, and deletes it (or puts back a ``forward`` the instance already
had) on removal. It uses forward hooks where a wrapper could see something else than a hook would: on a
module with forward hooks of its own (they may replace the output after the wrapper has seen it), while
a global forward hook is registered, and inside ``nn.DataParallel`` (its replicas copy each module's
attributes); see :func:`wrappers_allowed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.nn.modules.module import _global_forward_hooks
from torch.utils.hooks import RemovableHandle

__all__ = ["ModuleTaps", "OnEnter", "OnExit", "wrappers_allowed"]

#: ``on_enter(module, args)``: called as a module's forward starts; ``args`` are its positional
#: arguments (its keyword arguments' values if it got none).
OnEnter = Callable[[nn.Module, tuple[Any, ...]], None]
#: ``on_exit(module, args, output)``: called after the forward returned ``output``; like a forward
#: hook, it returns ``None`` or a replacement for the output that flows on.
OnExit = Callable[[nn.Module, tuple[Any, ...], Any], Any]

_MISSING = object()


def wrappers_allowed(modules: Iterable[nn.Module]) -> bool:
    """Whether forward wrappers see what forward hooks would for these modules: not while a global
    forward hook is registered, nor inside ``nn.DataParallel``."""
    return not _global_forward_hooks and not any(isinstance(m, nn.DataParallel) for m in modules)


class _ForwardWrapper:
    """Calls ``on_enter`` before and ``on_exit`` after a module's ``forward``, by setting a wrapper
    as the module's own ``forward`` attribute until :meth:`remove`."""

    def __init__(self, module: nn.Module, on_enter: OnEnter | None, on_exit: OnExit) -> None:
        self.module = module
        state = vars(module)
        self._own = state.get("forward", _MISSING)  # a forward already set on the instance: put back
        forward = module.forward
        if on_enter is None:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                output = forward(*args, **kwargs)
                replaced = on_exit(module, args or tuple(kwargs.values()), output)
                return output if replaced is None else replaced

        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                inputs = args or tuple(kwargs.values())
                on_enter(module, inputs)
                output = forward(*args, **kwargs)
                replaced = on_exit(module, inputs, output)
                return output if replaced is None else replaced

        self.wrapper = wrapper
        state["forward"] = wrapper

    def remove(self) -> None:
        """Restore the module's ``forward`` exactly as found (idempotent)."""
        state = vars(self.module)
        if state.get("forward") is self.wrapper:
            if self._own is _MISSING:
                del state["forward"]
            else:
                state["forward"] = self._own


class ModuleTaps:
    """Callbacks on module calls, attached for the duration of a ``with`` block.

    Every ``around``/``before``/``after`` attaches at once and is undone by :meth:`remove`, which
    ``__exit__`` calls, also after an exception; removal is idempotent and restores every module
    exactly (hooks, ``forward`` attributes).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> seen = []
        >>> with ModuleTaps() as taps:
        ...     taps.after(model[0], lambda module, args, output: seen.append(tuple(output.shape)))
        ...     _ = model(torch.rand(1, 3, 8, 8))
        >>> seen, len(model[0]._forward_hooks)
        ([(1, 4, 6, 6)], 0)
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle | _ForwardWrapper] = []

    def __enter__(self) -> ModuleTaps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        """Detach everything attached so far (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def around(self, module: nn.Module, on_enter: OnEnter | None, on_exit: OnExit, *, wrap: bool) -> None:
        """``on_enter`` (unless ``None``) before and ``on_exit`` after each call of ``module``.

        Args:
            wrap: use a forward wrapper where it sees what hooks would (the module has no forward
                hooks of its own; the caller checks :func:`wrappers_allowed` for the model), else
                forward hooks.
        """
        if wrap and not module._forward_hooks:
            self._handles.append(_ForwardWrapper(module, on_enter, on_exit))
            return
        if on_enter is not None:
            enter = on_enter
            self.before(module, lambda m, args, kwargs: enter(m, args or tuple(kwargs.values())))
        exit_ = on_exit
        self._handles.append(
            module.register_forward_hook(
                lambda m, args, kwargs, output: exit_(m, args or tuple(kwargs.values()), output),
                with_kwargs=True,
            )
        )

    def before(
        self, module: nn.Module, hook: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]
    ) -> None:
        """A forward pre-hook ``hook(module, args, kwargs)``."""
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def after(self, module: nn.Module, hook: OnExit) -> None:
        """A forward hook ``hook(module, args, output)`` (it sees the output after the module's own
        hooks registered before it)."""
        self._handles.append(module.register_forward_hook(hook))
