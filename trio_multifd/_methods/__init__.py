"""Compression methods and their registry: the built-in ``none``, ``zlib`` and ``zstd``,
and third-party methods registered at run time.

A method is known by its name (how users select it) and by its flag (the value of the
packet's compression field, ``flags & 0x3e``, compared for equality as QEMU does).
"""

from __future__ import annotations

import threading
import types
from collections.abc import Mapping

from .._errors import UnsupportedCompressionError
from .._wire import COMPRESSION_MASK, Compression
from ._base import Decoder as Decoder, Encoder as Encoder, Method as Method
from ._none import NoneMethod
from ._zlib import ZlibMethod
from ._zstd import ZstdMethod

__all__ = [
    "Decoder",
    "Encoder",
    "Method",
    "get_method",
    "method_for_flag",
    "methods",
    "register_method",
    "unregister_method",
]

# QEMU's hardware-accelerated methods: each compresses pages one by one behind a table of
# lengths, a framing no software method here speaks.
_HARDWARE = {
    int(Compression.QPL): "QPL",
    int(Compression.UADK): "UADK",
    int(Compression.QATZIP): "QATZIP",
}
_HARDWARE_NAMES = {name.lower(): name for name in _HARDWARE.values()}

_BUILTIN = frozenset(method.name for method in (NoneMethod, ZlibMethod, ZstdMethod))

# Changes take the lock so that the two tables always agree; a lookup is one dict read
# and needs none.
_lock = threading.Lock()
_by_name: dict[str, Method] = {}
_by_flag: dict[int, Method] = {}


def _known_names() -> str:
    with _lock:
        return ", ".join(sorted(_by_name))


# The class attributes a Method subclass must set: the ABC checks only the methods.
_ATTRIBUTES = ("name", "flag", "levels", "default_level", "compresses")


def _check(method: Method) -> None:
    if not isinstance(method, Method):
        raise TypeError(f"expected a Method instance, got {type(method).__name__}")
    missing = [attribute for attribute in _ATTRIBUTES if not hasattr(method, attribute)]
    if missing:
        raise TypeError(
            f"{type(method).__name__} does not set the class attributes a method needs:"
            f" {', '.join(missing)}"
        )
    name, flag = method.name, method.flag
    if not isinstance(name, str):
        raise TypeError(f"a method's name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("a method's name must not be empty")
    if type(flag) is not int:
        raise TypeError(f"method {name!r}: flag must be an int, got {type(flag).__name__}")
    if flag == 0 or flag & ~COMPRESSION_MASK:
        raise ValueError(
            f"method {name!r}: flag must be a nonzero value inside the compression field"
            f" {COMPRESSION_MASK:#x} (0 is 'none'), got {flag:#x}"
        )
    if flag in _HARDWARE and not method.qemu_compatible:
        raise ValueError(
            f"method {name!r}: flag {flag:#x} is QEMU's {_HARDWARE[flag]}; only a method"
            " wire-compatible with QEMU's (qemu_compatible = True) may use it"
        )
    if not method.compresses:
        raise ValueError(f"method {name!r}: only the built-in 'none' sends pages uncompressed")
    levels, default = method.levels, method.default_level
    if levels is None and default is not None:
        raise ValueError(f"method {name!r}: a default level without levels")
    if levels is not None and default not in levels:
        raise ValueError(f"method {name!r}: default level {default!r} is not in {levels}")


def _add(method: Method) -> None:
    with _lock:
        if method.name in _by_name:
            raise ValueError(f"a compression method named {method.name!r} is registered")
        if method.flag in _by_flag:
            raise ValueError(
                f"method {method.name!r}: flag {method.flag:#x} is taken by"
                f" {_by_flag[method.flag].name!r}"
            )
        _by_name[method.name] = method
        _by_flag[method.flag] = method


def register_method(method: Method) -> None:
    """Make a third-party compression method available by its name and its flag.

    Args:
        method: An instance of a :class:`Method` subclass. Its flag is one nonzero value
            inside the compression field (``flag & ~0x3e == 0``) that no registered
            method has; QEMU's hardware values 0x8 (QPL), 0x10 (UADK) and 0x20 (QATZIP)
            only for a method whose payloads are QEMU's (``qemu_compatible = True``).

    Raises:
        TypeError: ``method`` is not a :class:`Method`, its class does not set one of
            ``name``, ``flag``, ``levels``, ``default_level`` and ``compresses``, or its
            name is not a str or its flag not an int.
        ValueError: The name or the flag is taken or invalid, the levels are
            inconsistent, or the method does not compress.
    """
    _check(method)
    _add(method)


def unregister_method(name: str) -> None:
    """Remove a third-party method registered with :func:`register_method`.

    Args:
        name: The method's name.

    Raises:
        ValueError: No such method, or a built-in one.
    """
    if name in _BUILTIN:
        raise ValueError(f"the built-in compression method {name!r} cannot be unregistered")
    with _lock:
        method = _by_name.pop(name, None)
        if method is None:
            raise ValueError(f"no compression method named {name!r} is registered")
        del _by_flag[method.flag]


def get_method(name: str) -> Method:
    """Return the method called ``name``.

    Args:
        name: ``"none"``, ``"zlib"``, ``"zstd"`` or a registered third-party name.

    Returns:
        The method.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: No method has that name (the message lists those that do), or it
            names one of QEMU's hardware methods, which are not supported.
    """
    if not isinstance(name, str):
        raise TypeError(f"a method name is a str, got {type(name).__name__}")
    method = _by_name.get(name)
    if method is not None:
        return method
    if name.lower() in _HARDWARE_NAMES:
        raise ValueError(
            f"compression method {name!r} is QEMU's hardware-accelerated"
            f" {_HARDWARE_NAMES[name.lower()]}, which trio_multifd does not support;"
            f" known methods: {_known_names()}"
        )
    raise ValueError(f"unknown compression method {name!r}; known methods: {_known_names()}")


def method_for_flag(flag: int) -> Method:
    """Return the method a packet's compression field names.

    Args:
        flag: The compression field, ``flags & 0x3e``.

    Returns:
        The registered method with that flag.

    Raises:
        UnsupportedCompressionError: No registered method has that flag (field
            ``flags``); the message names QPL, UADK or QATZIP for their values.
        ValueError: ``flag`` has bits outside the compression field.
    """
    if flag & ~COMPRESSION_MASK:
        raise ValueError(
            f"a compression field has only the bits {COMPRESSION_MASK:#x}, got {flag:#x}"
        )
    method = _by_flag.get(flag)
    if method is not None:
        return method
    with _lock:
        known = tuple(sorted(_by_flag))
        listing = ", ".join(f"{m.name} {f:#x}" for f, m in sorted(_by_flag.items()))
    if flag in _HARDWARE:
        raise UnsupportedCompressionError(
            f"compression field {flag:#x} is QEMU's hardware-accelerated {_HARDWARE[flag]},"
            " which trio_multifd does not support",
            field="flags",
            value=flag,
            limit=known,
        )
    raise UnsupportedCompressionError(
        f"compression field {flag:#x} names no known method (known: {listing})",
        field="flags",
        value=flag,
        limit=known,
    )


def methods() -> Mapping[str, Method]:
    """Return the registered methods by name.

    Returns:
        A read-only snapshot, built-in methods included.
    """
    with _lock:
        return types.MappingProxyType(dict(_by_name))


for _builtin in (NoneMethod(), ZlibMethod(), ZstdMethod()):
    # Not through _check: "none" has flag 0 and does not compress, as only it may.
    _add(_builtin)
del _builtin
